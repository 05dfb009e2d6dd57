"""What the stages write into a run folder as they go: checkpoints, replaced atomically so that
an interrupted run never leaves half a file, and `log.jsonl`, one JSON line per logged step."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def save_checkpoint(state: dict, path: Path) -> None:
    """Write `state` to `path` through a temporary file and a rename."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by `save_checkpoint`, on the CPU (tensors and plain data only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


class RunLog:
    """Appends one JSON line per record to `path` (a run's `log.jsonl`)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, **record) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        """Every record so far (none when the file does not exist)."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines()]


def stage_state(
    modules: dict, optimizer: torch.optim.Optimizer, generator: torch.Generator, losses: list[float], step: int, **extra
) -> dict:
    """A stage's checkpoint: each module's weights under its name, the optimizer and generator
    states, the losses so far and the step, then `extra`."""
    return {
        **{name: module.state_dict() for name, module in modules.items()},
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "losses": losses,
        "step": step,
        **extra,
    }


def restore_stage(
    state: dict, modules: dict, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> tuple[list[float], int]:
    """Load a `stage_state` checkpoint into `modules`, `optimizer` and `generator`; returns the
    losses so far and the step to continue from."""
    for name, module in modules.items():
        module.load_state_dict(state[name])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    return list(state["losses"]), int(state["step"])
