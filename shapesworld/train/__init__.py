"""Training `builtin:shapes`: a small SD 1.x trained from scratch on the shapes world, on a CPU.

`python -m shapesworld.train --help` for the command. The recipe is Latent Diffusion's in two
stages (VAE, then UNet + text encoder); the modules, one idea each:

- `presets.py`: model size presets (`shapes_config`, the shipped architecture);
- `config.py`: `TrainConfig`, every setting of a run, checked when it is made;
- `data.py`: the rendered training set, mislabelled captions (caption noise), batches and
  caption dropout;
- `stages.py`: the VAE stage and the UNet + text encoder stage (the recipe and its sources);
- `checkpoints.py`: atomic checkpoints and `log.jsonl`;
- `runs.py`: a run folder end to end: both stages, resume, `--vae-from` reuse of stage 1;
- `export.py`: shipping a run as `model.safetensors` + `training.json`;
- `__main__.py`: the command line.

What was tried on the way to the shipped model (latent scale, caption noise) and what it
measured: the "Training experiments" section of bench/QUALITY.md.
"""
