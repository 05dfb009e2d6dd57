"""The conversion itself: CompVis / A1111 single file <-> sdcore parts, both pure dict -> dict.

`compvis_to_parts` refuses other model families (`detect_unsupported`), picks the UNet copy to
read (trained or EMA: `choose_sources`), infers the config unless given, then walks the mapping
table: every table key must be in the file with exactly its shape, and every key of the file
must be the table's, the UNet copy not chosen, or on `IGNORED_KEYS`. `parts_to_compvis` walks
the table the other way and adds CLIP's position_ids. Problems are collected and raised together
as one `CheckpointError` naming the keys. Inputs are never modified; output tensors share
storage with the input (a reshape is a view), nothing is copied.
"""

from __future__ import annotations

from typing import Mapping

import torch

from sdcore.config import ModelConfig

from .detect import detect_unsupported
from .errors import CheckpointError, raise_if_problems
from .infer import infer_config, infer_config_from_parts
from .layouts import CONV1X1, IGNORED_KEYS, PARTS, POSITION_IDS, check_part_names, ema_key, mapping_table
from .sources import choose_sources, source_key, unwrap


def _config_note(subject: str, config: ModelConfig, inferred: bool) -> str:
    u = config.unet
    source = "inferred" if inferred else "given"
    return (
        f"{subject} do not match the SD 1.x layout for the {source} config "
        f"(UNet {u.block_out_channels}, {u.layers_per_block} layers/level, attention {u.attention_levels})"
    )


def compvis_to_parts(
    sd: Mapping[str, torch.Tensor], config: ModelConfig | None = None, *, ema: bool | None = None
) -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]]]:
    """CompVis / A1111 single-file state dict -> (config, {"unet", "vae", "text_encoder"} parts).

    `config` None infers it from the shapes (`infer_config`). `ema` None reads the UNet from
    model.diffusion_model.* when present (as A1111 and diffusers do), else from the EMA copy;
    True / False force the EMA / non-EMA copy. The copy not chosen is checked for unknown keys and
    otherwise ignored.
    """
    sd = unwrap(sd)
    problem = detect_unsupported(sd)
    if problem:
        raise CheckpointError(problem)
    use_ema, legacy_text = choose_sources(sd, ema)
    inferred = config is None
    if config is None:
        config = infer_config(sd, ema=use_ema)

    rows = mapping_table(config)
    if use_ema:
        # EMA names drop the dots; refuse a config for which that would be ambiguous
        names = [ema_key(row.compvis) for row in rows if row.part == "unet"]
        if len(set(names)) != len(names):
            raise CheckpointError("EMA key names (dots removed) are ambiguous for this config; use ema=False")
    parts: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS}
    missing, mismatched, used = [], [], set()
    for row in rows:
        key = source_key(row.compvis, use_ema, legacy_text)
        value = sd.get(key)
        if value is None:
            missing.append(key)
            continue
        used.add(key)
        if not isinstance(value, torch.Tensor):
            mismatched.append(f"{key} is a {type(value).__name__}, not a tensor")
        elif tuple(value.shape) != row.compvis_shape:
            mismatched.append(f"{key} {tuple(value.shape)} != expected {row.compvis_shape}")
        else:
            # CONV1X1: (O, I, 1, 1) -> (O, I)
            parts[row.part][row.key] = value.reshape(row.shape) if row.transform == CONV1X1 else value

    # The UNet copy not chosen: its keys are known (and ignored) if they are the table's.
    other_copy = {(ema_key(r.compvis) if not use_ema else r.compvis) for r in rows if r.part == "unet"}
    unexpected = [key for key in sd if key not in used and key not in IGNORED_KEYS and key not in other_copy]
    raise_if_problems(_config_note("checkpoint keys", config, inferred), missing, unexpected, mismatched)
    return config, parts


def parts_to_compvis(
    parts: Mapping[str, Mapping[str, torch.Tensor]], config: ModelConfig | None = None
) -> dict[str, torch.Tensor]:
    """sdcore parts -> the CompVis single-file layout that A1111, ComfyUI and diffusers'
    `from_single_file` load (VAE attention as 1x1 convs, CLIP under
    cond_stage_model.transformer.text_model.*, int64 position_ids included).

    `config` None infers it from the parts' shapes; either way every key and shape is checked.
    """
    check_part_names(parts)
    inferred = config is None
    if config is None:
        config = infer_config_from_parts(parts)
    rows = mapping_table(config)
    out: dict[str, torch.Tensor] = {}
    missing, mismatched = [], []
    for row in rows:
        value = parts[row.part].get(row.key)
        if value is None:
            missing.append(f"{row.part}:{row.key}")
        elif not isinstance(value, torch.Tensor):
            mismatched.append(f"{row.part}:{row.key} is a {type(value).__name__}, not a tensor")
        elif tuple(value.shape) != row.shape:
            mismatched.append(f"{row.part}:{row.key} {tuple(value.shape)} != expected {row.shape}")
        else:
            # CONV1X1: (O, I) -> (O, I, 1, 1)
            out[row.compvis] = value.reshape(row.compvis_shape) if row.transform == CONV1X1 else value
    expected = {(row.part, row.key) for row in rows}
    unexpected = [f"{part}:{key}" for part in PARTS for key in parts[part] if (part, key) not in expected]
    raise_if_problems(_config_note("parts", config, inferred), missing, unexpected, mismatched)
    # transformers' CLIPTextModel keeps position_ids as a buffer; single-file loaders expect it.
    # (T,) -> (1, T), int64
    out[POSITION_IDS] = torch.arange(config.text_encoder.max_position_embeddings, dtype=torch.int64)[None]
    return out
