"""Train a small Stable Diffusion 1.x on the shapes world (`shapesworld.world`), on a CPU, from
scratch.

    python -m shapesworld.train --out runs/shapes --seed 0 --vae-steps 1500 --unet-steps 5000
    python -m shapesworld.train --out runs/shapes --resume ...   # continue after an interruption
    python -m shapesworld.train --out runs/shapes --export sdcore/builtin/shapes  # ship the result
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .config import MISLABEL_ATTRIBUTES, TrainConfig
from .export import export
from .runs import resume_config, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shapesworld.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, log)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset-seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=TrainConfig.n_train)
    parser.add_argument("--vae-steps", type=int, default=TrainConfig.vae_steps)
    parser.add_argument("--unet-steps", type=int, default=TrainConfig.unet_steps)
    parser.add_argument("--vae-batch", type=int, default=TrainConfig.vae_batch)
    parser.add_argument("--unet-batch", type=int, default=TrainConfig.unet_batch)
    parser.add_argument("--caption-dropout", type=float, default=TrainConfig.caption_dropout)
    parser.add_argument(
        "--caption-noise",
        type=float,
        default=TrainConfig.caption_noise,
        help="fraction of training captions with one attribute wrong",
    )
    parser.add_argument(
        "--caption-noise-min-t",
        type=int,
        default=TrainConfig.caption_noise_min_t,
        help="use the mislabelled captions only at timesteps t >= this",
    )
    parser.add_argument(
        "--caption-noise-from-step",
        type=int,
        default=TrainConfig.caption_noise_from_step,
        help="use the mislabelled captions only from this UNet step on",
    )
    parser.add_argument(
        "--caption-noise-attributes",
        default=",".join(MISLABEL_ATTRIBUTES),
        help="comma-separated: which of colour,shape,position may be mislabelled",
    )
    parser.add_argument(
        "--latent-std", type=float, default=TrainConfig.latent_std, help="std of the UNet's latents (SD uses 1.0)"
    )
    parser.add_argument("--vae-from", type=Path, metavar="RUN", help="take the finished VAE stage of this earlier run")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--export", type=Path, metavar="DIR", help="instead of training, write DIR/model.safetensors + training.json"
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config from the command line (before `--resume` takes the saved one)."""
    return TrainConfig(
        seed=args.seed,
        dataset_seed=args.dataset_seed,
        n_train=args.n_train,
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        vae_batch=args.vae_batch,
        unet_batch=args.unet_batch,
        caption_dropout=args.caption_dropout,
        latent_std=args.latent_std,
        caption_noise=args.caption_noise,
        caption_noise_min_t=args.caption_noise_min_t,
        caption_noise_from_step=args.caption_noise_from_step,
        caption_noise_attributes=tuple(args.caption_noise_attributes.split(",")),
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.export:
        print(export(args.out, args.export))
        return 0
    cfg = config_from_args(args)
    if args.resume:
        cfg = resume_config(cfg, args.out)
    print(json.dumps(run(cfg, args.out, resume=args.resume, progress=not args.no_progress, vae_from=args.vae_from)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
