"""A training run and its folder: both stages in order, resume, `--vae-from` reuse of a finished
stage 1, and reading a run back as a pipeline.

Files in a run folder: `train_config.json`, `vae.pt`, `unet.pt` (checkpoints, replaced
atomically), `latents.pt` (stage 1's posterior of every training image), `log.jsonl` (one line
per logged step: phase, step, loss, lr, seconds) and `summary.json`.

Everything random draws from generators seeded from the config's `seed` (initial weights,
batches, timesteps, noise, caption dropout), so a run is reproducible on one machine;
checkpoints hold the generator states as well, so a resumed run continues the same run.

`--vae-from RUN` takes the finished stage 1 (`vae.pt`, `latents.pt`) of an earlier run whose
stage-1 settings are identical, to iterate on stage 2 without redoing stage 1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from sdcore.weights import assemble

from .checkpoints import RunLog, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import mislabel_captions, render_training_set
from .stages import encode_latents, scaling_factor_for, train_unet, train_vae


def git_commit() -> str:
    """HEAD of the repository this package lives in ("unknown" outside git)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_config(out: Path) -> TrainConfig:
    """The config the run in `out` was started with."""
    return TrainConfig(**json.loads((out / "train_config.json").read_text()))


def resume_config(cfg: TrainConfig, out: Path) -> TrainConfig:
    """The config to continue the run in `out` with: its own, with `cfg`'s step counts (they may
    grow on resume; everything else must match the run being continued). `cfg` itself when `out`
    holds no run yet."""
    if not (out / "train_config.json").exists():
        return cfg
    return replace(load_config(out), vae_steps=cfg.vae_steps, unet_steps=cfg.unet_steps)


def reuse_vae_stage(cfg: TrainConfig, source: Path, out: Path) -> None:
    """Copy a finished stage 1 (`vae.pt`, `latents.pt`) from the run in `source` into `out`,
    after checking that it was trained with exactly the stage-1 settings of `cfg`."""
    saved = load_config(source)
    if saved.vae_stage() != cfg.vae_stage():
        differ = sorted(k for k, v in cfg.vae_stage().items() if saved.vae_stage().get(k) != v)
        raise ValueError(f"--vae-from {source}: its VAE stage was trained with other settings ({', '.join(differ)})")
    if int(load_checkpoint(source / "vae.pt")["step"]) != cfg.vae_steps:
        raise ValueError(f"--vae-from {source}: its VAE stage is not finished")
    if (out / "unet.pt").exists():  # stage 2 would silently continue that older run
        raise ValueError(
            f"--vae-from: {out} already holds a stage-2 checkpoint (unet.pt); "
            "use a new --out, or --resume to continue it"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in ("vae.pt", "latents.pt"):
        shutil.copyfile(source / name, out / name)
    log = RunLog(out / "log.jsonl")
    log.write(phase="vae_from", source=str(source.resolve()))
    for record in RunLog(source / "log.jsonl").read():  # stage 1's own log
        if record.get("phase") == "vae":
            log.write(**record)


def stage_one_latents(vae, images: torch.Tensor, path: Path, resume: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image: read from `path` when resuming a run
    that has them, else encoded with `vae` and saved there."""
    if resume and path.exists():
        state = load_checkpoint(path)
        return state["mean"], state["std"]
    mean, std = encode_latents(vae, images)
    save_checkpoint({"mean": mean, "std": std}, path)
    return mean, std


def summarize(
    commit: str, began: float, scaling_factor: float, vae_losses: list[float], unet_losses: list[float]
) -> dict:
    """What `summary.json` says about a finished run."""
    return {
        "git_commit": commit,  # the code that trained (HEAD when the run began)
        "seconds": round(time.time() - began, 1),
        "scaling_factor": scaling_factor,
        "vae_loss_first": vae_losses[0] if vae_losses else None,
        "vae_loss_last": float(np.mean(vae_losses[-50:])) if vae_losses else None,
        "unet_loss_first": float(np.mean(unet_losses[:50])) if unet_losses else None,
        "unet_loss_last": float(np.mean(unet_losses[-200:])) if unet_losses else None,
    }


def run(
    cfg: TrainConfig, out: Path, *, resume: bool = False, progress: bool = True, vae_from: Path | None = None
) -> dict:
    """Both stages; returns a summary (also written to `out/summary.json`). With `vae_from`,
    stage 1 is taken from that run (see `reuse_vae_stage`)."""
    if vae_from is not None and not (resume and (out / "vae.pt").exists()):
        reuse_vae_stage(cfg, vae_from, out)
        resume = True  # stage 1 is complete; stage 2 starts from scratch (no unet.pt yet)
    out.mkdir(parents=True, exist_ok=True)
    commit_at_start = git_commit()
    (out / "train_config.json").write_text(json.dumps(cfg.__dict__, indent=2, default=list))
    began = time.time()
    images, captions = render_training_set(cfg)
    noisy_captions = mislabel_captions(cfg, captions)
    vae, vae_losses = train_vae(cfg, out, images, resume=resume, progress=progress)
    mean, std = stage_one_latents(vae, images, out / "latents.pt", resume)
    scaling_factor = scaling_factor_for(mean, cfg.latent_std)
    _, _, unet_losses = train_unet(
        cfg, out, (mean, std), scaling_factor, captions, noisy_captions, resume=resume, progress=progress
    )
    summary = summarize(commit_at_start, began, scaling_factor, vae_losses, unet_losses)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def pipeline_from_run(out: Path, *, ema: bool = True):
    """A `Pipeline` from the checkpoints in `out` (EMA weights by default), with the run's
    config and its stage-2 checkpoint."""
    cfg = load_config(out)
    vae_state = load_checkpoint(out / "vae.pt")["model"]
    unet_state = load_checkpoint(out / "unet.pt")
    prefix = "ema_" if ema else ""
    config = cfg.model_config(float(unet_state["scaling_factor"]))
    parts = {"vae": vae_state, "unet": unet_state[prefix + "unet"], "text_encoder": unet_state[prefix + "text_encoder"]}
    return assemble(config, parts, source=str(out)), cfg, unet_state
