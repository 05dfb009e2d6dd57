"""`GenerationRequest`: one image to make, the type `Pipeline.generate` takes.

A request is one row of a batch: the prompt, the negative prompt, the seed (the row's only source
of randomness), and for img2img the init image and strength. The sampler settings (`sampler`,
`karras`, `steps`, `guidance_scale`, `width`, `height`) may be set per request; a field left at
None takes the value given to `generate`. Requests are checked when they are made (types, the
seed range) and again when their settings are known (`resolve`: the strength rule needs the step
count), with the rules of `sdcore.rules`.

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

from PIL import Image

from . import rules

SETTINGS = ("sampler", "karras", "steps", "guidance_scale", "width", "height")


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
            raise ValueError("an img2img request (init_image) needs a strength in (0, 1]")

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
        if self.init_image is not None:
            problem = rules.strength_problem(self.strength, filled["steps"])
            if problem:
                raise ValueError(f"strength: {problem}")
        filled["steps"] = int(filled["steps"])
        filled["guidance_scale"] = rules.as_float(filled["guidance_scale"])
        filled["width"], filled["height"] = int(filled["width"]), int(filled["height"])
        # The strength stays as given: its step count is computed in its own type, as diffusers
        # computes it (`rules.img2img_steps`: a numpy float32 can count one step more).
        return dataclasses.replace(self, **filled)

    def settings_key(self) -> tuple:
        """Resolved requests with equal keys can share UNet forwards (same schedule and size)."""
        return tuple(getattr(self, name) for name in SETTINGS)
