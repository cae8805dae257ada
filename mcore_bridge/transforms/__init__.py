"""The closed vocabulary of weight transforms between HF tensors and megatron shards.

A transform maps the HF tensor(s) behind one megatron parameter to the shard a tensor-parallel
rank holds, and back. It never reads whole tensors itself: ``slices`` names exactly the regions
of each HF tensor a rank needs (so the reader can fetch only those bytes), ``to_mcore`` assembles
the shard from those regions, and ``to_hf`` rebuilds the HF tensors from all ranks' shards.

Shapes are plain tuples; ``local`` is the shape of the megatron parameter on one rank.

``base``: the contract (``Transform``); ``basic``: plain splits of one tensor per projection (or
one fused tensor); ``composite``: copies, the LoRA factors of fused modules, head-grouped rows and
multi-tensor row blocks. Families import from this package, never from its modules.
"""

from .base import Region, Shape, ShapeMismatch, Transform
from .basic import (COLUMN, FUSED_GATED_MLP, GATED_MLP, QKV, REPLICATED, ROW, VOCAB, FusedGatedMLP,
                    FusedQKV, GatedMLP, Replicated, Split, Vocab)
from .composite import Blocks, Copies, FusedBlocks, GroupedRows, Shared, Stacked

__all__ = ["Region", "Shape", "ShapeMismatch", "Transform", "COLUMN", "FUSED_GATED_MLP", "GATED_MLP", "QKV",
           "REPLICATED", "ROW", "VOCAB", "FusedGatedMLP", "FusedQKV", "GatedMLP", "Replicated", "Split",
           "Vocab", "Blocks", "Copies", "FusedBlocks", "GroupedRows", "Shared", "Stacked"]
