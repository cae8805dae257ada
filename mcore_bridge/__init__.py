"""mcore-bridge: Hugging Face safetensors <-> megatron-core models, sharded any way, verified."""

from .bridge import Bridge
from .layout import LayoutError, ParallelLayout

__version__ = "0.1.0"
__all__ = ["Bridge", "LayoutError", "ParallelLayout", "__version__"]
