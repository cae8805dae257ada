"""Megatron -> HF as a byte copy: the reverse of ``splice`` (issue 21 item 1).

A Megatron checkpoint stores each parameter shard as one contiguous record (a ``.distcp`` record's
tensor bytes, a plain-format safetensors entry), and most HF tensors are whole rows of those shards
in their dtype: a norm, the column-parallel shards one after the other, q/k/v out of megatron's
per-group interleave, gate and up out of ``[gate_r; up_r]``, the vocabulary without its padding. Such
an HF tensor is written with ``splice.write_runs`` straight from the checkpoint's files, never read
into memory.

Loading defers (:class:`Deferred`): a record that is exactly a window of a model tensor is not
read; its file range is noted instead, and a tensor covered entirely by such records becomes
``splice.Runs`` in the caller's ``spliced`` dict (a tensor covered partly is read after all, so that
the model never holds a hole). The export then asks :func:`hf_runs` for each unit: the inverse of
the transform's ``row_runs``, composed with the shards' runs. A unit whose HF tensors are not whole
rows of its shards (a row-parallel split at TP > 1, a dtype cast) is rebuilt by the rank writing it
from its shards read out of the files, with no gather. Anything else (stacked experts, FP8, a LoRA
merge) has its parameters read into the model first (:func:`materialize`), so every tensor the
export computes from is real.
Only the CLI's ``export --load ... --to-hf`` uses this: the model is left with unread parameters.
"""

from __future__ import annotations

import bisect
import math
import os

import torch

from .splice import Runs, sub_runs


def _rows(region, n: int) -> tuple[int, int] | None:
    start, stop, step = region.indices(n) if isinstance(region, slice) else (None, None, None)
    return None if step != 1 else (start, stop)


def _whole(region, shape) -> bool:
    """Whether a region's slices beyond dim 0 take every element of ``shape``'s trailing dims."""
    if len(region) > len(shape):
        return False
    for sl, n in zip(region[1:], shape[1:]):
        if not isinstance(sl, slice) or sl.indices(n) != (0, n, 1):
            return False
    return True


def _merge(runs):
    out = []
    for path, offset, n in runs:
        last = out[-1] if out else None
        if last and last[0] == path and (path is None or last[1] + last[2] == offset):
            out[-1] = (path, last[1], last[2] + n)
        elif n:
            out.append((path, offset, n))
    return out


def hf_runs(transform, hf_shapes, shards: list, tp: int) -> list[Runs] | None:
    """The HF tensors of a unit as runs of its shards' runs (``shards[r]``: TP rank ``r``'s
    ``Runs``), in ``hf_shapes`` order; None when some HF tensor is not whole rows of the shards
    (``to_hf`` then computes it from the loaded shards)."""
    if not shards or any(s is None for s in shards) or len(shards) != tp:
        return None
    dtype = shards[0].dtype
    hf_shapes = [tuple(s) for s in hf_shapes]
    if any(s.dtype != dtype or not s.shape for s in shards) or any(not s for s in hf_shapes):
        return None
    pieces: list[list] = [[] for _ in hf_shapes]  # per HF tensor: (hf row, rows, shard, shard row)
    for r, shard in enumerate(shards):
        local = tuple(shard.shape)
        regions = transform.slices(hf_shapes, local, tp, r)
        sources = transform.region_sources(len(regions))
        spans = []
        for region, src in zip(regions, sources):
            rows = _rows(region[0], hf_shapes[src][0]) if region else None
            if rows is None or not _whole(region, hf_shapes[src]) or hf_shapes[src][1:] != local[1:]:
                return None
            spans.append(rows)
        order = transform.row_runs([stop - start for start, stop in spans], local, tp, r)
        if order is None:
            return None
        at = 0
        for piece, start, stop in order:
            if piece is not None:
                pieces[sources[piece]].append((spans[piece][0] + start, stop - start, r, at))
            at += stop - start
        if at != local[0]:
            return None
    out = []
    for shape, mine in zip(hf_shapes, pieces):
        row = math.prod(shape[1:]) * dtype.itemsize
        runs, next_row = [], 0
        for hf_row, n, r, at in sorted(mine):
            if hf_row != next_row:
                return None
            runs += sub_runs(shards[r].runs, at * row, n * row)
            next_row += n
        if next_row != shape[0]:
            return None
        out.append(Runs(dtype, shape, _merge(runs)))
    return out


class Deferred:
    """Model tensors (``state``: key -> tensor, e.g. ``Bridge.state``) whose checkpoint records a
    load may leave unread. :meth:`take` notes a record instead of reading it; :meth:`finish` puts
    each tensor the noted records cover entirely into ``spliced`` and reads the others."""

    def __init__(self, state: dict):
        spans = sorted(((t.data_ptr(), t.numel() * t.element_size(), k, t) for k, t in state.items()
                        if t.numel() and t.is_contiguous()), key=lambda s: s[0])
        # two keys over the same memory (aliases, views of one parameter): neither is deferred, so
        # that no key is left holding bytes that were never read
        shared = {i for i in range(1, len(spans)) if spans[i - 1][0] + spans[i - 1][1] > spans[i][0]}
        spans = [s for i, s in enumerate(spans) if i not in shared and i + 1 not in shared]
        self.starts = [s[0] for s in spans]
        self.spans = spans
        self.pieces: dict = {}  # key -> [(byte offset in the tensor, nbytes, runs)]

    def take(self, target: torch.Tensor, path, offset: int) -> bool:
        """Note that ``target`` (a contiguous window of a model tensor) is the ``target.nbytes``
        bytes at ``offset`` of ``path``; False (read it) when it is no such window."""
        n = target.numel() * target.element_size()
        if not n or not target.is_contiguous():
            return False
        ptr = target.data_ptr()
        i = bisect.bisect_right(self.starts, ptr) - 1
        if i < 0:
            return False
        start, size, key, tensor = self.spans[i]
        if ptr + n > start + size or target.device != tensor.device or target.dtype != tensor.dtype:
            return False
        self.pieces.setdefault(key, []).append((ptr - start, n, [(os.path.abspath(path), offset, n)]))
        return True

    def finish(self, spliced: dict) -> None:
        """Tensors covered by their records go into ``spliced`` as ``Runs``; the rest are read now."""
        by_key = {s[2]: s for s in self.spans}
        for key, pieces in self.pieces.items():
            _, size, _, tensor = by_key[key]
            pieces.sort(key=lambda p: p[0])
            at = 0
            for offset, n, _ in pieces:
                if offset != at:
                    break
                at += n
            if at == size:
                spliced[key] = Runs(tensor.dtype, tuple(tensor.shape), _merge([r for p in pieces for r in p[2]]))
            else:
                for offset, n, runs in pieces:
                    _read_into(tensor, offset, Runs(torch.uint8, (n,), runs))
        self.pieces.clear()


def _read_into(tensor: torch.Tensor, offset: int, runs: Runs) -> None:
    flat = tensor.detach().reshape(-1).view(torch.uint8)
    with torch.no_grad():
        flat[offset:offset + runs.nbytes].copy_(runs.read().reshape(-1).view(torch.uint8))


def materialize(state: dict, spliced: dict, keep=()) -> None:
    """Read every tensor of ``spliced`` but those in ``keep`` into ``state``'s tensor, and drop it
    from ``spliced``: the model then holds real values wherever a computation may read it."""
    for key in [k for k in spliced if k not in keep]:
        _read_into(state[key], 0, spliced.pop(key))


def unit_runs(units, groups, spliced: dict) -> tuple[dict, dict]:
    """Collective (every rank of the export). For every unit whose shards (this rank's and the rest
    of its splitting group's, exchanged once as file ranges) are all in a rank's ``spliced``:
    ``(hf, shards)``: ``hf[index]``, its HF tensors as ``Runs`` when they are whole rows of the
    shards in their dtype; otherwise ``shards[index]``, the shards' ``Runs`` by TP rank, which the
    rank writing the unit reads from the files itself (a row-parallel split, a cast) instead of
    every rank reading its shard and gathering it."""
    import torch.distributed as dist

    mine = []
    for u in units:
        runs = spliced.get((u.local.chunk, u.local.param)) if u.local is not None else None
        if runs is not None:
            _, size, rank = groups.split(u.unit.rule)
            mine.append((u.index, rank if u.unit.rule.transform.tp_split and size > 1 else 0, runs))
    everyone = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    parts: dict = {}
    for contribution in everyone:
        for index, rank, runs in contribution:
            parts.setdefault(index, {})[rank] = runs
    hf, shards = {}, {}
    for u in units:
        if u.index not in parts:
            continue
        transform = u.unit.rule.transform
        n = groups.split(u.unit.rule)[1] if transform.tp_split else 1
        by_rank = [parts[u.index].get(r) for r in range(n)]
        if any(r is None for r in by_rank):
            continue
        got = hf_runs(transform, u.hf_shapes, by_rank, n)
        if got is not None and all(r.dtype == d for r, d in zip(got, u.out_dtypes)):
            hf[u.index] = got
        else:
            shards[u.index] = by_rank
    return hf, shards
