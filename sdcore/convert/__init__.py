"""Strict dict -> dict conversion between CompVis / A1111 single-file checkpoints and sdcore parts.

sdcore's modules name their parameters like diffusers and transformers do, so a model is three
"parts", each a flat state dict:

    {"unet": {...}, "vae": {...}, "text_encoder": {...}}

    unet          diffusers UNet2DConditionModel keys   (conv_in.weight, down_blocks.0.resnets.0...)
    vae           diffusers AutoencoderKL keys          (encoder.down_blocks.0..., to_q/to_k/to_v)
    text_encoder  transformers CLIPTextModel keys       (text_model.embeddings.token_embedding.weight...)
                  without the non-persistent text_model.embeddings.position_ids buffer

A single-file checkpoint (the original CompVis `ldm` layout, written by A1111, ComfyUI and
`diffusers` exports) holds the same tensors under other names:

    model.diffusion_model.*                      UNet (time_embed, input_blocks, middle_block, ...)
    model_ema.*                                  optional EMA copy of the UNet, dots removed
                                                 (model_ema.diffusion_modelinput_blocks00weight)
    first_stage_model.*                          VAE (encoder.down.0.block.0, decoder.up.3, mid.attn_1)
    cond_stage_model.transformer.text_model.*    CLIP text encoder (older files: without text_model.)

The modules of this package, one idea each:

    layouts.py     the mapping table: key names of a single file, the sdcore -> CompVis module
                   renaming and the shape transforms; parameter names and shapes come from
                   sdcore's modules built on the meta device (`mapping_table(config)`)
    sources.py     where one particular file keeps the table's tensors (EMA copy, legacy prefix)
    detect.py      other model families (SD 2.x, SDXL, inpainting, ...) recognised and refused
    infer.py       the `ModelConfig` of a checkpoint or of parts, from tensor shapes
    conversion.py  `compvis_to_parts`, `parts_to_compvis`
    errors.py      `CheckpointError`, naming the missing, unexpected and mis-shaped keys

Both directions are strict: every key of the table must be present with exactly its shape, and
every key of the input must be used or be on the explicit `IGNORED_KEYS` list; anything else is a
`CheckpointError` naming the keys.
"""

from .conversion import compvis_to_parts, parts_to_compvis
from .detect import UNET_INPUT_VARIANTS, UNSUPPORTED_MARKERS, detect_unsupported
from .errors import CheckpointError
from .infer import SD1_TEXT_HEAD_DIM, SD1_UNET_HEADS, infer_config, infer_config_from_parts
from .layouts import (
    CONV1X1,
    CONV1X1_MODULES,
    EMA_PREFIX,
    IGNORED_KEYS,
    LEGACY_TEXT_PREFIX,
    PARTS,
    POSITION_IDS,
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    LayoutError,
    Row,
    mapping_rows,
    mapping_table,
    module_names,
    module_shapes,
)

__all__ = [
    # conversion
    "compvis_to_parts",
    "parts_to_compvis",
    "CheckpointError",
    # config inference
    "infer_config",
    "infer_config_from_parts",
    "SD1_UNET_HEADS",
    "SD1_TEXT_HEAD_DIM",
    # other model families
    "detect_unsupported",
    "UNSUPPORTED_MARKERS",
    "UNET_INPUT_VARIANTS",
    # the mapping table
    "Row",
    "mapping_table",
    "mapping_rows",
    "module_names",
    "module_shapes",
    "LayoutError",
    "PARTS",
    "UNET_PREFIX",
    "EMA_PREFIX",
    "VAE_PREFIX",
    "TEXT_PREFIX",
    "LEGACY_TEXT_PREFIX",
    "POSITION_IDS",
    "IGNORED_KEYS",
    "CONV1X1",
    "CONV1X1_MODULES",
]
