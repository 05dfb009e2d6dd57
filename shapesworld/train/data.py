"""Training data: the rendered training set, mislabelled captions, and the batches both stages
draw (images for the VAE; posterior latents and caption tokens, with caption noise and dropout,
for the UNet).

Caption noise (`--caption-noise P`) mislabels one attribute in a fixed fraction P of the training
captions, as web alt-text often names the wrong thing; `--caption-noise-attributes` says which
of colour, shape and position may be named wrongly, `--caption-noise-min-t` and
`--caption-noise-from-step` restrict the mislabelled captions to timesteps t >= T and to UNet
steps from S on (before S the run is the clean run, bit for bit, so a clean run can be continued
into a noisy one). Why: a caption of this world fixes almost everything about its image, and a
model trained on exact captions draws held-out prompts as well without guidance as with it,
unlike SD, whose unguided samples follow their prompts loosely because its captions are noisy.
What was tried, and why the shipped model mislabels only positions: the "Training experiments"
section of bench/QUALITY.md.

Caption dropout (`--caption-dropout`) replaces a caption by "" (the pipeline's default negative
prompt) so that one network also learns the unconditional model that classifier-free guidance
needs (Ho & Salimans 2022, sec. 3.2).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from sdcore.tokenizer import tokenize

from ..world import COLOURS, POSITIONS, SHAPES, TEMPLATES, dataset, is_held_out
from .config import MISLABEL_ATTRIBUTES, TrainConfig


def render_training_set(cfg: TrainConfig) -> tuple[torch.Tensor, list[str]]:
    """The fixed training set: (N, 3, H, W) uint8 images and their captions."""
    data = dataset(cfg.n_train, seed=cfg.dataset_seed, split="train", size=cfg.size, tensors=False)
    images = torch.empty(cfg.n_train, 3, cfg.size, cfg.size, dtype=torch.uint8)
    captions = []
    for i in range(cfg.n_train):
        image, caption = data[i]
        # (H, W, 3) -> (3, H, W)
        images[i] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        captions.append(caption)
    return images, captions


def training_captions(cfg: TrainConfig) -> list[str]:
    """The clean captions of the training set, without rendering it."""
    data = dataset(cfg.n_train, seed=cfg.dataset_seed, split="train", size=cfg.size, tensors=False)
    return [data.scene(i)[1] for i in range(cfg.n_train)]


def mislabel_captions(cfg: TrainConfig, captions: list[str]) -> list[str]:
    """`cfg.caption_noise` of the training images get a caption with one of colour, shape or
    position (those in `cfg.caption_noise_attributes`) replaced by another value, the way web
    alt-text often names the wrong thing. The choice is fixed per image (seeded by the dataset
    seed), and never names a held-out combination. SD's unguided samples follow their prompts
    loosely because its captions are noisy; classifier-free guidance pulls samples towards
    images the caption fits (p(c|x)), and this is the regime in which it matters."""
    if cfg.caption_noise <= 0:
        return list(captions)
    data = dataset(len(captions), seed=cfg.dataset_seed, split="train", size=cfg.size, tensors=False)
    values = {"colour": list(COLOURS), "shape": list(SHAPES), "position": list(POSITIONS)}
    choices = {name: values[name] for name in MISLABEL_ATTRIBUTES if name in cfg.caption_noise_attributes}
    rng = np.random.default_rng([cfg.dataset_seed, 17])
    noisy = list(captions)
    for i in range(len(captions)):
        if rng.random() >= cfg.caption_noise:
            continue
        scene, caption = data.scene(i)
        template = next(t for t in range(len(TEMPLATES)) if scene.caption(t) == caption)
        noisy[i] = _mislabelled_scene(scene, choices, rng).caption(template)
    return noisy


def _mislabelled_scene(scene, choices: dict, rng: np.random.Generator):
    """`scene` with one attribute of `choices` set to another value, never a held-out one."""
    while True:
        attribute = list(choices)[rng.integers(len(choices))]
        others = [v for v in choices[attribute] if v != getattr(scene, attribute)]
        wrong = replace(scene, **{attribute: others[rng.integers(len(others))]})
        if not is_held_out(wrong):
            return wrong


def trained_token_ids(cfg: TrainConfig) -> list[int]:
    """Every token id that occurs in the run's (tokenized, padded) training captions or in "":
    the rows of the token table that training updated. The others keep their random init."""
    clean = training_captions(cfg)
    captions = sorted(set(clean) | set(mislabel_captions(cfg, clean)))
    ids = set(tokenize(captions).flatten().tolist()) | set(tokenize([""]).flatten().tolist())
    return sorted(ids)


# ---------------------------------------------------------------------------------- batches


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1], the VAE's input range."""
    return images.float() / 127.5 - 1.0


def image_batch(images: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Stage 1's batch: `batch` training images drawn with replacement, (B, 3, H, W) in [-1, 1]."""
    index = torch.randint(len(images), (batch,), generator=generator)
    return to_unit(images[index])


def latent_batch(
    latents: tuple[torch.Tensor, torch.Tensor], batch: int, scaling_factor: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2's latents: the image indices (B,) drawn with replacement, and a fresh draw from
    each one's VAE posterior, scaled by `scaling_factor`: (B, 4, h, w)."""
    mean_all, std_all = latents
    index = torch.randint(len(mean_all), (batch,), generator=generator)
    posterior = torch.randn(mean_all[index].shape, generator=generator)
    return index, (mean_all[index] + std_all[index] * posterior) * scaling_factor


@dataclass(frozen=True)
class CaptionTokens:
    """The training captions tokenized once: unique token rows `ids` (U, 77), each image's row
    of its clean and of its (possibly) mislabelled caption (N,) each, and the row of ""."""

    ids: torch.Tensor
    clean: torch.Tensor
    noisy: torch.Tensor
    empty: torch.Tensor

    @classmethod
    def build(cls, captions: list[str], noisy_captions: list[str]) -> CaptionTokens:
        unique = sorted(set(captions + noisy_captions))
        row = {c: i for i, c in enumerate(unique)}
        index = torch.tensor([row[c] for c in captions + noisy_captions])
        return cls(tokenize(unique), index[: len(captions)], index[len(captions) :], tokenize([""])[0])

    def batch(
        self, cfg: TrainConfig, index: torch.Tensor, t: torch.Tensor, step: int, generator: torch.Generator
    ) -> torch.Tensor:
        """Token ids (B, 77) of images `index` at timesteps `t` in UNet step `step`: the
        mislabelled caption where caption noise applies (t >= caption_noise_min_t, from step
        caption_noise_from_step on), "" for a `caption_dropout` share drawn from `generator`."""
        drop = torch.rand(len(index), generator=generator) < cfg.caption_dropout
        rows = self.clean[index]
        if cfg.caption_noise > 0 and step >= cfg.caption_noise_from_step:
            rows = torch.where(t >= cfg.caption_noise_min_t, self.noisy[index], rows)
        tokens = self.ids[rows].clone()  # (B, 77)
        tokens[drop] = self.empty
        return tokens
