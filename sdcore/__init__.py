"""sdcore: Stable Diffusion 1.x written from scratch in PyTorch (see README.md beside this file).

The heavy entry points are imported on first use, so `import sdcore.config` and
`import sdcore.rules` (the limits every check shares) stay cheap: neither imports torch.
"""

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "config",
    "UNetConfig": "config",
    "VAEConfig": "config",
    "TextEncoderConfig": "config",
    "GenerationRequest": "request",
    "Pipeline": "pipeline",
    "load_pipeline": "weights",
    "export_single_file": "weights",
    "exact_kernels": "kernels",
    "compile_unet": "kernels",
    "set_conv_algorithm": "kernels",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'sdcore' has no attribute {name!r}")
