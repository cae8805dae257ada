"""The base of every transform: the shapes, the error, and ``Transform``'s contract."""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import MappingError

Shape = tuple[int, ...]
Region = tuple[slice, ...]


class ShapeMismatch(MappingError):
    """HF tensor shapes that the transform cannot turn into the model's shard (or back)."""


def _rows(start: int, stop: int, ndim: int) -> Region:
    return (slice(start, stop),) + (slice(None),) * (ndim - 1)


def _full(shape: Shape) -> Region:
    return tuple(slice(None) for _ in shape)


def _check(cond: bool, msg: str):
    if not cond:
        raise ShapeMismatch(msg)


class Transform:
    """Base: subclasses define ``split_dim`` semantics through the three methods below.

    What a transform means beyond loading is a property of the transform too, so core modules
    (export, LoRA) never test transform classes: ``parallel_mode``, ``as_stored``, ``swiglu`` and
    ``lora_factor_transforms``. The defaults are the conservative ones (the slow export path, no
    LoRA mapping); every transform of this package states its own (``tests/test_transform_properties.py``).
    """

    #: whether shards differ between TP ranks (replicated tensors need no gather on export)
    tp_split = True
    n_sources = 1
    #: how TP shards relate to the HF tensors: "column" (split along output rows), "row" (split
    #: along input columns) or "replicated" (every rank holds the whole tensor)
    parallel_mode = "column"
    #: whether the HF tensors rebuilt from a single (unsplit) shard are the parameter's bytes in
    #: order (no reordering, no padding, no copies), so export may send the parameter as it lies
    as_stored = False
    #: the megatron module applies a gated (SwiGLU) activation to this fused [gate; up] output
    swiglu = False
    #: its HF tensors are n copies of one tensor (a shared LoRA A), which loading checks
    identical_sources = False

    def lora_factor_transforms(self, n: int, per_projection: bool):
        """(A transform, B transform) for the LoRA factors of a linear mapped by this transform
        from ``n`` HF projections, or None when LoRA cannot be mapped onto it."""
        return None

    def _column_factors(self, n: int, per_projection: bool):
        """Column-parallel linears: A replicated, B split like the weight (see ``lora.spec``)."""
        from .basic import REPLICATED  # the concrete transforms build on this base
        from .composite import Blocks, Shared, Stacked

        if n == 1:
            return REPLICATED, self
        return (Stacked(n), Blocks(self, n)) if per_projection else (Shared(n), self)

    def region_sources(self, n_regions: int) -> list[int]:
        """Which HF source each region of ``slices`` reads: one region per source, in order, unless
        the transform reads several regions of one fused tensor (``FusedQKV``, ``FusedGatedMLP``)."""
        return list(range(n_regions))

    def local_shape(self, hf: Sequence[Shape], tp: int) -> Shape:  # expected megatron shard shape
        raise NotImplementedError

    def slices(self, hf: Sequence[Shape], local: Shape, tp: int, rank: int) -> list[Region]:
        raise NotImplementedError

    def to_mcore(self, pieces: list[torch.Tensor], local: Shape, tp: int, rank: int) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, shards: list[torch.Tensor], hf: Sequence[Shape]) -> list[torch.Tensor]:
        raise NotImplementedError

    def to_mcore_into(self, pieces: list[torch.Tensor], out: torch.Tensor, tp: int, rank: int) -> None:
        """``to_mcore`` written straight into the parameter ``out`` (casting as needed). Transforms
        that assemble several pieces override it to skip the temporary."""
        out.copy_(self.to_mcore(pieces, tuple(out.shape), tp, rank))

    def row_runs(self, piece_rows: list[int], local: Shape, tp: int, rank: int):
        """The shard as runs of whole rows, in order: ``(piece, start, stop)`` takes rows
        ``start:stop`` of piece ``piece`` (the regions of ``slices``), ``(None, start, stop)`` is zero
        rows; None when the shard is not such a concatenation (``splice`` then loads it as usual).
        Rows are along dim 0; the runs must give what ``to_mcore`` gives (``tests/test_splice.py``)."""
        return None

    # Reference implementation used by tests: split full tensors the slow, obvious way.
    def split(self, full: Sequence[torch.Tensor], local: Shape, tp: int, rank: int) -> torch.Tensor:
        regions = self.slices([tuple(t.shape) for t in full], local, tp, rank)
        sources = self.region_sources(len(regions))
        return self.to_mcore([full[i][r] for i, r in zip(sources, regions)], local, tp, rank)

    def __repr__(self):
        return type(self).__name__
