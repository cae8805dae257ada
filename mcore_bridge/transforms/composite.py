"""Transforms built on others or on several HF tensors: copies of one tensor, the LoRA factors of
fused modules, head-grouped rows and multi-tensor row blocks."""

from __future__ import annotations

import dataclasses

import torch

from .base import Transform, _check, _full, _rows




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
