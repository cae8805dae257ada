"""The closed vocabulary of weight transforms between HF tensors and megatron shards.

A transform maps the HF tensor(s) behind one megatron parameter to the shard a tensor-parallel
rank holds, and back. It never reads whole tensors itself: ``slices`` names exactly the regions
of each HF tensor a rank needs (so the reader can fetch only those bytes), ``to_mcore`` assembles
the shard from those regions, and ``to_hf`` rebuilds the HF tensors from all ranks' shards.

Shapes are plain tuples; ``local`` is the shape of the megatron parameter on one rank.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from .errors import MappingError

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
    LoRA mapping); every transform in this module states its own (``tests/test_transforms.py``).
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


class Replicated(Transform):
    """Same tensor on every rank (norms, routers, biases of row-parallel layers)."""

    tp_split = False
    parallel_mode = "replicated"
    as_stored = True

    def lora_factor_transforms(self, n, per_projection):
        return REPLICATED, REPLICATED

    def local_shape(self, hf, tp):
        return hf[0]

    def slices(self, hf, local, tp, rank):
        return [_full(hf[0])]

    def to_mcore(self, pieces, local, tp, rank):
        return pieces[0]

    def row_runs(self, piece_rows, local, tp, rank):
        return [(0, 0, piece_rows[0])]

    def to_hf(self, shards, hf):
        return [shards[0]]


@dataclasses.dataclass(frozen=True, repr=False)
class Split(Transform):
    """Even split along ``dim``: 0 for column-parallel outputs, 1 for row-parallel inputs."""

    dim: int = 0
    as_stored = True

    @property
    def parallel_mode(self):
        return "column" if self.dim == 0 else "row"

    def lora_factor_transforms(self, n, per_projection):
        if self.dim == 1:
            return ROW, REPLICATED
        return self._column_factors(n, per_projection) if self.dim == 0 else None

    def local_shape(self, hf, tp):
        s = list(hf[0])
        _check(s[self.dim] % tp == 0, f"dim {self.dim} of size {s[self.dim]} does not split over tp={tp}")
        s[self.dim] //= tp
        return tuple(s)

    def slices(self, hf, local, tp, rank):
        n = local[self.dim]
        region = list(_full(hf[0]))
        region[self.dim] = slice(rank * n, (rank + 1) * n)
        return [tuple(region)]

    def to_mcore(self, pieces, local, tp, rank):
        return pieces[0]

    def row_runs(self, piece_rows, local, tp, rank):
        return [(0, 0, piece_rows[0])]  # a column split (dim 1) is not rows: the region check refuses it

    def to_hf(self, shards, hf):
        return [torch.cat(shards, dim=self.dim) if len(shards) > 1 else shards[0]]

    def __repr__(self):
        return "Column" if self.dim == 0 else "Row"


COLUMN = Split(0)
ROW = Split(1)
REPLICATED = Replicated()


class Vocab(Transform):
    """Embedding / output rows: padded to megatron's padded vocabulary, then split by rows.

    The padded size is read off the megatron parameter (``local[0] * tp``); padding rows are zero
    on load and dropped on export.
    """

    parallel_mode = "column"
    as_stored = False  # export drops the padding rows

    def local_shape(self, hf, tp):
        return None  # depends on the padding megatron chose; checked in slices()

    def slices(self, hf, local, tp, rank):
        vocab = hf[0][0]
        rows = local[0]
        _check(rows * tp >= vocab, f"padded vocab {rows * tp} smaller than checkpoint vocab {vocab}")
        _check(tuple(local[1:]) == tuple(hf[0][1:]), f"hidden size {hf[0][1:]} != model's {local[1:]}")
        start = min(rank * rows, vocab)
        stop = min((rank + 1) * rows, vocab)
        return [_rows(start, stop, len(hf[0]))]

    def to_mcore(self, pieces, local, tp, rank):
        piece = pieces[0]
        if piece.shape[0] == local[0]:
            return piece
        out = piece.new_zeros(local)
        out[: piece.shape[0]] = piece
        return out

    def to_mcore_into(self, pieces, out, tp, rank):
        n = pieces[0].shape[0]
        out[:n].copy_(pieces[0])
        out[n:].zero_()

    def row_runs(self, piece_rows, local, tp, rank):
        n = piece_rows[0]
        return [(0, 0, n)] + ([(None, n, local[0])] if local[0] > n else [])

    def to_hf(self, shards, hf):
        return [(torch.cat(shards, dim=0) if len(shards) > 1 else shards[0])[: hf[0][0]]]


VOCAB = Vocab()


@dataclasses.dataclass(frozen=True, repr=False)
class QKV(Transform):
    """q, k, v projections fused megatron-style: interleaved per query group
    ``[q heads of group 0, k_0, v_0, q heads of group 1, k_1, v_1, ...]``, split over tp by groups.
    Works for weights ``[out, hidden]`` and biases ``[out]``."""

    heads: int
    groups: int
    head_dim: int
    n_sources = 3
    parallel_mode = "column"
    as_stored = False  # megatron interleaves q/k/v per query group

    def lora_factor_transforms(self, n, per_projection):
        return self._column_factors(n, per_projection)

    @property
    def q_per_group(self):
        return self.heads // self.groups

    def _check_sources(self, hf):
        q, k, v = hf
        d = self.head_dim
        _check(q[0] == self.heads * d, f"q rows {q[0]} != heads {self.heads} x head_dim {d}")
        _check(k[0] == self.groups * d and v[0] == self.groups * d,
               f"k/v rows {k[0]}/{v[0]} != query groups {self.groups} x head_dim {d}")
        _check(q[1:] == k[1:] == v[1:], f"q/k/v trailing dims differ: {q}, {k}, {v}")

    def local_shape(self, hf, tp):
        self._check_sources(hf)
        _check(self.groups % tp == 0, f"{self.groups} query groups do not split over tp={tp}")
        rows = (self.heads + 2 * self.groups) * self.head_dim // tp
        return (rows,) + tuple(hf[0][1:])

    def slices(self, hf, local, tp, rank):
        self._check_sources(hf)
        g = self.groups // tp
        d, qg, nd = self.head_dim, self.q_per_group, len(hf[0])
        g0 = rank * g
        return [_rows(g0 * qg * d, (g0 + g) * qg * d, nd),
                _rows(g0 * d, (g0 + g) * d, nd),
                _rows(g0 * d, (g0 + g) * d, nd)]

    def to_mcore(self, pieces, local, tp, rank):
        q, k, v = pieces
        g, d = self.groups // tp, self.head_dim
        rest = tuple(q.shape[1:])
        fused = torch.cat([q.reshape(g, self.q_per_group * d, *rest),
                           k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1)
        return fused.reshape(-1, *rest)

    def to_mcore_into(self, pieces, out, tp, rank):
        g, d, qd = self.groups // tp, self.head_dim, self.q_per_group * self.head_dim
        grouped = out.view(g, qd + 2 * d, *out.shape[1:])
        for piece, rows in zip(pieces, (slice(0, qd), slice(qd, qd + d), slice(qd + d, qd + 2 * d))):
            grouped[:, rows].copy_(piece.reshape(g, rows.stop - rows.start, *piece.shape[1:]))

    def row_runs(self, piece_rows, local, tp, rank):
        g, d, qd = self.groups // tp, self.head_dim, self.q_per_group * self.head_dim
        return [run for j in range(g) for run in ((0, j * qd, (j + 1) * qd), (1, j * d, (j + 1) * d),
                                                  (2, j * d, (j + 1) * d))]

    def to_hf(self, shards, hf):
        full = torch.cat(shards, dim=0) if len(shards) > 1 else shards[0]
        d, rest = self.head_dim, tuple(full.shape[1:])
        grouped = full.reshape(self.groups, (self.q_per_group + 2) * d, *rest)
        q, k, v = torch.split(grouped, [self.q_per_group * d, d, d], dim=1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]


@dataclasses.dataclass(frozen=True, repr=False)
class GatedMLP(Transform):
    """gate and up projections, each split over tp, concatenated per rank as ``[gate_r; up_r]``."""

    n_sources = 2
    parallel_mode = "column"
    as_stored = True  # one shard holds [gate; up], the HF tensors in order
    swiglu = True

    def lora_factor_transforms(self, n, per_projection):
        return self._column_factors(n, per_projection)

    def local_shape(self, hf, tp):
        gate, up = hf
        _check(gate == up, f"gate {gate} and up {up} shapes differ")
        _check(gate[0] % tp == 0, f"intermediate size {gate[0]} does not split over tp={tp}")
        return (2 * gate[0] // tp,) + tuple(gate[1:])

    def slices(self, hf, local, tp, rank):
        n = hf[0][0] // tp
        return [_rows(rank * n, (rank + 1) * n, len(hf[0]))] * 2

    def to_mcore(self, pieces, local, tp, rank):
        return torch.cat(pieces, dim=0)

    def to_mcore_into(self, pieces, out, tp, rank):
        half = out.shape[0] // 2
        out[:half].copy_(pieces[0])
        out[half:].copy_(pieces[1])

    def row_runs(self, piece_rows, local, tp, rank):
        return [(0, 0, piece_rows[0]), (1, 0, piece_rows[1])]

    def to_hf(self, shards, hf):
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        if len(halves) == 1:  # views, no copy
            return list(halves[0])
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]


GATED_MLP = GatedMLP()


# -- fused HF tensors (Phi-3 ``qkv_proj`` [q; k; v], ``gate_up_proj`` [gate; up]) -------------------
# The same shards as QKV / GatedMLP from one HF tensor: its row blocks play the parts of the separate
# projections, and a rank reads only its rows of each block (several regions of one source).

def _offset_rows(regions: list[Region], offsets: Sequence[int]) -> list[Region]:
    return [(slice(r[0].start + o, r[0].stop + o),) + tuple(r[1:]) for r, o in zip(regions, offsets)]


@dataclasses.dataclass(frozen=True, repr=False)
class FusedQKV(QKV):
    """``QKV`` whose HF source is one tensor holding ``[q; k; v]`` rows (Phi-3 ``qkv_proj``)."""

    n_sources = 1
    parallel_mode = "column"
    as_stored = False  # megatron interleaves q/k/v per query group

    def _parts(self, hf) -> list[Shape]:
        (rows, *rest), d = hf[0], self.head_dim
        q, kv = self.heads * d, self.groups * d
        _check(rows == q + 2 * kv, f"fused qkv rows {rows} != (heads {self.heads} + 2 x query groups "
                                   f"{self.groups}) x head_dim {d}")
        return [(q, *rest), (kv, *rest), (kv, *rest)]

    def region_sources(self, n_regions):
        return [0] * n_regions

    def local_shape(self, hf, tp):
        return super().local_shape(self._parts(hf), tp)

    def slices(self, hf, local, tp, rank):
        q, kv = self._parts(hf)[:2]
        return _offset_rows(super().slices(self._parts(hf), local, tp, rank), (0, q[0], q[0] + kv[0]))

    def to_hf(self, shards, hf):
        return [torch.cat(super().to_hf(shards, self._parts(hf)), dim=0)]


@dataclasses.dataclass(frozen=True, repr=False)
class FusedGatedMLP(GatedMLP):
    """``GatedMLP`` whose HF source is one tensor holding ``[gate; up]`` rows (``gate_up_proj``)."""

    n_sources = 1
    parallel_mode = "column"
    as_stored = True  # one shard is [gate; up]: the HF tensor's bytes in order
    swiglu = True

    def _parts(self, hf) -> list[Shape]:
        rows, *rest = hf[0]
        _check(rows % 2 == 0, f"fused gate/up rows {rows} are not even")
        return [(rows // 2, *rest)] * 2

    def region_sources(self, n_regions):
        return [0] * n_regions

    def local_shape(self, hf, tp):
        return super().local_shape(self._parts(hf), tp)

    def slices(self, hf, local, tp, rank):
        parts = self._parts(hf)
        return _offset_rows(super().slices(parts, local, tp, rank), (0, parts[0][0]))

    def to_hf(self, shards, hf):
        if len(shards) == 1:  # the shard is [gate; up] already
            return [shards[0]]
        return [torch.cat(super().to_hf(shards, self._parts(hf)), dim=0)]


FUSED_GATED_MLP = FusedGatedMLP()



@dataclasses.dataclass(frozen=True, repr=False)
class Copies(Transform):
    """One megatron parameter stored ``n`` times in the HF checkpoint (a main tensor and copies of it,
    e.g. the embedding and output head repeated in each multi-token-prediction layer): each copy is
    read and split like ``inner``; loading checks they are equal (``identical_sources``, checked by
    name before any weight is loaded); export writes the one tensor ``n`` times."""

    inner: Transform = None
    n: int = 2
    as_stored = False  # export repeats the tensor
    identical_sources = True

    @property
    def n_sources(self):
        return self.n

    @property
    def tp_split(self):
        return self.inner.tp_split

    @property
    def parallel_mode(self):
        return self.inner.parallel_mode

    def _one(self, hf):
        _check(all(tuple(s) == tuple(hf[0]) for s in hf), f"the copies' shapes differ: {list(hf)}")
        return [hf[0]]

    def local_shape(self, hf, tp):
        return self.inner.local_shape(self._one(hf), tp)

    def slices(self, hf, local, tp, rank):
        return self.inner.slices(self._one(hf), local, tp, rank) * self.n

    def to_mcore(self, pieces, local, tp, rank):
        _check(all(torch.equal(p, pieces[0]) for p in pieces[1:]), "the copies differ")
        return self.inner.to_mcore(pieces[:1], local, tp, rank)

    def to_mcore_into(self, pieces, out, tp, rank):
        _check(all(torch.equal(p, pieces[0]) for p in pieces[1:]), "the copies differ")
        self.inner.to_mcore_into(pieces[:1], out, tp, rank)

    def to_hf(self, shards, hf):
        (t,) = self.inner.to_hf(shards, self._one(hf))
        return [t] + [t.clone() for _ in range(self.n - 1)]  # own storage each: safetensors refuses shared

    def __repr__(self):
        return f"Copies({self.inner!r}, {self.n})"


# -- LoRA factors of fused modules (see ``lora``) ----------------------------------------------
# A fused megatron linear (q/k/v, gate/up) holds one LoRA for n HF projections: A [r, in] shared by
# all of them (``Shared``) or stacked per projection (``Stacked``, [n*r, in]); B split like the
# weight, either directly (shared A) or block-structured (``Blocks``: projection i's rows use only
# columns i*r:(i+1)*r).


@dataclasses.dataclass(frozen=True, repr=False)
class _WholeSources(Transform):
    """Base: one replicated megatron tensor from ``n`` HF tensors, each read whole."""

    n: int = 2
    tp_split = False
    parallel_mode = "replicated"

    @property
    def n_sources(self):
        return self.n

    def slices(self, hf, local, tp, rank):
        return [_full(s) for s in hf]


@dataclasses.dataclass(frozen=True, repr=False)
class Shared(_WholeSources):
    """n identical HF tensors behind one replicated megatron tensor; loading checks they are equal."""

    as_stored = False  # export repeats the one tensor n times
    identical_sources = True

    def local_shape(self, hf, tp):
        _check(all(tuple(s) == tuple(hf[0]) for s in hf), f"shapes differ: {list(hf)}")
        return tuple(hf[0])

    def to_mcore(self, pieces, local, tp, rank):
        for p in pieces[1:]:
            _check(torch.equal(p, pieces[0]), "the projections' LoRA A differ: import with one A per "
                                              "projection (per_projection=True)")
        return pieces[0]

    def to_hf(self, shards, hf):
        return [shards[0]] * self.n


@dataclasses.dataclass(frozen=True, repr=False)
class Stacked(_WholeSources):
    """n HF tensors concatenated along dim 0 into one replicated megatron tensor."""

    as_stored = False  # (the bytes are in order; LoRA factors are small: kept on the general path)

    def local_shape(self, hf, tp):
        _check(all(tuple(s[1:]) == tuple(hf[0][1:]) for s in hf), f"trailing dims differ: {list(hf)}")
        return (sum(s[0] for s in hf),) + tuple(hf[0][1:])

    def to_mcore(self, pieces, local, tp, rank):
        return torch.cat(pieces, dim=0)

    def to_hf(self, shards, hf):
        return list(torch.split(shards[0], [s[0] for s in hf], dim=0))


@dataclasses.dataclass(frozen=True, repr=False)
class Blocks(Transform):
    """n HF tensors ``[out_i, r]`` as one block-structured ``[out, n*r]`` tensor, split over tp by
    ``inner`` (the transform of the weight they belong to); off-block entries are zero."""

    inner: Transform = None
    n: int = 2
    as_stored = False  # the off-block zeros are dropped on export

    @property
    def n_sources(self):
        return self.n

    @property
    def parallel_mode(self):
        return self.inner.parallel_mode

    def _wide(self, hf):
        _check(all(len(s) == 2 and s[1] == hf[0][1] for s in hf), f"expected [out, r] factors: {list(hf)}")
        return [(s[0], s[1] * self.n) for s in hf]

    def local_shape(self, hf, tp):
        return self.inner.local_shape(self._wide(hf), tp)

    def slices(self, hf, local, tp, rank):
        return self.inner.slices(self._wide(hf), local, tp, rank)

    def to_mcore(self, pieces, local, tp, rank):
        r = pieces[0].shape[1]
        wide = []
        for i, p in enumerate(pieces):
            w = p.new_zeros(p.shape[0], r * self.n)
            w[:, i * r:(i + 1) * r] = p
            wide.append(w)
        return self.inner.to_mcore(wide, local, tp, rank)

    def to_hf(self, shards, hf):
        full = self.inner.to_hf(shards, self._wide(hf))
        r = hf[0][1]
        for i, t in enumerate(full):
            off = torch.cat([t[:, :i * r], t[:, (i + 1) * r:]], dim=1)
            _check(not off.any(), f"projection {i}'s LoRA B has non-zero entries outside its block")
        return [t[:, i * r:(i + 1) * r] for i, t in enumerate(full)]


# -- head-grouped HF tensors (linear attention, gated attention) ------------------------------------

@dataclasses.dataclass(frozen=True, repr=False)
class GroupedRows(Transform):
    """HF tensors made of ``groups`` equal row blocks (one per head group, in order), each block cut
    into ``sections[source]`` row counts; tensor parallelism splits the groups (a rank reads one
    contiguous run of blocks per source). megatron's shard lists the sections in ``order``
    ((source, section) pairs, each once): group by group (``per_group``: all of group g's listed
    sections, then group g+1's) or section by section over the rank's groups.

    Qwen3-Next's delta-net ``in_proj_qkvz`` / ``in_proj_ba`` (per key head [q, k, v, z] and [b, a];
    megatron: [q; k; v; z; b; a] of the rank's heads) and its gated attention's ``q_proj`` (per head
    [query, gate]; megatron: per query group [queries, gates, k, v]) are two instances."""

    groups: int
    sections: tuple  # per source: the row counts of one group's block, in HF order
    order: tuple  # (source, section) pairs in megatron's order
    per_group: bool
    parallel_mode = "column"
    as_stored = False  # megatron regroups the rows

    def __post_init__(self):
        every = sorted((s, k) for s, secs in enumerate(self.sections) for k in range(len(secs)))
        if sorted(self.order) != every:
            raise ValueError(f"GroupedRows order {self.order} must list each (source, section) of "
                             f"{self.sections} exactly once")

    @property
    def n_sources(self):
        return len(self.sections)

    def _block(self, i: int) -> int:
        return sum(self.sections[i])

    def _check_sources(self, hf):
        _check(len(hf) == len(self.sections), f"{len(hf)} HF tensors for {len(self.sections)} sources")
        for i, s in enumerate(hf):
            _check(s[0] == self.groups * self._block(i),
                   f"HF tensor {i}: {s[0]} rows != {self.groups} head groups x {self._block(i)} rows")
            _check(tuple(s[1:]) == tuple(hf[0][1:]), f"HF tensors' trailing dims differ: {list(hf)}")

    def local_shape(self, hf, tp):
        self._check_sources(hf)
        _check(self.groups % tp == 0, f"{self.groups} head groups do not split over tp={tp}")
        rows = sum(self._block(i) for i in range(len(hf))) * self.groups // tp
        return (rows,) + tuple(hf[0][1:])

    def slices(self, hf, local, tp, rank):
        self._check_sources(hf)
        g = self.groups // tp
        return [_rows(rank * g * self._block(i), (rank + 1) * g * self._block(i), len(s)) for i, s in enumerate(hf)]

    def to_mcore(self, pieces, local, tp, rank):
        g = self.groups // tp
        rest = tuple(pieces[0].shape[1:])
        parts = [torch.split(p.reshape(g, self._block(i), *rest), list(self.sections[i]), dim=1)
                 for i, p in enumerate(pieces)]
        chosen = [parts[s][k] for s, k in self.order]
        if self.per_group:
            return torch.cat(chosen, dim=1).reshape(-1, *rest)
        return torch.cat([c.reshape(-1, *rest) for c in chosen], dim=0)

    def to_hf(self, shards, hf):
        g = self.groups // len(shards)
        rest = tuple(shards[0].shape[1:])
        sizes = [self.sections[s][k] for s, k in self.order]
        per_source = [[] for _ in self.sections]
        for shard in shards:
            if self.per_group:
                chunks = torch.split(shard.reshape(g, sum(sizes), *rest), sizes, dim=1)
            else:
                chunks = [c.reshape(g, n, *rest)
                          for c, n in zip(torch.split(shard, [g * n for n in sizes], dim=0), sizes)]
            found = dict(zip(self.order, chunks))
            for i, secs in enumerate(self.sections):
                per_source[i].append(torch.cat([found[(i, k)] for k in range(len(secs))], dim=1).reshape(-1, *rest))
        return [torch.cat(p, dim=0) if len(p) > 1 else p[0] for p in per_source]


@dataclasses.dataclass(frozen=True, repr=False)
class FusedBlocks(Transform):
    """HF tensors each made of row blocks (``sources[i]``: the block sizes of tensor i), every block
    split evenly over tensor parallelism; a rank's shard is its slice of every block, tensor by
    tensor, block by block (``FusedGatedMLP`` generalised: any number of blocks of any size, over
    one or several tensors). The delta-net's ``conv1d`` over [q; k; v] channels is
    ``FusedBlocks(((qk, qk, v),))``; Qwen3.5's split projections ``in_proj_qkv`` / ``_z`` / ``_b`` /
    ``_a`` into megatron's ``in_proj`` would be ``FusedBlocks(((qk, qk, v), (v,), (nv,), (nv,)))``."""

    sources: tuple  # per HF tensor: its row blocks' sizes
    parallel_mode = "column"
    as_stored = True  # a single shard is the tensors' blocks in order: the HF bytes

    @property
    def n_sources(self):
        return len(self.sources)

    def region_sources(self, n_regions):
        return [i for i, blocks in enumerate(self.sources) for _ in blocks]

    def _check_rows(self, hf, tp):
        _check(len(hf) == len(self.sources), f"{len(hf)} HF tensors for {len(self.sources)} sources")
        for shape, blocks in zip(hf, self.sources):
            _check(shape[0] == sum(blocks), f"{shape[0]} rows != blocks {list(blocks)}")
            _check(tuple(shape[1:]) == tuple(hf[0][1:]), f"HF tensors' trailing dims differ: {list(hf)}")
            for n in blocks:
                _check(n % tp == 0, f"block of {n} rows does not split over tp={tp}")

    def local_shape(self, hf, tp):
        self._check_rows(hf, tp)
        return (sum(s[0] for s in hf) // tp,) + tuple(hf[0][1:])

    def slices(self, hf, local, tp, rank):
        self._check_rows(hf, tp)
        out = []
        for shape, blocks in zip(hf, self.sources):
            start = 0
            for n in blocks:
                out.append(_rows(start + rank * n // tp, start + (rank + 1) * n // tp, len(shape)))
                start += n
        return out

    def to_mcore(self, pieces, local, tp, rank):
        return torch.cat(pieces, dim=0)

    def to_hf(self, shards, hf):
        tp = len(shards)
        sizes = [n // tp for blocks in self.sources for n in blocks]
        per = [torch.split(s, sizes, dim=0) for s in shards]
        out, b = [], 0
        for blocks in self.sources:
            out.append(torch.cat([p[b + j] for j in range(len(blocks)) for p in per], dim=0))
            b += len(blocks)
        return out
