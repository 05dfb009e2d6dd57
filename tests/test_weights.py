"""load_pipeline: the three layouts, fingerprints, export, dtypes, and every refusal."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sdcore
from sdcore.config import ModelConfig
from sdcore.convert import CheckpointError, parts_to_compvis
from sdcore.weights import load_builtin

from tests.reference import save_diffusers_folder

SETTINGS = dict(sampler="euler_a", steps=3, guidance_scale=7.0, width=32, height=32)
ROWS = [{"prompt": "a red circle", "seed": 11}, {"prompt": "a blue square", "negative": "x", "seed": 12}]


def pixels(pipe) -> list[np.ndarray]:
    return [np.asarray(image) for image in pipe.generate(ROWS, **SETTINGS)]


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusers")
    save_diffusers_folder(ModelConfig.tiny(), 21, folder)
    return folder


@pytest.fixture(scope="module")
def from_folder(diffusers_folder):
    return sdcore.load_pipeline(diffusers_folder)


def test_single_file_export_round_trip(tmp_path, from_folder):
    """Export to CompVis .safetensors; loading it back gives the same weights and images."""
    path = tmp_path / "model.safetensors"
    sdcore.export_single_file(from_folder, path)
    reloaded = sdcore.load_pipeline(path)
    assert reloaded.config == from_folder.config
    assert reloaded.fingerprint == from_folder.fingerprint
    assert all(np.array_equal(a, b) for a, b in zip(pixels(from_folder), pixels(reloaded)))
    # The file is plain CompVis layout, which A1111/ComfyUI/diffusers' from_single_file read.
    keys = load_file(str(path))
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.conv_out.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys


def test_single_file_export_of_a_model_whose_shapes_do_not_tell_its_config(tmp_path):
    """builtin:shapes normalises in groups of 16, which its shapes cannot tell from the SD
    default of 32: the export used to infer the config from the shapes and fail."""
    shapes = sdcore.load_pipeline("builtin:shapes")
    assert shapes.config.unet.norm_num_groups != ModelConfig().unet.norm_num_groups
    sdcore.export_single_file(shapes, tmp_path / "shapes.safetensors")
    reloaded = sdcore.load_pipeline(tmp_path / "shapes.safetensors")
    assert reloaded.config == shapes.config
    # The built-in file stores float16, loaded as float32: the export writes float16 again, so
    # the copy has the built-in's fingerprint (reproduce and resume accept it in its place).
    assert shapes.stored_dtype == torch.float16 and reloaded.fingerprint == shapes.fingerprint
    assert all(np.array_equal(a, b) for a, b in zip(pixels(shapes), pixels(reloaded)))


def test_packed_token_table(tmp_path, from_folder):
    """export_single_file(token_rows=...) stores only those rows of the token table; loading
    fills the rest with zeros, so prompts made of those tokens give the same images."""
    from sdcore.tokenizer import tokenize
    from sdcore.weights import PACKED_IDS_KEY, TOKEN_TABLE_KEY

    ids = sorted(set(tokenize([r["prompt"] for r in ROWS] + ["x", ""]).flatten().tolist()))
    full, packed = tmp_path / "full.safetensors", tmp_path / "packed.safetensors"
    sdcore.export_single_file(from_folder, full)
    sdcore.export_single_file(from_folder, packed, token_rows=ids)
    stored = load_file(str(packed))
    assert TOKEN_TABLE_KEY not in stored and stored[PACKED_IDS_KEY].tolist() == ids
    vocab, width = from_folder.config.text_encoder.vocab_size, from_folder.config.text_encoder.hidden_size
    assert full.stat().st_size - packed.stat().st_size > 0.9 * (vocab - len(ids)) * width * 4

    reloaded = sdcore.load_pipeline(packed)
    table = reloaded.text_encoder.text_model.embeddings.token_embedding.weight
    original = from_folder.text_encoder.text_model.embeddings.token_embedding.weight
    assert torch.equal(table[ids], original[ids])
    others = torch.ones(vocab, dtype=torch.bool)
    others[ids] = False
    assert not table[others].any()
    assert all(np.array_equal(a, b) for a, b in zip(pixels(from_folder), pixels(reloaded)))

    # A packed table whose ids do not fit the vocabulary is a clear error.
    stored[PACKED_IDS_KEY] = stored[PACKED_IDS_KEY] + vocab
    bad = tmp_path / "bad.safetensors"
    with safe_open(str(packed), "pt") as handle:
        metadata = handle.metadata()  # keeps the config
    save_file(stored, str(bad), metadata=metadata)
    with pytest.raises(CheckpointError, match="packed token table"):
        sdcore.load_pipeline(bad)
    # ...and so is one without the config that says how big the full table is.
    save_file(stored, str(bad))
    with pytest.raises(CheckpointError, match="packed token table"):
        sdcore.load_pipeline(bad)


def test_ckpt_without_metadata_loads_and_ema_is_optional(tmp_path, from_folder):
    """A .ckpt (torch.save of {"state_dict": ...}) loads with weights_only; config is inferred."""
    state = parts_to_compvis(from_folder.state_dicts())
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 5}, path)
    # The tiny model's heads differ from the SD 1.x convention, so pass nothing and compare
    # the weights only: config is inferred from shapes.
    loaded = sdcore.load_pipeline(path)
    assert loaded.fingerprint == from_folder.fingerprint


def test_fingerprint_tracks_weights(from_folder, diffusers_folder, tmp_path):
    assert len(from_folder.fingerprint) == 64
    copy = tmp_path / "changed"
    shutil.copytree(diffusers_folder, copy)
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"] + 1e-3
    save_file(state, str(weights))
    assert sdcore.load_pipeline(copy).fingerprint != from_folder.fingerprint


def test_builtin_tiny_is_deterministic():
    a, b = sdcore.load_pipeline("builtin:tiny"), sdcore.load_pipeline("builtin:tiny")
    assert a.fingerprint == b.fingerprint
    assert all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b)))


@pytest.mark.parametrize(
    "dtype, expected", [(None, torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)]
)
def test_dtypes(dtype, expected):
    pipe = sdcore.load_pipeline("builtin:tiny", dtype=dtype)
    assert pipe.dtype == expected
    image = pipe.generate(ROWS[:1], **SETTINGS)[0]
    assert image.size == (32, 32) and np.asarray(image).std() > 0


def test_bad_dtype_and_unknown_builtin():
    with pytest.raises(ValueError, match="dtype must be one of"):
        sdcore.load_pipeline("builtin:tiny", dtype="int8")
    with pytest.raises(ValueError, match="unknown built-in model 'nope'"):
        sdcore.load_pipeline("builtin:nope")


# ------------------------------------------------------------------------------ refusals


def write_folder_variant(src, dst, part, change):
    shutil.copytree(src, dst)
    config_path = dst / part / ("scheduler_config.json" if part == "scheduler" else "config.json")
    config = json.loads(config_path.read_text())
    change(config)
    config_path.write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "part, change, message",
    [
        ("unet", lambda c: c.update(in_channels=9), "inpainting"),
        ("unet", lambda c: c.update(cross_attention_dim=1024), "SD 2.x"),
        ("unet", lambda c: c.update(addition_embed_type="text_time"), "SDXL"),
        ("unet", lambda c: c.update(down_block_types=["SimpleDown"] * 3), "unsupported down_block_types"),
        ("scheduler", lambda c: c.update(prediction_type="v_prediction"), "v-prediction"),
        ("unet", lambda c: c.update(layers_per_block=3), "missing key"),
        ("unet", lambda c: c.update(block_out_channels=[32, 96, 96]), "has shape"),
        # Keys sdcore's networks do not read: another value than SD 1.x's would be run as SD 1.x.
        ("unet", lambda c: c.update(flip_sin_to_cos=False), "flip_sin_to_cos=False"),
        ("unet", lambda c: c.update(downsample_padding=0, upcast_attention=True), "downsample_padding=0, upcast"),
        ("vae", lambda c: c.update(act_fn="mish"), "act_fn='mish'"),
        ("scheduler", lambda c: c.update(prediction_type="sample"), "prediction_type='sample'"),
        ("scheduler", lambda c: c.update(beta_end=0.02), "beta_end=0.02"),
        ("scheduler", lambda c: c.update(beta_start=0.00085001), "beta_start=0.00085001"),  # not float noise
        ("scheduler", lambda c: c.update(num_train_timesteps=1000.0000001), "num_train_timesteps=1000.0000001"),
        # A per-block list with one value that is not SD 1.x's, named as written.
        (
            "unet",
            lambda c: c.update(only_cross_attention=[False, True, False]),
            r"only_cross_attention=\[False, True, False\]",
        ),
        ("unet", lambda c: c.update(only_cross_attention=[False, False]), "needs one entry per down block"),
        # diffusers types upcast_attention a bool: a list is truthy there (upcasts), not SD 1.x's False.
        ("unet", lambda c: c.update(upcast_attention=[False] * 3), r"upcast_attention=\[False, False, False\]"),
        ("unet", lambda c: c.update(layers_per_block=[2, 1, 2]), r"per-block layers_per_block \[2, 1, 2\] unsupported"),
        ("unet", lambda c: c.update(cross_attention_dim=[1024] * 3), "SD 2.x"),
        ("unet", lambda c: c.update(time_embedding_dim=256), "time_embedding_dim=256"),
        ("text_encoder", lambda c: c.update(architectures=["CLIPTextModelWithProjection"]), "not SD 1.x's"),
    ],
)
def test_unsupported_diffusers_folders_are_refused(diffusers_folder, tmp_path, part, change, message):
    folder = write_folder_variant(diffusers_folder, tmp_path / "variant", part, change)
    with pytest.raises(CheckpointError, match=message):
        sdcore.load_pipeline(folder)


@pytest.mark.parametrize(
    "part, key, json_value",
    [
        # diffusers takes these as one value or one per down block (heads per level: UNetConfig's own).
        ("unet", "only_cross_attention", "[false, false, false]"),
        ("unet", "layers_per_block", "[2, 2, 2]"),
        ("unet", "cross_attention_dim", "[32, 32, 32]"),
        ("unet", "transformer_layers_per_block", "[1, 1, 1]"),
        ("unet", "time_embedding_dim", "128"),  # diffusers' null: block_out_channels[0] * 4
        ("unet", "mid_block_only_cross_attention", "null"),  # null: only_cross_attention's value
        ("unet", "mid_block_scale_factor", "1.0000000000000002"),
        # Float noise from another writer, and other spellings of SD's numbers.
        ("scheduler", "beta_end", "0.012000000000000002"),
        ("scheduler", "beta_start", "0.0008499999999999999"),
        ("scheduler", "beta_start", "8.5e-4"),
        ("scheduler", "num_train_timesteps", "1000.0"),
        ("vae", "shift_factor", "0.0"),
    ],
)
def test_configs_that_are_sd_written_another_way_load_as_sd(
    diffusers_folder, from_folder, tmp_path, part, key, json_value
):
    """Keys sdcore's networks do not read were compared to SD 1.x's value exactly, so a per-block
    list of SD's value, or SD's beta_end with float noise, was refused as "not an SD 1.x model"."""
    folder = tmp_path / "variant"
    shutil.copytree(diffusers_folder, folder)
    config_path = folder / part / ("scheduler_config.json" if part == "scheduler" else "config.json")
    config = {k: v for k, v in json.loads(config_path.read_text()).items() if k != key}
    config_path.write_text(json.dumps(config)[:-1] + f', "{key}": {json_value}}}')  # the value as spelled
    loaded = sdcore.load_pipeline(folder)
    assert loaded.config == from_folder.config
    assert loaded.fingerprint == from_folder.fingerprint


def test_a_text_encoder_with_another_vocabulary_is_refused(diffusers_folder, tmp_path):
    """sdcore's tokenizer is CLIP's 49408 tokens: a smaller table failed every generate with an
    IndexError, a larger one (a textual-inversion token added) silently ignored the new token."""
    for rows in (1000, 49409):
        folder = tmp_path / f"vocab{rows}"
        shutil.copytree(diffusers_folder, folder)
        config_path = folder / "text_encoder" / "config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "vocab_size": rows}))
        weights = folder / "text_encoder" / "model.safetensors"
        state = load_file(str(weights))
        key = next(k for k in state if k.endswith("token_embedding.weight"))
        table = state[key]
        state[key] = table[:rows] if rows < len(table) else torch.cat([table, table[-1:]])
        save_file(state, str(weights))
        with pytest.raises(CheckpointError, match=f"has {rows} token embeddings; SD 1.x uses CLIP's 49408"):
            sdcore.load_pipeline(folder)


def test_legacy_vae_attention_names_load_as_the_same_weights(diffusers_folder, from_folder, tmp_path):
    """diffusers before 0.14 saved the VAE's mid-block attention as query/key/value/proj_attn."""
    folder = tmp_path / "legacy"
    shutil.copytree(diffusers_folder, folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    old_names = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    renamed = {}
    for key, tensor in load_file(str(weights)).items():
        for new, old in old_names.items():
            key = key.replace(f"attentions.0.{new}", f"attentions.0.{old}")
        renamed[key] = tensor
    assert any(".proj_attn." in key for key in renamed)
    save_file(renamed, str(weights))
    legacy = sdcore.load_pipeline(folder)
    assert legacy.fingerprint == from_folder.fingerprint


def test_sharded_folder_is_named(diffusers_folder, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(diffusers_folder, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").rename(
        folder / "unet" / "diffusion_pytorch_model-00001-of-00001.safetensors"
    )
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="saved in shards"):
        sdcore.load_pipeline(folder)


def test_sdxl_folder_refused(diffusers_folder, tmp_path):
    shutil.copytree(diffusers_folder, tmp_path / "xl")
    (tmp_path / "xl" / "text_encoder_2").mkdir()
    with pytest.raises(CheckpointError, match="SDXL"):
        sdcore.load_pipeline(tmp_path / "xl")


def test_unexpected_key_in_folder(diffusers_folder, tmp_path):
    shutil.copytree(diffusers_folder, tmp_path / "extra")
    weights = tmp_path / "extra" / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["mystery.weight"] = torch.zeros(3)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="unexpected key 'mystery.weight'"):
        sdcore.load_pipeline(tmp_path / "extra")


def test_missing_config_named(diffusers_folder, tmp_path):
    shutil.copytree(diffusers_folder, tmp_path / "noconfig")
    (tmp_path / "noconfig" / "vae" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="vae/config.json"):
        sdcore.load_pipeline(tmp_path / "noconfig")


def test_truncated_safetensors(tmp_path):
    config, parts = load_builtin("tiny")
    path = tmp_path / "full.safetensors"
    save_file(parts_to_compvis(parts), str(path))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        sdcore.load_pipeline(cut)


def test_truncated_ckpt(tmp_path):
    config, parts = load_builtin("tiny")
    path = tmp_path / "full.ckpt"
    torch.save(parts_to_compvis(parts), path)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        sdcore.load_pipeline(cut)


class Payload:
    """An arbitrary object: unpickling a checkpoint holding it would run its code."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_files_that_are_no_checkpoint_are_named_so(tmp_path):
    """torch's weights-only unpickler raises KeyError, UnpicklingError, ... on files that are not
    checkpoints: each is a CheckpointError naming the file, not a bare KeyError or a claim of code."""
    text = tmp_path / "notes.ckpt"
    text.write_text("hello world\n")
    with pytest.raises(CheckpointError, match="notes.ckpt: not a readable checkpoint \\(not a PyTorch checkpoint"):
        sdcore.load_pipeline(text)
    renamed = tmp_path / "model.ckpt"
    save_file({"w": torch.zeros(2)}, str(renamed))
    with pytest.raises(CheckpointError, match="a safetensors file under another suffix"):
        sdcore.load_pipeline(renamed)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        sdcore.load_pipeline(empty)


def test_export_keeps_a_mixed_dtype_files_fingerprint(tmp_path, from_folder):
    """A file whose UNet is float16 and the rest float32 exports with the same mix."""
    parts = from_folder.state_dicts()
    parts["unet"] = {k: v.half() for k, v in parts["unet"].items()}
    mixed = tmp_path / "mixed.safetensors"
    save_file(parts_to_compvis(parts), str(mixed))
    source = sdcore.load_pipeline(mixed)
    assert source.stored_dtype is None  # mixed
    sdcore.export_single_file(source, tmp_path / "export.safetensors")
    assert sdcore.load_pipeline(tmp_path / "export.safetensors").fingerprint == source.fingerprint


def test_ckpt_with_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        sdcore.load_pipeline(path)
    assert "this must never run" not in capsys.readouterr().out


def test_wrong_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights not found"):
        sdcore.load_pipeline(tmp_path / "absent.safetensors")
    text = tmp_path / "weights.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="unknown weights layout"):
        sdcore.load_pipeline(text)
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="unet/config.json"):
        sdcore.load_pipeline(empty)


def test_loaded_weights_are_the_files_in_memory_of_their_own(tmp_path, from_folder):
    """The reader puts every tensor in fresh, aligned memory holding the file's exact bytes, and
    `assemble` copies what it is handed unless told it owns it."""
    path = tmp_path / "model.safetensors"
    sdcore.export_single_file(from_folder, path)
    reloaded = sdcore.load_pipeline(path)
    in_file = load_file(str(path))
    ours = parts_to_compvis(reloaded.state_dicts())
    assert set(ours) == set(in_file)
    assert all(torch.equal(ours[k], in_file[k]) for k in in_file)
    params = [p for model in (reloaded.unet, reloaded.vae, reloaded.text_encoder) for p in model.parameters()]
    assert all(p.data_ptr() % 64 == 0 and p.is_contiguous() for p in params)

    config, parts = load_builtin("tiny")
    pipe = sdcore.weights.assemble(config, parts, source="test")
    before = pipe.unet.conv_in.weight.clone()
    parts["unet"]["conv_in.weight"].add_(1.0)  # the caller's tensor changes; the pipeline's must not
    assert torch.equal(pipe.unet.conv_in.weight, before)


def test_fingerprint_is_sha256_over_parts_in_canonical_order(from_folder):
    """Records carry this fingerprint; its definition must not drift (reproduce compares it)."""
    import hashlib

    digest = hashlib.sha256()
    for part, state in sorted(from_folder.state_dicts().items()):  # text_encoder, unet, vae
        for key in sorted(state):
            tensor = state[key].contiguous()
            digest.update(f"{part}.{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
    assert from_folder.fingerprint == digest.hexdigest()


def test_a_pipeline_loaded_narrower_than_stored_exports_the_values_it_holds(tmp_path, from_folder, diffusers_folder):
    """float32 weights loaded as float16 were exported as float32 tensors holding float16-rounded
    values, under no fingerprint of any file. The export is what the pipeline holds: a float16
    copy, with a fingerprint of its own; the same weights loaded as stored export unchanged."""
    assert from_folder.stored_dtype == torch.float32
    half = sdcore.load_pipeline(diffusers_folder, dtype="float16")
    assert half.fingerprint == from_folder.fingerprint  # the source's weights, loaded rounded
    path = tmp_path / "half.safetensors"
    sdcore.export_single_file(half, path)
    assert {t.dtype for t in load_file(str(path)).values() if t.is_floating_point()} == {torch.float16}
    copy = sdcore.load_pipeline(path, dtype="float16")
    assert copy.stored_dtype == torch.float16 and copy.fingerprint != half.fingerprint
    for part, state in half.state_dicts().items():
        assert all(torch.equal(tensor, copy.state_dicts()[part][key]) for key, tensor in state.items()), part
    # Wider than stored (float16 file as float32): the stored dtype and fingerprint come back.
    widened = sdcore.load_pipeline(path, dtype="float32")
    sdcore.export_single_file(widened, tmp_path / "again.safetensors")
    assert sdcore.load_pipeline(tmp_path / "again.safetensors").fingerprint == copy.fingerprint
