"""shapesworld.train: a short run lowers both losses, a resumed run equals an uninterrupted one,
the command line and the exported command agree with the shipped record, and the shipped
`builtin:shapes` loads with its config and reproduces its stored adherence figure."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from sdcore.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from sdcore.weights import BUILTIN_DIR, load_pipeline
from shapesworld.train.__main__ import build_parser, config_from_args
from shapesworld.train.checkpoints import load_checkpoint
from shapesworld.train.config import TrainConfig
from shapesworld.train.data import mislabel_captions, training_captions
from shapesworld.train.export import adherence_check, training_command
from shapesworld.train.runs import run
from shapesworld.world import Scene, is_held_out, parse_caption

# The shapes recipe at a size that trains in seconds: 32x32 images, 2-level networks.
MINI = ModelConfig(
    unet=UNetConfig(
        block_out_channels=(16, 32),
        attention_levels=(False, True),
        layers_per_block=1,
        num_heads=2,
        cross_attention_dim=32,
        norm_num_groups=8,
    ),
    vae=VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8),
    text_encoder=TextEncoderConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2),
)
CFG = TrainConfig(
    n_train=64,
    size=32,
    vae_steps=120,
    vae_batch=8,
    unet_steps=40,
    unet_batch=16,
    warmup=5,
    vae_lr=3e-3,
    unet_lr=1e-3,
    log_every=10,
    checkpoint_every=10,
    model=MINI.to_dict(),
)
SHAPES_DIR = BUILTIN_DIR / "shapes"


@pytest.fixture(autouse=True)
def one_thread():
    """Train on one thread, as the real run did; restore the caller's setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mean(values):
    return sum(values) / len(values)


def _same_run(a, b) -> bool:
    """The runs in folders a and b have the same stage-2 losses and EMA UNet weights."""
    a, b = load_checkpoint(a / "unet.pt"), load_checkpoint(b / "unet.pt")
    return a["losses"] == b["losses"] and all(
        torch.equal(tensor, b["ema_unet"][key]) for key, tensor in a["ema_unet"].items()
    )


def test_short_training_lowers_both_losses(tmp_path):
    summary = run(CFG, tmp_path, progress=False)
    vae_losses = load_checkpoint(tmp_path / "vae.pt")["losses"]
    unet_losses = load_checkpoint(tmp_path / "unet.pt")["losses"]
    assert len(vae_losses) == CFG.vae_steps and len(unet_losses) == CFG.unet_steps
    assert _mean(vae_losses[-10:]) < 0.85 * _mean(vae_losses[:10])
    assert _mean(unet_losses[-10:]) < _mean(unet_losses[:10])
    assert summary["scaling_factor"] > 0
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in log} == {"vae", "unet"}

    # Shipped in float16, as training.json says (the run's float32 checkpoints were written
    # as they were stored, at twice the size), with a command that trains this config again.
    from safetensors import safe_open

    from shapesworld.train.export import export

    shipped = export(tmp_path, tmp_path / "ship")
    with safe_open(str(shipped), "pt") as handle:
        floating = {handle.get_tensor(k).dtype for k in handle.keys()} - {torch.int64}
    assert floating == {torch.float16}
    command = json.loads((tmp_path / "ship" / "training.json").read_text())["command"]
    args = build_parser().parse_args(command[len("python -m shapesworld.train ") :].split())
    parsed = config_from_args(args)  # the options the command line has (not size, lrs, model)
    for name in ("seed", "dataset_seed", "n_train", "vae_steps", "unet_steps", "vae_batch", "unet_batch"):
        assert getattr(parsed, name) == getattr(CFG, name), name


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    cfg = replace(CFG, vae_steps=6, unet_steps=12, checkpoint_every=6)
    run(cfg, tmp_path / "whole", progress=False)
    run(replace(cfg, unet_steps=6), tmp_path / "split", progress=False)
    run(cfg, tmp_path / "split", resume=True, progress=False)
    assert _same_run(tmp_path / "whole", tmp_path / "split")


def test_vae_from_reuses_stage_one_exactly(tmp_path):
    """--vae-from: stage 2 on a VAE stage taken from another run equals a run from scratch;
    a run trained with other stage-1 settings is refused, naming the setting."""
    cfg = replace(CFG, vae_steps=6, unet_steps=6, checkpoint_every=6)
    run(cfg, tmp_path / "scratch", progress=False)
    other_stage_two = replace(cfg, caption_dropout=0.5, latent_std=1.0, unet_lr=1e-4)
    run(other_stage_two, tmp_path / "donor", progress=False)
    run(cfg, tmp_path / "reused", progress=False, vae_from=tmp_path / "donor")
    assert _same_run(tmp_path / "scratch", tmp_path / "reused")
    with pytest.raises(ValueError, match="kl_weight"):
        run(replace(cfg, kl_weight=1.0), tmp_path / "refused", progress=False, vae_from=tmp_path / "donor")
    with pytest.raises(ValueError, match="already holds a stage-2 checkpoint"):
        run(cfg, tmp_path / "scratch", progress=False, vae_from=tmp_path / "donor")


def test_latent_std_sets_the_scaling_factor(tmp_path):
    cfg = replace(CFG, vae_steps=6, unet_steps=1, checkpoint_every=6)
    unit = run(replace(cfg, latent_std=1.0), tmp_path / "unit", progress=False)
    small = run(replace(cfg, latent_std=0.6), tmp_path / "small", progress=False, vae_from=tmp_path / "unit")
    mean = load_checkpoint(tmp_path / "unit" / "latents.pt")["mean"]
    assert unit["scaling_factor"] == pytest.approx(1.0 / float(mean.std()))
    assert small["scaling_factor"] == pytest.approx(0.6 * unit["scaling_factor"])


def test_caption_noise_mislabels_one_attribute_of_a_fixed_fraction():
    cfg = replace(CFG, n_train=2000, caption_noise=0.25)
    clean = training_captions(cfg)
    noisy = mislabel_captions(cfg, clean)
    assert noisy == mislabel_captions(cfg, clean)  # fixed per image
    assert mislabel_captions(replace(cfg, caption_noise=0.0), clean) == clean
    changed = [(a, b) for a, b in zip(clean, noisy) if a != b]
    assert 0.2 * cfg.n_train < len(changed) < 0.3 * cfg.n_train
    for before, after in changed:
        was, now = parse_caption(before), parse_caption(after)
        assert sum(was[k] != now[k] for k in was) == 1, (before, after)
        assert next(k for k in was if was[k] != now[k]) in ("colour", "shape", "position")
        assert not is_held_out(Scene(**now))
    # restricted to one attribute: only positions are named wrongly, as often
    only_position = mislabel_captions(replace(cfg, caption_noise_attributes=("position",)), clean)
    changed = [(parse_caption(a), parse_caption(b)) for a, b in zip(clean, only_position) if a != b]
    assert 0.2 * cfg.n_train < len(changed) < 0.3 * cfg.n_train
    assert all([k for k in was if was[k] != now[k]] == ["position"] for was, now in changed)
    # bad settings fail when the config is made, before any rendering or training
    with pytest.raises(ValueError, match="caption_noise_attributes.*choose from"):
        replace(cfg, caption_noise_attributes=("size",))
    with pytest.raises(ValueError, match="caption_noise 1.5"):
        replace(cfg, caption_noise=1.5)
    with pytest.raises(ValueError, match="caption_noise_min_t -1"):
        replace(cfg, caption_noise_min_t=-1)


def test_caption_noise_applies_from_its_step_and_timestep_only(tmp_path):
    """The mislabelled captions replace the true ones only at t >= caption_noise_min_t and from
    UNet step caption_noise_from_step on; before that the run is the clean run, bit for bit, so
    a clean run can be continued into a noisy one (how builtin:shapes was trained)."""
    cfg = replace(CFG, vae_steps=6, unet_steps=12, checkpoint_every=6)
    noisy = replace(cfg, caption_noise=0.5, caption_noise_from_step=6)
    run(cfg, tmp_path / "clean", progress=False)
    run(replace(noisy, caption_noise_min_t=1000), tmp_path / "never_t", progress=False, vae_from=tmp_path / "clean")
    run(
        replace(noisy, caption_noise_from_step=12), tmp_path / "never_step", progress=False, vae_from=tmp_path / "clean"
    )
    assert _same_run(tmp_path / "clean", tmp_path / "never_t")
    assert _same_run(tmp_path / "clean", tmp_path / "never_step")

    run(noisy, tmp_path / "noisy", progress=False, vae_from=tmp_path / "clean")
    clean_losses = load_checkpoint(tmp_path / "clean" / "unet.pt")["losses"]
    noisy_losses = load_checkpoint(tmp_path / "noisy" / "unet.pt")["losses"]
    assert noisy_losses[:6] == clean_losses[:6] and noisy_losses[6:] != clean_losses[6:]
    # only rows with t >= min_t: a threshold in the middle gives a third, different run
    run(replace(noisy, caption_noise_min_t=500), tmp_path / "high_t", progress=False, vae_from=tmp_path / "clean")
    high_t_losses = load_checkpoint(tmp_path / "high_t" / "unet.pt")["losses"]
    assert high_t_losses[6:] not in (clean_losses[6:], noisy_losses[6:])

    # a clean run stopped at step 6 and resumed with the noisy config == the noisy run
    run(replace(cfg, unet_steps=6), tmp_path / "continued", progress=False, vae_from=tmp_path / "clean")
    run(noisy, tmp_path / "continued", resume=True, progress=False)
    assert _same_run(tmp_path / "noisy", tmp_path / "continued")


def test_shipped_command_is_what_export_writes_and_the_command_line_reads():
    """The command in the shipped training.json is what `export` writes for its train_config,
    and today's command line parses it back into that config. That file was recorded when the
    trainer was `python -m sdcore.train` (same options), so the module path is compared apart."""
    meta = json.loads((SHAPES_DIR / "training.json").read_text())
    recorded = meta["train_config"]
    shipped = TrainConfig(**{**recorded, "caption_noise_attributes": tuple(recorded["caption_noise_attributes"])})
    command = training_command(shipped, vae_from="vae_stage_from" in meta)
    old_prog, prog = "python -m sdcore.train ", "python -m shapesworld.train "
    assert meta["command"].startswith(old_prog) and command.startswith(prog)
    assert command[len(prog) :] == meta["command"][len(old_prog) :]
    args = build_parser().parse_args(command[len(prog) :].split())
    assert config_from_args(args) == shipped and args.vae_from is not None


def test_builtin_shapes_reproduces_its_stored_adherence():
    meta = json.loads((SHAPES_DIR / "training.json").read_text())
    for key in ("dataset", "unet_steps", "vae_steps", "unet_loss", "git_commit", "model_config"):
        assert key in meta
    pipe = load_pipeline("builtin:shapes")
    assert pipe.config == ModelConfig.from_dict(meta["model_config"])
    stored = meta["adherence_check"]
    measured = adherence_check(pipe, stored["settings"])
    assert measured["prompts"] == stored["prompts"]
    # Same weights and noise; float kernels may differ across machines, which can flip a
    # borderline image: allow one image per attribute.
    for counts in ("counts", "recolour_counts"):
        for attribute in ("colour", "shape", "position"):
            got, want = measured[counts][attribute], stored[counts][attribute]
            assert got[1] == want[1]
            assert abs(got[0] - want[0]) <= 1, (counts, attribute, got, want)
    # and the model draws what it is told on most of these held-out prompts and recolourings
    assert stored["counts"]["colour"][0] >= 0.75 * stored["counts"]["colour"][1]
    assert stored["recolour_counts"]["colour"][0] >= 0.5 * stored["recolour_counts"]["colour"][1]
    # The shipped file is a few MB: float16, and only the token rows the captions use.
    assert (SHAPES_DIR / "model.safetensors").stat().st_size < 6_000_000
