"""The one place a record becomes a `Pipeline.generate` call.

The worker makes each image from its row's record through these two functions, and
`reproduce.py` remakes it from the stored record through the same two, so what a record says and
what was run cannot drift apart:

    images = pipe.generate([generation_request(record, init_image)], **generate_settings(record),
                           **recorded_slots(record))

`generation_request` is the row itself (prompt, negative prompt, seed, init image, strength, and
its sampler settings, which may differ from row to row); `generate_settings` what the rows of one
worker share (the shape of the UNet forwards, and defaults the requests override).
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from sdcore import GenerationRequest

from .record import Record


def generation_request(record: Record, init_image: Image.Image | None = None) -> GenerationRequest:
    """The request for the record's image. `init_image` is the decoded init image of an img2img
    record (the file whose sha256 the record holds) and must be None for a txt2img record."""
    img2img = record.mode == "img2img"
    if img2img != (init_image is not None):
        raise ValueError(f"row {record.row}: a {record.mode} record needs {'an' if img2img else 'no'} init image")
    return GenerationRequest(
        prompt=record.prompt,
        negative=record.negative or "",
        seed=int(record.seed),
        init_image=init_image,
        strength=float(record.strength) if img2img else None,
        sampler=record.sampler,
        karras=bool(record.karras),
        steps=int(record.steps),
        guidance_scale=float(record.guidance_scale),
        width=int(record.width),
        height=int(record.height),
    )


def generate_settings(record: Record) -> dict[str, Any]:
    """The keyword settings of `Pipeline.generate` for the record's image: the sampler
    settings, and the shape of the UNet forwards (`fixed_batch` rows; records written before
    fixed-shape batching have none and name their mode by `batch_invariant`)."""
    settings: dict[str, Any] = {
        "sampler": record.sampler,
        "karras": bool(record.karras),
        "steps": int(record.steps),
        "guidance_scale": float(record.guidance_scale),
        "width": int(record.width),
        "height": int(record.height),
        "batch_invariant": bool(record.batch_invariant),
    }
    if record.batch_rows:
        settings["fixed_batch"] = int(record.batch_rows)
    return settings


def recorded_slots(record: Record) -> dict[str, Any]:
    """To remake one record's image alone: put its row back in the slots it had in its UNet
    forwards and its VAE decode (fillers take the others). Empty for records without a recorded
    placement; no decode slot for records from before batched decodes (decoded alone)."""
    placed: dict[str, Any] = {}
    if record.batch_rows and record.batch_slot is not None:
        placed["slots"] = [int(record.batch_slot)]
    if record.decode_rows and record.decode_slot is not None:
        placed.update(decode_batch=int(record.decode_rows), decode_slots=[int(record.decode_slot)])
    return placed


__all__ = ["generate_settings", "generation_request", "recorded_slots"]
