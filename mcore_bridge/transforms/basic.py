"""One megatron parameter from one or more HF tensors by plain splits: replicated, column / row,
vocabulary, q/k/v and gate/up (each also from one fused HF tensor)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from .base import Region, Shape, Transform, _check, _full, _rows


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
