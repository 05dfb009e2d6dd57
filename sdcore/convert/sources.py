"""Where one particular single file keeps the mapping table's tensors.

Files differ in three ways that do not change the table: a Lightning `.ckpt` wraps the weights
under "state_dict"; the UNet may be there twice, trained (model.diffusion_model.*) and EMA
(model_ema.*, dots removed), or only as the EMA copy; older files name the text encoder without
`text_model.`. `choose_sources` decides which UNet copy to read and which text prefix the file
uses, `source_key` turns a table key into this file's key.
"""

from __future__ import annotations

from typing import Mapping

from .errors import CheckpointError
from .layouts import EMA_PREFIX, IGNORED_KEYS, LEGACY_TEXT_PREFIX, TEXT_PREFIX, UNET_PREFIX, ema_key


def unwrap(sd: Mapping[str, object]) -> Mapping[str, object]:
    """A Lightning `.ckpt` keeps the weights under "state_dict" (beside global_step, epoch...)."""
    inner = sd.get("state_dict")
    return inner if isinstance(inner, Mapping) else sd


def choose_sources(sd: Mapping[str, object], ema: bool | None) -> tuple[bool, bool]:
    """(read the UNet from the EMA copy?, text encoder under the legacy prefix?).

    `ema` None reads model.diffusion_model.* when present (as A1111 and diffusers do), else the
    EMA copy; True / False force the EMA / non-EMA copy and fail if the file lacks it.
    """
    has_main = any(key.startswith(UNET_PREFIX) for key in sd)
    has_ema = any(key.startswith(EMA_PREFIX) and key not in IGNORED_KEYS for key in sd)
    if ema is True and not has_ema:
        raise CheckpointError("ema=True but the checkpoint has no EMA UNet weights (model_ema.*)")
    if ema is False and not has_main:
        raise CheckpointError(f"ema=False but the checkpoint has no {UNET_PREFIX}* UNet weights")
    if not has_main and not has_ema:
        raise CheckpointError(f"no UNet weights in the checkpoint (expected {UNET_PREFIX}* or {EMA_PREFIX}*)")
    use_ema = ema if ema is not None else not has_main
    legacy_text = (LEGACY_TEXT_PREFIX + "embeddings.token_embedding.weight") in sd
    return use_ema, legacy_text


def source_key(key: str, use_ema: bool, legacy_text: bool) -> str:
    """Where the table's CompVis `key` is found in this particular file."""
    if use_ema and key.startswith(UNET_PREFIX):
        return ema_key(key)
    if legacy_text and key.startswith(TEXT_PREFIX + "text_model."):
        return LEGACY_TEXT_PREFIX + key[len(TEXT_PREFIX + "text_model.") :]
    return key
