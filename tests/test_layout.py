"""The package layout: `sdcore` is the inference library only; the shapes world, its
evaluator and the trainer live in the sibling package `shapesworld` and are never imported by
loading a model."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

TRAINING_AND_EVALUATION = ("shapesworld", "sdcore.train", "sdcore.eval", "sdcore.shapes")


def test_loading_a_model_imports_no_training_or_evaluation_code():
    code = (
        "import sdcore, sys; sdcore.load_pipeline('builtin:shapes'); "
        f"print(sorted(m for m in sys.modules if m.startswith({TRAINING_AND_EVALUATION!r})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_sdcore_holds_no_training_or_evaluation_code():
    for name in ("train.py", "eval.py", "shapes"):
        assert not (REPO / "sdcore" / name).exists(), name
    for name in ("world.py", "detect.py", "evaluate.py", "eval.py", "train/__main__.py"):
        assert (REPO / "shapesworld" / name).exists(), name
