"""mcore-bridge: Hugging Face safetensors <-> megatron-core models, sharded any way, verified."""

__version__ = "0.1.0"
__all__ = ["Bridge", "LayoutError", "ParallelLayout", "__version__"]


def __getattr__(name):
    """``Bridge`` (which imports torch) is imported on first use, so that ``mcore-bridge --help``
    and the pure-arithmetic modules start without torch."""
    if name == "Bridge":
        from .bridge import Bridge

        return Bridge
    if name in ("LayoutError", "ParallelLayout"):
        from . import layout

        return getattr(layout, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
