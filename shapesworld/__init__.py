"""shapesworld: the toy world `builtin:shapes` was trained on, its judge, and its training recipe.

Kept apart from `sdcore` (the inference library), which imports nothing from here. See
README.md beside this file. Import from the modules:

- `shapesworld.world` renders captioned scenes of one coloured shape and holds the held-out rule;
- `shapesworld.detect` reads a scene's attributes back out of an image;
- `shapesworld.evaluate` scores generated images against their prompts
  (`python -m shapesworld.eval OUTPUT`);
- `shapesworld.train` trains a small SD 1.x on the world and exports it
  (`python -m shapesworld.train`).

Nothing is re-exported here: the function `detect()` would hide the module of the same name,
and importing this package should not import torch or Pillow.
"""
