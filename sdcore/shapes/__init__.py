"""The shape world: a captioned synthetic dataset and a deterministic adherence detector.

See README.md beside this file. Import from the submodules: `sdcore.shapes.dataset` renders
scenes from captions, `sdcore.shapes.detect` reads them back, `sdcore.shapes.evaluate` scores
generated images against their prompts (`python -m sdcore.eval`). Nothing is re-exported here,
because the functions `dataset()` and `detect()` would hide the submodules of the same name.
"""
