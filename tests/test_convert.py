"""sdcore.convert: CompVis single-file layout <-> sdcore parts, checked against diffusers.

Reference: diffusers' own single-file conversion functions (the code `from_single_file` runs) and
diffusers / transformers models built from the same ModelConfig with random weights.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdcore.clip import CLIPTextModel
from sdcore.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from sdcore.convert import (
    CONV1X1,
    CONV1X1_MODULES,
    IGNORED_KEYS,
    CheckpointError,
    LayoutError,
    compvis_to_parts,
    detect_unsupported,
    infer_config,
    infer_config_from_parts,
    mapping_rows,
    mapping_table,
    module_shapes,
    parts_to_compvis,
)
from sdcore.unet import UNet2DConditionModel
from sdcore.vae import AutoencoderKL

from tests.reference import diffusers_models, sdcore_parts, text_encoder_state_dict

CONFIGS = {
    "tiny": ModelConfig.tiny(),
    # 2 levels, attention on the deep level only, 1 layer per level, 2 transformer layers,
    # linear proj_in/proj_out, per-level heads
    "two_levels": ModelConfig(
        unet=UNetConfig(
            block_out_channels=(32, 64),
            attention_levels=(False, True),
            layers_per_block=1,
            num_heads=(2, 4),
            cross_attention_dim=64,
            transformer_layers=2,
            use_linear_projection=True,
        ),
        vae=VAEConfig(block_out_channels=(32, 64), layers_per_block=2),
        text_encoder=TextEncoderConfig(
            vocab_size=1000, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=2
        ),
    ),
    # 4 levels, attention on levels 0 and 2, 3 layers per level, 8 latent channels
    "four_levels": ModelConfig(
        unet=UNetConfig(
            in_channels=8,
            out_channels=8,
            block_out_channels=(32, 32, 64, 64),
            attention_levels=(True, False, True, False),
            layers_per_block=3,
            num_heads=4,
            cross_attention_dim=32,
        ),
        vae=VAEConfig(latent_channels=8, block_out_channels=(32, 64, 64), layers_per_block=3),
        text_encoder=TextEncoderConfig(
            vocab_size=1000, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4
        ),
    ),
}

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT = "cond_stage_model.transformer.text_model."


@functools.lru_cache(maxsize=None)
def _models(name: str):
    return diffusers_models(CONFIGS[name], seed=1234)


def _parts(name: str) -> dict[str, dict[str, torch.Tensor]]:
    return sdcore_parts(*_models(name))


def _sd1_conventions(cfg: ModelConfig) -> ModelConfig:
    """What inference gives back: heads are not in the weights, SD 1.x values are assumed."""
    hidden = cfg.text_encoder.hidden_size
    text_heads = hidden // 64 if hidden % 64 == 0 else 1
    return dataclasses.replace(
        cfg,
        unet=dataclasses.replace(cfg.unet, num_heads=8),
        text_encoder=dataclasses.replace(cfg.text_encoder, num_heads=text_heads),
    )


def _assert_parts_equal(a, b):
    assert set(a) == set(b)
    for part in a:
        assert set(a[part]) == set(b[part]), part
        for key in a[part]:
            assert a[part][key].dtype == b[part][key].dtype, key
            assert torch.equal(a[part][key], b[part][key]), f"{part}:{key}"


def _tiny_compvis() -> dict[str, torch.Tensor]:
    return parts_to_compvis(_parts("tiny"))


# ------------------------------------------------------------------------------------------------
# The table against diffusers / transformers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_table_matches_diffusers_models(name):
    rows = mapping_table(CONFIGS[name])
    parts = _parts(name)
    for part in ("unet", "vae", "text_encoder"):
        expected = {row.key: row.shape for row in rows if row.part == part}
        actual = {key: tuple(t.shape) for key, t in parts[part].items()}
        assert expected == actual, part
    assert len({row.compvis for row in rows}) == len(rows)


@pytest.mark.parametrize("cfg", [ModelConfig.sd15(), ModelConfig.tiny()], ids=["sd15", "tiny"])
def test_table_covers_every_parameter_of_the_meta_built_modules(cfg):
    with torch.device("meta"):
        modules = {
            "unet": UNet2DConditionModel(cfg.unet),
            "vae": AutoencoderKL(cfg.vae),
            "text_encoder": CLIPTextModel(cfg.text_encoder),
        }
    rows = mapping_table(cfg)
    for part, module in modules.items():
        params = {key: tuple(p.shape) for key, p in module.named_parameters()}
        assert {key: tuple(t.shape) for key, t in module.state_dict().items()} == params, part  # no buffers
        assert {row.key: row.shape for row in rows if row.part == part} == params, part
    assert len({row.compvis for row in rows}) == len(rows)
    conv1x1 = sorted(row.compvis for row in rows if row.transform == CONV1X1)
    assert conv1x1 == sorted(f"{VAE}{module}.weight" for module in CONV1X1_MODULES)
    assert all(row.compvis_shape == row.shape + (1, 1) for row in rows if row.transform == CONV1X1)


def test_module_parameter_without_a_compvis_name_is_named():
    cfg = ModelConfig.tiny()
    shapes = module_shapes(cfg)
    shapes["unet"]["down_blocks.0.resnets.0.extra.weight"] = (3,)
    with pytest.raises(LayoutError, match=r"unet:down_blocks\.0\.resnets\.0\.extra\.weight"):
        mapping_rows(cfg, shapes)


def test_sd15_table_matches_diffusers_and_known_single_file_keys():
    cfg = ModelConfig.sd15()
    parts = sdcore_parts(*diffusers_models(cfg, device="meta"))  # shapes only, no memory
    rows = mapping_table(cfg)
    for part in ("unet", "vae", "text_encoder"):
        assert {r.key: r.shape for r in rows if r.part == part} == {k: tuple(t.shape) for k, t in parts[part].items()}
    compvis = parts_to_compvis(parts, cfg)
    shapes = {k: tuple(t.shape) for k, t in compvis.items()}
    assert len(shapes) == 1131  # 686 UNet + 248 VAE + 196 CLIP + position_ids, as in SD 1.5 files
    known = {  # well-known keys of v1-5-pruned-emaonly.safetensors and their shapes
        UNET + "time_embed.0.weight": (1280, 320),
        UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
        UNET + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        UNET + "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        UNET + "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        UNET + "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        UNET + "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        UNET + "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        UNET + "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        UNET + "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        UNET + "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        UNET + "out.2.weight": (4, 320, 3, 3),
        VAE + "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
        VAE + "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        VAE + "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        VAE + "encoder.conv_out.weight": (8, 512, 3, 3),
        VAE + "quant_conv.weight": (8, 8, 1, 1),
        VAE + "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        VAE + "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        VAE + "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        VAE + "decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        TEXT + "embeddings.token_embedding.weight": (49408, 768),
        TEXT + "embeddings.position_embedding.weight": (77, 768),
        TEXT + "embeddings.position_ids": (1, 77),
        TEXT + "encoder.layers.11.mlp.fc1.weight": (3072, 768),
        TEXT + "final_layer_norm.weight": (768,),
    }
    assert {k: shapes.get(k) for k in known} == known
    assert VAE + "decoder.up.0.upsample.conv.weight" not in shapes  # the shallowest level
    assert UNET + "output_blocks.11.1.conv.weight" not in shapes
    config, back = compvis_to_parts(compvis)
    assert config == cfg
    assert {p: set(d) for p, d in back.items()} == {p: set(d) for p, d in parts.items()}


# ------------------------------------------------------------------------------------------------
# Export: diffusers' loaders read back exactly the original tensors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_is_read_back_exactly_by_diffusers_conversion(name):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    unet, vae, _ = _models(name)
    parts = _parts(name)
    compvis = parts_to_compvis(parts)

    expected_text = dict(parts["text_encoder"])
    expected_text["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    for actual, expected in (
        (convert_ldm_unet_checkpoint(compvis, unet.config), parts["unet"]),
        (convert_ldm_vae_checkpoint(compvis, vae.config), parts["vae"]),
        (convert_ldm_clip_checkpoint(compvis), expected_text),
    ):
        assert set(actual) == set(expected)
        for key in expected:
            assert actual[key].dtype == expected[key].dtype, key
            assert torch.equal(actual[key], expected[key]), key


def test_export_loads_with_diffusers_from_single_file(tmp_path):
    """The real user entry points, offline, with local configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    unet, vae, text_encoder = _models("tiny")
    parts = _parts("tiny")
    path = tmp_path / "model.safetensors"
    save_file(parts_to_compvis(parts), path)
    config_dir = tmp_path / "config"
    unet.save_config(config_dir / "unet")
    vae.save_config(config_dir / "vae")
    text_encoder.config.save_pretrained(config_dir / "text_encoder")

    kwargs = dict(config=str(config_dir), local_files_only=True)
    loaded_unet = UNet2DConditionModel.from_single_file(str(path), subfolder="unet", **kwargs)
    loaded_vae = AutoencoderKL.from_single_file(str(path), subfolder="vae", **kwargs)
    loaded_text = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, load_file(path), subfolder="text_encoder", **kwargs
    )
    loaded = {
        "unet": dict(loaded_unet.state_dict()),
        "vae": dict(loaded_vae.state_dict()),
        "text_encoder": text_encoder_state_dict(loaded_text),
    }
    _assert_parts_equal(loaded, parts)


def test_export_layout_details():
    compvis = _tiny_compvis()
    position_ids = compvis[TEXT + "embeddings.position_ids"]
    assert position_ids.dtype == torch.int64
    assert torch.equal(position_ids, torch.arange(77)[None])
    for name in ("q", "k", "v", "proj_out"):
        assert compvis[f"{VAE}decoder.mid.attn_1.{name}.weight"].shape == (64, 64, 1, 1)
        assert compvis[f"{VAE}encoder.mid.attn_1.{name}.bias"].shape == (64,)
    assert all(t.is_contiguous() for t in compvis.values())  # safetensors requires it


# ------------------------------------------------------------------------------------------------
# Import: round trips and config inference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_and_inferred_config(name):
    cfg = CONFIGS[name]
    parts = _parts(name)
    compvis = parts_to_compvis(parts)

    inferred, back = compvis_to_parts(compvis)
    assert inferred == _sd1_conventions(cfg)
    _assert_parts_equal(back, parts)
    assert infer_config(compvis) == inferred
    assert infer_config_from_parts(parts) == inferred

    given, back = compvis_to_parts(compvis, cfg)
    assert given is cfg
    _assert_parts_equal(back, parts)

    again = parts_to_compvis(back, cfg)
    assert set(again) == set(compvis)
    assert all(torch.equal(again[k], compvis[k]) for k in compvis)


def test_conversion_is_pure():
    parts = _parts("tiny")
    before = {p: dict(d) for p, d in parts.items()}
    compvis = parts_to_compvis(parts)
    compvis_before = dict(compvis)
    compvis_to_parts(compvis)
    assert {p: set(d) for p, d in parts.items()} == {p: set(d) for p, d in before.items()}
    assert all(parts[p][k] is before[p][k] for p in parts for k in parts[p])
    assert compvis.keys() == compvis_before.keys()
    assert all(compvis[k] is compvis_before[k] for k in compvis)


def test_safetensors_file_round_trip_keeps_fp16(tmp_path):
    parts = {p: {k: t.half() for k, t in d.items()} for p, d in _parts("tiny").items()}
    path = tmp_path / "tiny-fp16.safetensors"
    save_file(parts_to_compvis(parts), path)
    config, back = compvis_to_parts(load_file(path))
    assert config == _sd1_conventions(CONFIGS["tiny"])
    _assert_parts_equal(back, parts)


def test_ckpt_wrapper_ddpm_buffers_and_stale_position_ids(tmp_path):
    """A Lightning .ckpt: weights under "state_dict", DDPM buffers, float position_ids."""
    compvis = _tiny_compvis()
    for key in IGNORED_KEYS - {"model_ema.decay", "model_ema.num_updates"}:
        compvis.setdefault(key, torch.zeros(3))
    compvis[TEXT + "embeddings.position_ids"] = torch.arange(77, dtype=torch.float32)[None] + 0.3
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": compvis, "global_step": 470000, "epoch": 3}, path)
    _, back = compvis_to_parts(torch.load(path, weights_only=True))
    _assert_parts_equal(back, _parts("tiny"))


def test_legacy_text_encoder_prefix_without_text_model():
    compvis = {
        (k.replace(TEXT, "cond_stage_model.transformer.") if k.startswith(TEXT) else k): v
        for k, v in _tiny_compvis().items()
    }
    assert "cond_stage_model.transformer.embeddings.token_embedding.weight" in compvis
    _, back = compvis_to_parts(compvis)
    _assert_parts_equal(back, _parts("tiny"))


# ------------------------------------------------------------------------------------------------
# EMA
# ------------------------------------------------------------------------------------------------


def _ema_name(key: str) -> str:
    return "model_ema." + key[len("model.") :].replace(".", "")


def _with_ema(compvis: dict, keep_main: bool = True) -> dict:
    out = {k: v for k, v in compvis.items() if keep_main or not k.startswith(UNET)}
    for key, value in compvis.items():
        if key.startswith(UNET):
            out[_ema_name(key)] = value + 1
    out["model_ema.decay"] = torch.tensor(0.9999)
    out["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32)
    return out


def test_ema_selection():
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet_config = _models("tiny")[0].config
    parts = _parts("tiny")
    both = _with_ema(_tiny_compvis())
    assert _ema_name(UNET + "input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"

    _, default = compvis_to_parts(both)  # like A1111 / diffusers: the non-EMA weights
    _assert_parts_equal(default, parts)
    _, non_ema = compvis_to_parts(both, ema=False)
    _assert_parts_equal(non_ema, parts)

    _, ema = compvis_to_parts(both, ema=True)
    reference = convert_ldm_unet_checkpoint(both, unet_config, extract_ema=True)
    assert set(ema["unet"]) == set(reference)
    assert all(torch.equal(ema["unet"][k], reference[k]) for k in reference)
    assert all(torch.equal(ema["unet"][k], parts["unet"][k] + 1) for k in reference)
    _assert_parts_equal({"vae": ema["vae"]}, {"vae": parts["vae"]})

    ema_only = _with_ema(_tiny_compvis(), keep_main=False)
    config, fallback = compvis_to_parts(ema_only)  # no model.diffusion_model.*: the EMA copy
    assert config == _sd1_conventions(CONFIGS["tiny"])
    assert all(torch.equal(fallback["unet"][k], parts["unet"][k] + 1) for k in parts["unet"])


def test_ema_errors():
    with pytest.raises(CheckpointError, match=r"ema=True.*model_ema"):
        compvis_to_parts(_tiny_compvis(), ema=True)
    with pytest.raises(CheckpointError, match=r"ema=False.*model\.diffusion_model"):
        compvis_to_parts(_with_ema(_tiny_compvis(), keep_main=False), ema=False)
    both = _with_ema(_tiny_compvis())
    del both[_ema_name(UNET + "out.2.bias")]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): model_ema\.diffusion_modelout2bias"):
        compvis_to_parts(both, ema=True)
    both = _with_ema(_tiny_compvis())
    both["model_ema.diffusion_modelsomething_else"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): model_ema\.diffusion_modelsomething_else"):
        compvis_to_parts(both)


# ------------------------------------------------------------------------------------------------
# Strictness: every problem is a CheckpointError naming it
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", [False, True], ids=["inferred", "given"])
def test_missing_key(given):
    compvis = _tiny_compvis()
    key = VAE + "encoder.mid.attn_1.q.weight"
    del compvis[key]
    message = r"missing keys \(1\): first_stage_model\.encoder\.mid\.attn_1\.q\.weight"
    with pytest.raises(CheckpointError, match=message) as e:
        compvis_to_parts(compvis, CONFIGS["tiny"] if given else None)
    assert e.value.missing == [key]


def test_missing_key_needed_for_inference():
    compvis = _tiny_compvis()
    del compvis[VAE + "decoder.conv_in.weight"]
    with pytest.raises(CheckpointError, match=r"first_stage_model\.decoder\.conv_in\.weight"):
        compvis_to_parts(compvis)


@pytest.mark.parametrize("given", [False, True], ids=["inferred", "given"])
def test_unexpected_key(given):
    compvis = _tiny_compvis()
    compvis[UNET + "input_blocks.1.0.extra.weight"] = torch.zeros(3)
    compvis["some_adapter.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(2\)") as e:
        compvis_to_parts(compvis, CONFIGS["tiny"] if given else None)
    assert e.value.unexpected == [UNET + "input_blocks.1.0.extra.weight", "some_adapter.weight"]


@pytest.mark.parametrize("given", [False, True], ids=["inferred", "given"])
def test_wrong_shape(given):
    compvis = _tiny_compvis()
    key = UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    compvis[key] = torch.zeros(32, 31)
    message = r"wrong shapes \(1\): .*attn1\.to_q\.weight \(32, 31\) != expected \(32, 32\)"
    with pytest.raises(CheckpointError, match=message):
        compvis_to_parts(compvis, CONFIGS["tiny"] if given else None)


@pytest.mark.parametrize("given", [False, True], ids=["inferred", "given"])
def test_wrong_shape_of_a_conv1x1_weight(given):
    compvis = _tiny_compvis()
    key = VAE + "decoder.mid.attn_1.v.weight"
    compvis[key] = compvis[key].reshape(64, 64)  # a Linear weight where CompVis has a 1x1 conv
    expected = f"{key} (64, 64) != expected (64, 64, 1, 1)"
    with pytest.raises(CheckpointError, match=rf"wrong shapes \(1\): {re.escape(expected)}") as e:
        compvis_to_parts(compvis, CONFIGS["tiny"] if given else None)
    assert e.value.mismatched == [expected]

    parts = {p: dict(d) for p, d in _parts("tiny").items()}
    key = "decoder.mid_block.attentions.0.to_v.weight"
    parts["vae"][key] = parts["vae"][key].reshape(64, 64, 1, 1)  # a 1x1 conv where sdcore has a Linear
    with pytest.raises(CheckpointError) as e:
        parts_to_compvis(parts, CONFIGS["tiny"] if given else None)
    assert e.value.mismatched == [f"vae:{key} (64, 64, 1, 1) != expected (64, 64)"]


def test_not_a_tensor():
    compvis = _tiny_compvis()
    compvis[UNET + "out.2.bias"] = [0.0] * 4
    with pytest.raises(CheckpointError, match=r"out\.2\.bias is a list, not a tensor"):
        compvis_to_parts(compvis)


def test_config_that_does_not_fit():
    with pytest.raises(CheckpointError, match=r"given config .*missing keys .*wrong shapes"):
        compvis_to_parts(_tiny_compvis(), CONFIGS["four_levels"])


def test_parts_errors():
    parts = _parts("tiny")
    broken = {p: dict(d) for p, d in parts.items()}
    del broken["vae"]["decoder.mid_block.attentions.0.to_k.weight"]
    broken["unet"]["extra.weight"] = torch.zeros(1)
    broken["text_encoder"]["text_model.final_layer_norm.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError) as e:
        parts_to_compvis(broken, CONFIGS["tiny"])
    assert e.value.missing == ["vae:decoder.mid_block.attentions.0.to_k.weight"]
    assert e.value.unexpected == ["unet:extra.weight"]
    assert e.value.mismatched == ["text_encoder:text_model.final_layer_norm.bias (5,) != expected (32,)"]
    with pytest.raises(CheckpointError, match="parts must be exactly"):
        parts_to_compvis({"unet": parts["unet"], "vae": parts["vae"]})


# ------------------------------------------------------------------------------------------------
# Other model families are recognised and refused
# ------------------------------------------------------------------------------------------------


def test_valid_checkpoint_is_not_flagged():
    assert detect_unsupported(_tiny_compvis()) is None


def test_refuses_sd2_openclip():
    compvis = {k: v for k, v in _tiny_compvis().items() if not k.startswith("cond_stage_model.")}
    compvis["cond_stage_model.model.token_embedding.weight"] = torch.zeros(49408, 32)
    compvis["cond_stage_model.model.positional_embedding"] = torch.zeros(77, 32)
    with pytest.raises(CheckpointError, match=r"Stable Diffusion 2\.x .*cond_stage_model\.model"):
        compvis_to_parts(compvis)


def test_refuses_sd2_cross_attention_width():
    compvis = _tiny_compvis()
    for name in ("to_k", "to_v"):
        compvis[f"{UNET}middle_block.1.transformer_blocks.0.attn2.{name}.weight"] = torch.zeros(64, 1024)
    compvis[UNET + "middle_block.1.proj_in.weight"] = torch.zeros(64, 64)
    with pytest.raises(CheckpointError, match=r"Stable Diffusion 2\.x .*1024 .*attn2\.to_k\.weight, linear proj_in"):
        compvis_to_parts(compvis)


def test_refuses_sdxl():
    compvis = {k: v for k, v in _tiny_compvis().items() if not k.startswith("cond_stage_model.")}
    compvis["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(8, 32)
    compvis[UNET + "label_emb.0.0.weight"] = torch.zeros(128, 2816)
    with pytest.raises(CheckpointError, match=r"SDXL .*conditioner\.embedders"):
        compvis_to_parts(compvis)


@pytest.mark.parametrize("channels, what", [(9, "inpainting"), (8, "instruct-pix2pix"), (5, "depth")])
@pytest.mark.parametrize("ema", [False, True], ids=["main", "ema-only"])
def test_refuses_unet_input_variants(channels, what, ema):
    compvis = _tiny_compvis()
    compvis[UNET + "input_blocks.0.0.weight"] = torch.zeros(32, channels, 3, 3)
    if ema:
        compvis = _with_ema(compvis, keep_main=False)
    with pytest.raises(CheckpointError, match=rf"{what} .*input_blocks.0.0.weight has shape \(32, {channels}, 3, 3\)"):
        compvis_to_parts(compvis)


def test_refuses_v_prediction_marker():
    compvis = _tiny_compvis()
    compvis["v_pred"] = torch.tensor([])
    with pytest.raises(CheckpointError, match=r"v-prediction .*'v_pred'"):
        compvis_to_parts(compvis)


def test_reference_models_leave_global_rng_alone():
    """tests.reference.diffusers_models is seeded by its argument only."""
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    diffusers_models(CONFIGS["tiny"], seed=3, device="meta")
    assert torch.equal(torch.rand(3), expected)
