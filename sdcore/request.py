"""`GenerationRequest`: one image to make, the type `Pipeline.generate` takes.

A request is one row of a batch: the prompt, the negative prompt, the seed (the row's only source
of randomness), and for img2img the init image and strength. The sampler settings (`sampler`,
`karras`, `steps`, `guidance_scale`, `width`, `height`) may be set per request; a field left at
None takes the value given to `generate`. Requests are checked when they are made (types, the
seed range) and again when their settings are known (`resolve`: the strength rule needs the step
count; the init image's mode and size are checked there too), with the rules of `sdcore.rules`.
How an init image becomes the RGB pixels the VAE encodes is here too (`init_image_rgb`).

    from sdcore import GenerationRequest
    pipe.generate([GenerationRequest("a red circle", seed=1),
                   GenerationRequest("the same, in blue", seed=1, init_image=img, strength=0.6,
                                     guidance_scale=9.0)],
                  sampler="ddim", steps=25, guidance_scale=7.5, width=512, height=512)

`generate` also accepts plain mappings with the same keys (`{"prompt": ..., "seed": ...}`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from PIL import Image

from . import rules

SETTINGS = ("sampler", "karras", "steps", "guidance_scale", "width", "height")

# PIL modes of 16-bit greyscale (a 16-bit grey PNG opens as I;16): 0..65535, scaled to 8 bits.
SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N")
# PIL modes whose range of values is not fixed (32-bit integers, floats: 0..1? 0..255? 0..65535?),
# which convert("RGB") clips to 0..255: refused rather than guessed.
AMBIGUOUS_MODES = {"I": "32-bit integer", "F": "32-bit float"}


def init_image_problem(image: Image.Image) -> str | None:
    """What makes a PIL image unusable as an init image: no pixels, or a mode whose range is
    ambiguous (AMBIGUOUS_MODES). None for every other image."""
    if image.width == 0 or image.height == 0:
        return f"the image is {image.width}x{image.height} pixels: it has none"
    if image.mode in AMBIGUOUS_MODES:
        return (
            f"mode {image.mode} ({AMBIGUOUS_MODES[image.mode]} pixels) has no fixed range of values, "
            "so it cannot be turned into RGB without guessing; convert it to 8-bit RGB (mode RGB, "
            "values 0..255) or 16-bit greyscale (mode I;16, values 0..65535) first"
        )
    return None


def grey_to_8_bits(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image (SIXTEEN_BIT_GREY) as 8-bit greyscale (mode L): each value's top
    8 bits (`>> 8`; PIL's convert clips them to 255 instead, a white image). Any other image is
    returned as it is. The job runner's init image decoding (version 2) is this, so its bits are
    fixed: reproduce relies on them."""
    if image.mode not in SIXTEEN_BIT_GREY:
        return image
    grey = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
    return Image.fromarray(grey)  # mode L


def init_image_rgb(image: Image.Image) -> Image.Image:
    """An init image as 8-bit RGB, the way the pipeline reads it: 16-bit greyscale scaled to 8
    bits (`grey_to_8_bits`), every other mode by PIL's convert("RGB") (alpha dropped, as
    diffusers' `load_image` does). ValueError for an image `init_image_problem` refuses."""
    problem = init_image_problem(image)
    if problem:
        raise ValueError(problem)
    return grey_to_8_bits(image).convert("RGB")


@dataclass(frozen=True)
class GenerationRequest:
    """One image: see the module docstring. `strength` is ignored (set to None) on a txt2img
    request, as diffusers ignores it; an img2img request (`init_image` set) needs one."""

    prompt: str
    seed: int
    negative: str = ""
    init_image: Image.Image | None = None
    strength: float | None = None
    sampler: str | None = None
    karras: bool | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt: expected a string, got {type(self.prompt).__name__}")
        if self.negative is None:
            object.__setattr__(self, "negative", "")
        if not isinstance(self.negative, str):
            raise ValueError(f"negative: expected a string, got {type(self.negative).__name__}")
        problem = rules.seed_problem(self.seed)
        if problem:
            raise ValueError(f"seed: {problem}")
        object.__setattr__(self, "seed", int(self.seed))
        if self.init_image is not None and not isinstance(self.init_image, Image.Image):
            raise ValueError(f"init_image: expected a PIL image, got {type(self.init_image).__name__}")
        if self.init_image is None:
            object.__setattr__(self, "strength", None)  # nothing for a strength to act on
        elif self.strength is None:
            raise ValueError("strength: an img2img request (init_image) needs a strength in (0, 1]")

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> GenerationRequest:
        """A request from a dict with the field names as keys (unknown keys are an error)."""
        unknown = set(row) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown request field(s): {', '.join(sorted(map(str, unknown)))}")
        if "prompt" not in row or "seed" not in row:
            raise ValueError("a request needs a 'prompt' and a 'seed'")
        return cls(**row)

    @property
    def mode(self) -> str:
        return "txt2img" if self.init_image is None else "img2img"

    def settings(self) -> dict[str, Any]:
        """The per-request sampler settings (None where the call's value applies)."""
        return {name: getattr(self, name) for name in SETTINGS}

    def resolve(self, defaults: Mapping[str, Any], size_multiple: int = rules.SIZE_MULTIPLE) -> GenerationRequest:
        """This request with every setting filled in (its own, else `defaults`) and checked;
        ValueError naming the setting otherwise."""
        filled = {name: defaults.get(name) if value is None else value for name, value in self.settings().items()}
        if self.karras is None and self.sampler is not None and filled["karras"]:
            # A request that names its own sampler takes the call's Karras flag only where that
            # sampler has Karras sigmas (as a manifest row does): karras=True for dpmpp_2m in the
            # call, and a request for euler_a, runs euler_a.
            filled["karras"] = filled["sampler"] in rules.KARRAS_SAMPLERS
        missing = [name for name, value in filled.items() if value is None]
        if missing:
            raise ValueError(f"no value for {', '.join(missing)} (set it on the request or in the call)")
        problem = rules.sampler_problem(filled["sampler"])
        if problem:
            raise ValueError(f"sampler: {problem}")
        problem = rules.karras_problem(filled["karras"], filled["sampler"])
        if problem:
            raise ValueError(f"karras: {problem}")
        for name, check in (("steps", rules.steps_problem), ("guidance_scale", rules.guidance_problem)):
            problem = check(filled[name])
            if problem:
                raise ValueError(f"{name}: {problem}")
        for name in ("width", "height"):
            problem = rules.size_problem(filled[name], size_multiple)
            if problem:
                raise ValueError(f"{name}: {problem}")
        # Plain Python values (a numpy integer, a 0-dim torch tensor or an np.bool_ passed the
        # checks); the steps before the strength rule, which multiplies them in the strength's type.
        filled["karras"] = bool(filled["karras"])
        filled["steps"] = int(filled["steps"])
        filled["guidance_scale"] = rules.as_float(filled["guidance_scale"])
        filled["width"], filled["height"] = int(filled["width"]), int(filled["height"])
        if self.init_image is not None:
            problem = init_image_problem(self.init_image)
            if problem:
                raise ValueError(f"init_image: {problem}")
            problem = rules.strength_problem(self.strength, filled["steps"])
            if problem:
                raise ValueError(f"strength: {problem}")
        # The strength stays as given: its step count is computed in its own type, as diffusers
        # computes it (`rules.img2img_steps`: a numpy float32 can count one step more).
        return dataclasses.replace(self, **filled)

    def settings_key(self) -> tuple:
        """The resolved settings as one tuple: equal keys, the same schedule and size. (Whether
        requests share UNet forwards does not depend on it: see `Pipeline.generate`.)"""
        return tuple(getattr(self, name) for name in SETTINGS)
