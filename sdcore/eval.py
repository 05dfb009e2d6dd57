"""`python -m sdcore.eval OUTPUT`: prompt adherence of shape-world images (see sdcore/shapes)."""

from sdcore.shapes.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
