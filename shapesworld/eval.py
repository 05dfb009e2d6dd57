"""`python -m shapesworld.eval OUTPUT`: prompt adherence of shape-world images (see evaluate.py)."""

from shapesworld.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
