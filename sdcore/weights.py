"""Loading SD 1.x weights into sdcore: diffusers folders, CompVis/A1111 single files, built-ins.

Nothing here executes pickled code: safetensors, or `torch.load(weights_only=True)`.
Every load is strict: the state dict must match the model key for key and shape for shape,
and a mismatch is a `CheckpointError` naming the key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from . import rules
from .clip import CLIPTextModel
from .config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from .convert import TEXT_PREFIX, CheckpointError, compvis_to_parts, parts_to_compvis
from .devices import compute_device
from .pipeline import Pipeline
from .rules import BUILTIN_DIR, WEIGHT_FILE_SUFFIXES, builtin_names
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL

CONFIG_METADATA_KEY = "sdcore_config"
PARTS = ("text_encoder", "unet", "vae")
# Saved by older transformers versions; a constant, not a weight.
IGNORED_TEXT_KEYS = ("text_model.embeddings.position_ids",)

# A model trained on a small vocabulary (builtin:shapes) has learned a few dozen rows of the
# 49408-row token table. Such a file may store just those rows plus their ids; the rows left out
# are zero. That keeps a 64-wide text encoder's table at kilobytes instead of 6 MB (float16).
TOKEN_TABLE_KEY = TEXT_PREFIX + "text_model.embeddings.token_embedding.weight"
PACKED_ROWS_KEY = TEXT_PREFIX + "text_model.embeddings.token_embedding.packed_rows"
PACKED_IDS_KEY = TEXT_PREFIX + "text_model.embeddings.token_embedding.packed_ids"

CLIP_VOCAB_SIZE = 49408  # the tokenizer's (sdcore/tokenizer.py); every SD 1.x text encoder's

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """None/"auto" -> float16 on CUDA, float32 elsewhere; names and torch dtypes pass through."""
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")


def build_models(config: ModelConfig) -> dict[str, torch.nn.Module]:
    return {
        "unet": UNet2DConditionModel(config.unet),
        "vae": AutoencoderKL(config.vae),
        "text_encoder": CLIPTextModel(config.text_encoder),
    }


def fingerprint(parts: dict[str, dict[str, torch.Tensor]]) -> str:
    """sha256 over every tensor in canonical order (part, then key), as stored (dtype included).

    The same weights give the same fingerprint whichever layout they were loaded from.
    """
    digest = hashlib.sha256()
    for part in PARTS:
        for key in sorted(parts[part]):
            tensor = parts[part][key].detach().cpu().contiguous()
            digest.update(f"{part}.{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
            if tensor.numel():  # hashed in place: no copy of the bytes
                digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def _check_and_load(model: torch.nn.Module, state: dict[str, torch.Tensor], part: str, owned: bool) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{part}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(f"{part}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{part}: {key!r} has shape {tuple(state[key].shape)}, the config expects {tuple(tensor.shape)}"
            )
    # The model gets memory of its own, contiguous and 64-byte aligned: tensors in a mapped file
    # or pickle buffer can sit at any offset, and CPU kernels take different (float-different)
    # paths on differently aligned memory — measured: one pixel level between the same weights
    # loaded from a folder and from a single file. `owned` tensors (fresh from a reader, nobody
    # else holds them) are assigned as they are when already so; anything else is copied.
    # (Assigning, not copying into `to_empty` parameters: `to_empty` from meta imports sympy,
    # half a second of every worker's start.)
    fresh = {
        key: tensor if owned and _is_own_memory(tensor) else tensor.clone(memory_format=torch.contiguous_format)
        for key, tensor in state.items()
    }
    model.load_state_dict(fresh, strict=True, assign=True)


def _is_own_memory(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous() and tensor.data_ptr() % 64 == 0 and tensor.device.type == "cpu"


def assemble(
    config: ModelConfig,
    parts: dict[str, dict[str, torch.Tensor]],
    *,
    source: str,
    device: str | torch.device = "cpu",
    dtype: Any = None,
    owned: bool = False,
) -> Pipeline:
    """Strictly load `parts` into freshly built models and wrap them in a Pipeline.

    The models copy the tensors unless `owned` (the caller hands them over: nobody else holds
    or changes them), which saves a copy of the whole checkpoint."""
    device = compute_device(device)  # ValueError for meta, a CUDA this torch lacks, ...
    target = resolve_dtype(dtype, device)
    parts = dict(parts)
    parts["text_encoder"] = {k: v for k, v in parts["text_encoder"].items() if k not in IGNORED_TEXT_KEYS}
    # Hash on a second thread while the models load: both release the GIL, and hashing 3.4 GB
    # of SD 1.5 took as long as loading it.
    with ThreadPoolExecutor(1, thread_name_prefix="sdcore-fingerprint") as pool:
        fp_pending = pool.submit(fingerprint, parts)
        with torch.device("meta"):
            models = build_models(config)
        for part, model in models.items():
            _check_and_load(model, parts[part], part, owned)
            model.to(device=device, dtype=target)
        fp = fp_pending.result()
    stored = {part: {k: t.dtype for k, t in sd.items() if t.is_floating_point()} for part, sd in parts.items()}
    return Pipeline(
        config,
        models["unet"],
        models["vae"],
        models["text_encoder"],
        fingerprint=fp,
        source=source,
        stored_dtypes=stored,
    )


# ---------------------------------------------------------------------------------------------
# Reading files


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a .safetensors file in its own freshly allocated memory, and the metadata.

    safetensors validates the file; the bytes are then read straight into new tensors, one copy
    from the file: `load_file` maps the file and a copy out of the mapping (which `assemble`
    needs: see `_check_and_load`) took 2.5x as long at SD 1.5 size."""
    try:
        with safe_open(str(path), framework="pt") as handle:  # validates header and offsets
            metadata = handle.metadata() or {}
        with open(path, "rb", buffering=0) as file:
            (header_bytes,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(header_bytes))
            data_start = 8 + header_bytes
            tensors = {}
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                if entry["dtype"] not in SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{path}: tensor {key!r} has dtype {entry['dtype']}, not one sdcore loads")
                begin, end = entry["data_offsets"]
                tensor = torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
                if end - begin != tensor.numel() * tensor.element_size():
                    raise CheckpointError(f"{path}: tensor {key!r} has {end - begin} bytes for shape {entry['shape']}")
                if tensor.numel():
                    file.seek(data_start + begin)
                    if file.readinto(tensor.view(-1).view(torch.uint8).numpy()) != end - begin:
                        raise CheckpointError(f"{path}: truncated inside tensor {key!r}")
                tensors[key] = tensor
        return tensors, metadata
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def _read_pickle_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's weights-only unpickler raises many kinds on a bad file
        raise _unreadable_checkpoint(path, exc) from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    return tensors


def _unreadable_checkpoint(path: Path, exc: Exception) -> CheckpointError:
    """Why `torch.load(weights_only=True)` refused a file: pickled code (a global it blocks), a
    safetensors file under another suffix, or a file that is no PyTorch checkpoint at all."""
    blocked = re.search(r"\bGLOBAL ([\w.]+)", str(exc))
    if blocked:
        return CheckpointError(
            f"{path}: refused to load — the file holds pickled objects other than tensors "
            f"({blocked.group(1).rstrip('.')}; loading it could run arbitrary code). Convert it to .safetensors first."
        )
    try:
        with open(path, "rb") as file:
            head = file.read(9)
    except OSError:
        head = b""
    if len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK"):
        return CheckpointError(f"{path}: a safetensors file under another suffix: name it .safetensors")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    marker = [i for i, line in enumerate(lines) if "WeightsUnpickler error" in line]
    first = lines[marker[0] + 1] if marker and marker[0] + 1 < len(lines) else (lines[0] if lines else "")
    reason = "empty file" if not head else ("truncated?" if head.startswith(b"PK") else "not a PyTorch checkpoint")
    detail = f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__
    return CheckpointError(f"{path}: not a readable checkpoint ({reason}; {detail})")


def _read_tensor_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_pickle_checkpoint(path), {}


def _unpack_token_table(state: dict[str, torch.Tensor], config: ModelConfig | None, path: Path) -> None:
    """Replace a packed token table (rows + ids, see PACKED_ROWS_KEY) by the full one, in place."""
    if PACKED_ROWS_KEY not in state:
        return
    rows, ids = state.pop(PACKED_ROWS_KEY), state.pop(PACKED_IDS_KEY, None)
    if config is None or ids is None or TOKEN_TABLE_KEY in state:
        raise CheckpointError(
            f"{path}: a packed token table needs its ids, the config in the metadata, and no full table beside it"
        )
    vocab = config.text_encoder.vocab_size
    if (
        ids.dim() != 1
        or rows.shape != (len(ids), config.text_encoder.hidden_size)
        or (len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab))
    ):
        raise CheckpointError(
            f"{path}: packed token table has rows {tuple(rows.shape)} and "
            f"ids {tuple(ids.shape)}, not matching a {vocab}-token vocabulary"
        )
    table = torch.zeros(vocab, rows.shape[1], dtype=rows.dtype)
    table[ids.long()] = rows
    state[TOKEN_TABLE_KEY] = table


def load_single_file(path: Path) -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]]]:
    """A CompVis/A1111 single-file checkpoint (.safetensors, .ckpt) -> config and parts."""
    state, metadata = _read_tensor_file(path)
    config = None
    if CONFIG_METADATA_KEY in metadata:
        config = ModelConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
    _unpack_token_table(state, config, path)
    return compvis_to_parts(state, config)


# ---------------------------------------------------------------------------------------------
# diffusers folders


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"diffusers folder is missing {path}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc


# Config keys of SD 1.x's diffusers parts that sdcore's models do not read, with the values SD 1.x
# uses (also diffusers' defaults). Another value changes the network, so it is refused rather
# than silently run as SD 1.x.
FIXED_UNET_KEYS: dict[str, tuple[Any, ...]] = {
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "downsample_padding": (1,),
    "act_fn": ("silu",),
    "center_input_sample": (False,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "mid_block_scale_factor": (1.0,),
    "resnet_time_scale_shift": ("default",),
    "time_embedding_type": ("positional",),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "upcast_attention": (False,),
    "time_cond_proj_dim": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "num_class_embeds": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_embedding_dim": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
}
FIXED_VAE_KEYS: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu",),
    "shift_factor": (None, 0.0),
    "latents_mean": (None,),
    "latents_std": (None,),
    "use_quant_conv": (True,),
    "use_post_quant_conv": (True,),
    "mid_block_add_attention": (True,),
}
FIXED_SCHEDULER_KEYS: dict[str, tuple[Any, ...]] = {  # the noise schedule the UNet was trained on
    "prediction_type": ("epsilon",),
    "num_train_timesteps": (1000,),
    "beta_schedule": ("scaled_linear",),
    "beta_start": (0.00085,),
    "beta_end": (0.012,),
    "trained_betas": (None,),
}


# Of those, the keys diffusers' UNet2DConditionModel also takes as a list with one value per down
# block (`bool | tuple[bool]` in its signature): a list repeating SD 1.x's value is SD 1.x's network.
# upcast_attention is a plain bool there (a list would be truthy: upcast), so it stays one value.
PER_BLOCK_FIXED_KEYS = ("only_cross_attention",)

# Config floats are compared to SD 1.x's with this relative tolerance: a value computed or written
# out by another tool (0.012000000000000002 for 0.012) is the same setting, a different one is not.
FLOAT_REL_TOL = 1e-9


def _same_value(value: Any, sd_value: Any) -> bool:
    """Whether a config value is SD 1.x's `sd_value`: a float setting up to float noise (an int
    or float in the JSON), anything else equal (an integer setting takes 1000.0, not 1000.0000001)."""
    if isinstance(sd_value, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return math.isclose(value, sd_value, rel_tol=FLOAT_REL_TOL)
    return value == sd_value


def _is_sd_value(key: str, value: Any, allowed: tuple[Any, ...]) -> bool:
    """Whether `value` is one of SD 1.x's `allowed` values for `key`; for a per-block key, a
    non-empty list of them too (checked one entry per down block by `_unet_config`)."""
    entries = value if key in PER_BLOCK_FIXED_KEYS and isinstance(value, list) and value else [value]
    return all(any(_same_value(entry, sd_value) for sd_value in allowed) for entry in entries)


def _refuse_other_values(cfg: dict, fixed: dict[str, tuple[Any, ...]], where: Path) -> None:
    """A CheckpointError naming every key of `cfg` whose value SD 1.x does not use."""
    other = [
        f"{key}={cfg[key]!r}"
        for key, allowed in fixed.items()
        if key in cfg and not _is_sd_value(key, cfg[key], allowed)
    ]
    if other:
        raise CheckpointError(f"{where}: not an SD 1.x model: {', '.join(other)} (sdcore runs SD 1.x's values only)")


def _one_for_all_blocks(cfg: dict, key: str, default: Any, blocks: int | None, where: Path) -> Any:
    """`cfg[key]`, which diffusers also takes as a list with one entry per down block (`blocks` of
    them; None: diffusers does not check the length): sdcore's UNet has one value for all blocks,
    so such a list must repeat one value."""
    value = cfg.get(key, default)
    if isinstance(value, list):
        wrong_length = blocks is not None and len(value) != blocks
        if not value or wrong_length or any(isinstance(entry, list) or entry != value[0] for entry in value):
            raise CheckpointError(
                f"{where}: per-block {key} {value} unsupported (sdcore runs one value for all down blocks)"
            )
        value = value[0]
    return value


def _unet_config(cfg: dict, where: Path) -> UNetConfig:
    if cfg.get("in_channels", 4) != 4:
        raise CheckpointError(
            f"{where}: UNet has {cfg['in_channels']} input channels — an inpainting or "
            "instruct-pix2pix model; sdcore runs SD 1.x txt2img/img2img models only"
        )
    if cfg.get("addition_embed_type") or cfg.get("class_embed_type"):
        raise CheckpointError(f"{where}: UNet has extra embeddings — an SDXL-style model, not SD 1.x")
    down = cfg.get("down_block_types", [])
    cross_attention_dim = _one_for_all_blocks(cfg, "cross_attention_dim", 768, len(down), where)
    if cross_attention_dim in (1024, 2048):
        raise CheckpointError(f"{where}: cross_attention_dim {cross_attention_dim} — an SD 2.x/SDXL model, not SD 1.x")
    kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if any(block not in kinds for block in down):
        raise CheckpointError(f"{where}: unsupported down_block_types {down}")
    attention = tuple(kinds[block] for block in down)
    up_kinds = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
    up = cfg.get("up_block_types", [])
    if tuple(up_kinds.get(block) for block in up) != tuple(reversed(attention)):
        raise CheckpointError(f"{where}: up_block_types {up} do not mirror {down}")
    layers = _one_for_all_blocks(cfg, "transformer_layers_per_block", 1, None, where)
    for key in PER_BLOCK_FIXED_KEYS:
        if isinstance(cfg.get(key), list) and len(cfg[key]) != len(down):
            raise CheckpointError(f"{where}: {key}={cfg[key]!r} needs one entry per down block ({len(down)})")
    fixed = dict(cfg)
    if cfg.get("time_embedding_dim") is not None and cfg["time_embedding_dim"] == 4 * cfg["block_out_channels"][0]:
        fixed["time_embedding_dim"] = None  # diffusers' default (block_out_channels[0] * 4), written out
    _refuse_other_values(fixed, FIXED_UNET_KEYS, where)
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    return UNetConfig(
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        block_out_channels=tuple(cfg["block_out_channels"]),
        attention_levels=attention,
        layers_per_block=_one_for_all_blocks(cfg, "layers_per_block", 2, len(down), where),
        num_heads=tuple(heads) if isinstance(heads, list) else heads,
        cross_attention_dim=cross_attention_dim,
        transformer_layers=layers,
        norm_num_groups=cfg.get("norm_num_groups", 32),
        norm_eps=cfg.get("norm_eps", 1e-5),
        use_linear_projection=cfg.get("use_linear_projection", False),
    )


def _vae_config(cfg: dict, where: Path) -> VAEConfig:
    _refuse_other_values(cfg, FIXED_VAE_KEYS, where)
    return VAEConfig(
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        latent_channels=cfg.get("latent_channels", 4),
        block_out_channels=tuple(cfg["block_out_channels"]),
        layers_per_block=cfg.get("layers_per_block", 2),
        norm_num_groups=cfg.get("norm_num_groups", 32),
        scaling_factor=cfg.get("scaling_factor", 0.18215),
    )


def _text_config(cfg: dict, where: Path) -> TextEncoderConfig:
    if cfg.get("architectures") not in (None, ["CLIPTextModel"]):
        raise CheckpointError(f"{where}: a {cfg['architectures']} text encoder, not SD 1.x's CLIPTextModel")
    return TextEncoderConfig(
        vocab_size=cfg.get("vocab_size", 49408),
        hidden_size=cfg.get("hidden_size", 768),
        intermediate_size=cfg.get("intermediate_size", 3072),
        num_layers=cfg.get("num_hidden_layers", 12),
        num_heads=cfg.get("num_attention_heads", 12),
        max_position_embeddings=cfg.get("max_position_embeddings", 77),
        hidden_act=cfg.get("hidden_act", "quick_gelu"),
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
    )


WEIGHT_SUFFIXES = (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin")


def _read_part_weights(folder: Path, stems: tuple[str, ...]) -> dict[str, torch.Tensor]:
    for stem in stems:
        for suffix in WEIGHT_SUFFIXES:
            path = folder / f"{stem}{suffix}"
            if path.exists():
                return _read_tensor_file(path)[0]
    names = [stem + suffix for stem in stems for suffix in WEIGHT_SUFFIXES]
    if any(folder.glob("*.index.json")):  # save_pretrained(max_shard_size=...) splits big parts
        raise CheckpointError(
            f"{folder}: weights saved in shards (*.index.json), which sdcore does not read; save the part "
            f"unsharded (save_pretrained with a larger max_shard_size) as one of {', '.join(names)}"
        )
    raise CheckpointError(f"{folder}: no weights file (one of {', '.join(names)})")


# The VAE's mid-block attention as diffusers named it before 0.14; many published SD 1.x folders
# still hold these names (diffusers renames them on load).
LEGACY_VAE_ATTENTION = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
LEGACY_VAE_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _modern_vae_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def rename(key: str) -> str:
        match = LEGACY_VAE_ATTENTION.match(key)
        if not match:
            return key
        return f"{match.group(1)}{LEGACY_VAE_NAMES[match.group(2)]}.{key[match.end() :]}"

    return {rename(key): tensor for key, tensor in state.items()}


def load_diffusers_folder(folder: Path) -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]]]:
    if (folder / "text_encoder_2").exists():
        raise CheckpointError(f"{folder}: has text_encoder_2 — an SDXL model, not SD 1.x")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if scheduler.exists():
        schedule = _read_json(scheduler)
        if schedule.get("prediction_type") == "v_prediction":
            raise CheckpointError(f"{folder}: v-prediction scheduler — an SD 2.x model, not SD 1.x")
        _refuse_other_values(schedule, FIXED_SCHEDULER_KEYS, scheduler)
    try:
        config = ModelConfig(
            unet=_unet_config(_read_json(folder / "unet" / "config.json"), folder / "unet"),
            vae=_vae_config(_read_json(folder / "vae" / "config.json"), folder / "vae"),
            text_encoder=_text_config(_read_json(folder / "text_encoder" / "config.json"), folder / "text_encoder"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{folder}: config not understood ({exc})") from exc
    text = _read_part_weights(folder / "text_encoder", ("model", "pytorch_model"))
    parts = {
        "unet": _read_part_weights(folder / "unet", ("diffusion_pytorch_model",)),
        "vae": _modern_vae_names(_read_part_weights(folder / "vae", ("diffusion_pytorch_model",))),
        # transformers >= 5 saves CLIPTextModel without its `text_model.` prefix; older
        # releases (and every published SD 1.x folder) keep it.
        "text_encoder": {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in text.items()},
    }
    return config, parts


# ---------------------------------------------------------------------------------------------
# Built-in models


def random_parts(config: ModelConfig, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Deterministic random weights: every tensor drawn from one generator in key order.

    Linear/conv weights ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default scale), norm
    weights 1, biases 0, embeddings N(0, 0.02) — so activations stay finite through the network.
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.device("meta"):
        models = build_models(config)
    parts = {}
    for part in PARTS:
        state = {}
        for key, meta in sorted(models[part].state_dict().items()):
            if key.endswith("bias"):
                tensor = torch.zeros(meta.shape)
            elif "norm" in key:
                tensor = torch.ones(meta.shape)
            elif "embedding" in key and "time_embedding" not in key:
                tensor = torch.randn(meta.shape, generator=generator) * 0.02
            else:
                bound = 1.0 / (meta[0].numel() ** 0.5)
                tensor = (torch.rand(meta.shape, generator=generator) * 2 - 1) * bound
            state[key] = tensor
        parts[part] = state
    return parts


def load_builtin(name: str) -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]]]:
    if name == "tiny":
        config = ModelConfig.tiny()
        return config, random_parts(config, seed=0)
    path = BUILTIN_DIR / name / "model.safetensors"
    if not path.exists():
        raise ValueError(f"unknown built-in model {name!r}; available: {', '.join(builtin_names())}")
    return load_single_file(path)


# ---------------------------------------------------------------------------------------------
# The entry point


def load_pipeline(weights: str | os.PathLike, device: str | torch.device = "cpu", dtype: Any = None) -> Pipeline:
    """Load an SD 1.x model: `builtin:NAME`, a diffusers folder, or a .safetensors/.ckpt file."""
    weights = str(weights)
    device = compute_device(device)  # a device that cannot compute is refused before any reading
    if weights.startswith("builtin:"):
        config, parts = load_builtin(weights.split(":", 1)[1])
    else:
        path = Path(weights)
        if not path.exists():
            raise FileNotFoundError(f"weights not found: {weights}")
        if path.is_dir():
            config, parts = load_diffusers_folder(path)
        elif path.suffix in WEIGHT_FILE_SUFFIXES:
            config, parts = load_single_file(path)
        else:
            raise CheckpointError(rules.weights_problem(weights) or f"{weights}: unknown weights layout")
    vocab = config.text_encoder.vocab_size
    if vocab != CLIP_VOCAB_SIZE:
        raise CheckpointError(
            f"{weights}: the text encoder has {vocab} token embeddings; SD 1.x uses CLIP's "
            f"{CLIP_VOCAB_SIZE}-token vocabulary, the only one sdcore's tokenizer has (tokens added by "
            "textual inversion are not supported)"
        )
    # The readers return tensors of their own (see _read_safetensors): hand them over.
    return assemble(config, parts, source=weights, device=device, dtype=dtype, owned=True)


def export_single_file(pipe: Pipeline, path: str | os.PathLike, token_rows: list[int] | None = None) -> None:
    """Write the pipeline's weights as one CompVis-layout .safetensors file.

    A1111, ComfyUI and diffusers' `from_single_file` read it; sdcore reads back the exact
    config from the file's metadata (heads cannot be inferred from shapes alone).

    Each floating tensor is written in the dtype it was stored in where the pipeline holds it
    exactly (the same dtype, or a wider one: a float16 file loaded as float32 is written as
    float16 again, the same values; a file of mixed dtypes keeps its mix), so the export has the
    source's fingerprint and reproduce and resume accept it in place of the source. A tensor held
    in a narrower dtype than stored (a float32 file loaded with dtype="float16") was rounded when
    it was loaded: it is written as held, float16, the values the pipeline computes with. That
    export is a half-precision copy, with a fingerprint of its own (`pipe.fingerprint` stays the
    source's): load the source with its stored dtype to export it unchanged.

    `token_rows`: store only these rows of the token table (sdcore-only file: other tools
    expect the full table). Loading sets every other row to zero, so only prompts made of
    these tokens give the same text embeddings as `pipe`.
    """
    stored = pipe.stored_dtypes or {}

    def as_stored(part: str, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor in its stored dtype where the held one has every stored value (the held
        dtype is that one or wider), else as held: rounding it back up would write values the
        source never had, in the source's dtype (float32 bits of float16 values)."""
        tensor = tensor.detach().cpu()
        dtype = stored.get(part, {}).get(key)
        held = tensor.dtype
        if dtype is not None and tensor.is_floating_point() and torch.promote_types(dtype, held) == held:
            tensor = tensor.to(dtype)
        return tensor.contiguous()

    parts = {part: {k: as_stored(part, k, v) for k, v in sd.items()} for part, sd in pipe.state_dicts().items()}
    state = {k: v.contiguous() for k, v in parts_to_compvis(parts, config=pipe.config).items()}
    if token_rows is not None:
        ids = torch.tensor(sorted(set(token_rows)), dtype=torch.int64)
        state[PACKED_ROWS_KEY] = state.pop(TOKEN_TABLE_KEY)[ids].contiguous()
        state[PACKED_IDS_KEY] = ids
    metadata = {CONFIG_METADATA_KEY: pipe.config.to_json(), "format": "pt"}
    tmp = Path(f"{path}.tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)
