"""Shipping a run: `target/model.safetensors` (float16, CompVis layout, config in the metadata,
only the token rows training touched) and `target/training.json`, the record of what trained
it: the command that reproduces the run, seeds, steps, losses, wall time, commits, and a small
adherence figure (`CHECK`) measured on the shipped file, which `tests/test_train.py` re-measures.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from sdcore.weights import assemble, export_single_file, load_single_file

from ..evaluate import adherence, recolour_rows
from ..world import dataset
from .checkpoints import RunLog, load_checkpoint
from .config import TrainConfig
from .data import trained_token_ids
from .runs import git_commit, pipeline_from_run

# A small, fixed adherence figure stored with the shipped weights and re-measured by the tests:
# 12 held-out prompts and 6 img2img recolourings (red circle -> blue, strength 0.7), DDIM 10
# steps, guidance 7.5, one seed each.
CHECK = {"n": 12, "prompt_seed": 7, "sampler": "ddim", "steps": 10, "guidance_scale": 7.5, "recolour_n": 6}


def adherence_check(pipe, check: dict = CHECK) -> dict:
    """Generate the check images with `pipe` and judge them:
    {"settings", "prompts", "counts", "recolour_counts"}."""
    data = dataset(check["n"], seed=check["prompt_seed"], split="heldout", tensors=False)
    prompts = [data.scene(i)[1] for i in range(check["n"])]
    settings = {
        "sampler": check["sampler"],
        "steps": check["steps"],
        "guidance_scale": check["guidance_scale"],
        "width": 64,
        "height": 64,
    }
    images = pipe.generate([{"prompt": p, "seed": i} for i, p in enumerate(prompts)], **settings)
    result = {"settings": dict(check), "prompts": prompts, "counts": adherence(zip(images, prompts))["counts"]}
    rows = recolour_rows(check.get("recolour_n", 0), seed=check["prompt_seed"] + 1)
    if rows:
        images = pipe.generate(rows, **settings)
        result["recolour_counts"] = adherence(zip(images, [r["prompt"] for r in rows]))["counts"]
    return result


def training_command(cfg: TrainConfig, vae_from: bool) -> str:
    """The `python -m shapesworld.train` command that trains `cfg` (RUN and VAE_RUN stand for
    run folders). Options whose value is the default are left out only where older records
    wrote them so (the dataset and batch options)."""
    defaults = TrainConfig()
    optional = [
        f" --{name.replace('_', '-')} {getattr(cfg, name)}"
        for name in ("dataset_seed", "n_train", "vae_batch", "unet_batch")
        if getattr(cfg, name) != getattr(defaults, name)
    ]
    return (
        f"python -m shapesworld.train --out RUN --seed {cfg.seed} --vae-steps {cfg.vae_steps} "
        f"--unet-steps {cfg.unet_steps} --caption-dropout {cfg.caption_dropout} "
        f"--latent-std {cfg.latent_std} --caption-noise {cfg.caption_noise} "
        f"--caption-noise-min-t {cfg.caption_noise_min_t} "
        f"--caption-noise-from-step {cfg.caption_noise_from_step} "
        f"--caption-noise-attributes {','.join(cfg.caption_noise_attributes)}"
        + "".join(optional)
        + (" --vae-from VAE_RUN" if vae_from else "")
    )


def wall_seconds(records: list[dict]) -> dict[str, float]:
    """Training seconds per phase from a run's log records, summed over resumed sessions (each
    session's clock starts again at 0)."""
    seconds: dict[str, float] = {}
    segment: dict[str, float] = {}  # seconds so far in the current (resumed) session per phase
    for record in records:
        if "seconds" in record:
            phase = record["phase"]
            if record["seconds"] < segment.get(phase, 0.0):  # a resume restarted the clock
                seconds[phase] = seconds.get(phase, 0.0) + segment[phase]
            segment[phase] = record["seconds"]
    for phase, value in segment.items():
        seconds[phase] = round(seconds.get(phase, 0.0) + value, 1)
    return seconds


def vae_from_source(records: list[dict]) -> str | None:
    """The run stage 1 was taken from with `--vae-from` (None when the run trained its own)."""
    sources = [r["source"] for r in records if r["phase"] == "vae_from"]
    return sources[-1] if sources else None


def training_commit(out: Path) -> str:
    """The commit that trained the run in `out` (HEAD when it began, from summary.json)."""
    summary = out / "summary.json"
    if not summary.exists():
        return "unknown"
    return json.loads(summary.read_text()).get("git_commit", "unknown")


def training_record(
    out: Path, pipe, cfg: TrainConfig, unet_state: dict, dtype: torch.dtype, token_ids: list[int]
) -> dict:
    """`training.json` for the run in `out`, without the adherence check."""
    vae_state = load_checkpoint(out / "vae.pt")
    unet_losses, vae_losses = unet_state["losses"], vae_state["losses"]
    records = RunLog(out / "log.jsonl").read()
    vae_from = vae_from_source(records)
    return {
        "model": "builtin:shapes",
        "dataset": {
            "module": "shapesworld.world",
            "seed": cfg.dataset_seed,
            "split": "train",
            "n_images": cfg.n_train,
            "size": cfg.size,
        },
        "train_seed": cfg.seed,
        **(
            {
                "vae_stage_from": f"stage 1 (VAE) taken with --vae-from from the run in {vae_from}, "
                "trained there with identical stage-1 settings"
            }
            if vae_from
            else {}
        ),
        "vae_steps": int(vae_state["step"]),
        "unet_steps": int(unet_state["step"]),
        "vae_loss": {"first": vae_losses[0], "last50": float(np.mean(vae_losses[-50:]))},
        "unet_loss": {"first50": float(np.mean(unet_losses[:50])), "last200": float(np.mean(unet_losses[-200:]))},
        "wall_seconds": wall_seconds(records),
        "weights": "EMA of UNet and text encoder; stored as "
        + str(dtype).replace("torch.", "")
        + f"; token table: the {len(token_ids)} rows of the training captions' "
        "tokens, others zero",
        "scaling_factor": float(unet_state["scaling_factor"]),
        # the commit that trained (summary.json), and the one that exported
        "git_commit": training_commit(out),
        "export_commit": git_commit(),
        "train_config": {k: v for k, v in cfg.__dict__.items() if k != "model"},
        "model_config": pipe.config.to_dict(),
        "command": training_command(cfg, vae_from=vae_from is not None),
    }


def export(out: Path, target: Path, *, dtype: torch.dtype = torch.float16, extra: dict | None = None) -> Path:
    """Ship the run in `out` as `target/model.safetensors` (CompVis layout, config in the
    metadata, weights in `dtype`) plus `target/training.json` (with `extra` added)."""
    pipe, cfg, unet_state = pipeline_from_run(out)
    pipe.unet.to(dtype)
    pipe.vae.to(dtype)
    pipe.text_encoder.to(dtype)
    pipe.stored_dtypes = None  # written in `dtype`, not as the run's float32 checkpoints store them
    target.mkdir(parents=True, exist_ok=True)
    # Only the token rows training touched are stored (the rest would be 6 MB of random init);
    # loading makes the others zero, which changes nothing for the world's own prompts.
    token_ids = trained_token_ids(cfg)
    export_single_file(pipe, target / "model.safetensors", token_rows=token_ids)
    meta = {**training_record(out, pipe, cfg, unet_state, dtype, token_ids), **(extra or {})}
    config, parts = load_single_file(target / "model.safetensors")  # measured as shipped
    meta["adherence_check"] = adherence_check(assemble(config, parts, source="check"))
    (target / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    return target / "model.safetensors"
