"""Moving megatron shards back to HF tensors: planned buckets, one collective per bucket.

Every rank knows the whole export statically (the inventory plus the HF shapes/dtypes), so no
metadata is ever exchanged. A bucket is a run of consecutive units owned by one pipeline stage:
its TP-split shards travel in a single all-gather inside the stage's tensor-parallel group and,
when every rank must receive the weights, the finished HF tensors in a single broadcast over the
pipeline group. Tensors are packed as raw bytes, so mixed dtypes share a bucket.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from .plan import LocalItem, Unit

ALIGN = 16  # byte alignment of tensors packed in a bucket (dtype views need aligned offsets)


@dataclasses.dataclass
class ExportUnit:
    unit: Unit
    index: int  # position in the export order (also picks the TP rank that writes it)
    hf_shapes: list[tuple[int, ...]]
    out_dtypes: list[torch.dtype]
    local: Optional[LocalItem] = None  # set on ranks of the owning stage

    @property
    def nbytes(self) -> int:
        return sum(_padded(nbytes(s, d)) for s, d in zip(self.hf_shapes, self.out_dtypes))


def nbytes(shape, dtype) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype``."""
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def make_buckets(units: list[ExportUnit], bucket_bytes: int, writer=None) -> list[list[ExportUnit]]:
    """Consecutive units of one stage (and, when ``writer`` is given, one writer) up to the size."""
    def key(u):
        return (u.unit.stage, writer[u.index] if writer else None)

    buckets, current, size = [], [], 0
    for u in units:
        if current and (key(u) != key(current[-1]) or size + u.nbytes > bucket_bytes):
            buckets.append(current)
            current, size = [], 0
        current.append(u)
        size += u.nbytes
    if current:
        buckets.append(current)
    return buckets


def pack(tensors: list[torch.Tensor], device) -> torch.Tensor:
    total = sum(_padded(t.numel() * t.element_size()) for t in tensors)
    buf = torch.empty(total, dtype=torch.uint8, device=device)
    off = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        buf[off:off + n].copy_(t.contiguous().reshape(-1).view(torch.uint8))
        off += _padded(n)
    return buf


def unpack(buf: torch.Tensor, specs: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    out, off = [], 0
    for shape, dtype in specs:
        n = nbytes(shape, dtype)
        out.append(buf[off:off + n].view(dtype).view(shape))
        off += _padded(n)
    return out


class Exporter:
    """Runs the export of one rank. ``state`` maps (chunk, param name) to the local tensor."""

    def __init__(self, units: list[ExportUnit], state: dict, tp_group, tp: int, tp_rank: int, device):
        self.units, self.state, self.tp_group, self.device = units, state, tp_group, device
        self.tp, self.tp_rank = tp, tp_rank

    def _local(self, u: ExportUnit) -> torch.Tensor:
        return self.state[(u.local.chunk, u.local.param)].detach()

    def gather(self, bucket: list[ExportUnit], dst: int | None = None) -> list[tuple[str, torch.Tensor]]:
        """On the owning stage: full HF tensors of a bucket, one collective for all split units.
        ``dst`` (a TP rank): only that rank receives and rebuilds them; the others return []."""
        split = [u for u in bucket if u.unit.rule.transform.tp_split and self.tp > 1]
        shards: dict[int, list[torch.Tensor]] = {}
        receiving = dst is None or dst == self.tp_rank
        if split:
            local = [self._local(u) for u in split]
            buf = pack(local, self.device)
            bufs = [torch.empty_like(buf) for _ in range(self.tp)] if receiving else None
            if dst is None:
                dist.all_gather(bufs, buf, group=self.tp_group)
            else:
                dist.gather(buf, bufs, group=self.tp_group, group_dst=dst)
        if not receiving:
            return []
        if split:
            specs = [(tuple(t.shape), t.dtype) for t in local]
            per_rank = [unpack(b, specs) for b in bufs]
            for i, u in enumerate(split):
                shards[u.index] = [r[i] for r in per_rank]
        out = []
        for u in bucket:
            parts = shards.get(u.index) or [self._local(u)]
            hf = u.unit.rule.transform.to_hf(parts, u.hf_shapes)
            for name, t, shape, dtype in zip(u.unit.hf_names, hf, u.hf_shapes, u.out_dtypes):
                if tuple(t.shape) != tuple(shape):
                    raise RuntimeError(f"export of {name}: rebuilt shape {tuple(t.shape)} != {shape}")
                out.append((name, t.to(dtype)))
        return out

    def broadcast(self, bucket: list[ExportUnit], tensors, pp_group, src: int):
        """Deliver a bucket's HF tensors from the owning stage to every pipeline stage."""
        specs = [(s, d) for u in bucket for s, d in zip(u.hf_shapes, u.out_dtypes)]
        names = [n for u in bucket for n in u.unit.hf_names]
        if tensors is not None:
            buf = pack([t for _, t in tensors], self.device)
        else:
            buf = torch.empty(sum(_padded(nbytes(s, d)) for s, d in specs), dtype=torch.uint8,
                              device=self.device)
        dist.broadcast(buf, src=src, group=pp_group)
        return list(zip(names, unpack(buf, specs)))


def iterate(exporter: Exporter, buckets, my_stage: int, pp: int, pp_group, pp_ranks: list[int],
            all_stages: bool, writer: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)``. ``all_stages``: every rank receives every tensor (PP
    broadcast); otherwise each stage yields only what it owns, and with ``writer`` (unit index ->
    TP rank) only to that TP rank."""
    for bucket in buckets:
        stage = bucket[0].unit.stage
        dst = writer[bucket[0].index] if writer else None
        tensors = exporter.gather(bucket, dst) if stage == my_stage else None
        if all_stages and pp > 1:
            tensors = exporter.broadcast(bucket, tensors, pp_group, pp_ranks[stage])
        if tensors is not None:
            yield from tensors


def balanced_writers(units: list[ExportUnit], tp: int) -> dict[int, int]:
    """Unit index -> TP rank that writes it: each stage's units in contiguous runs of about equal
    bytes, so a bucket has one writer and every TP rank writes its share."""
    out = {}
    for stage in sorted({u.unit.stage for u in units}):
        mine = [u for u in units if u.unit.stage == stage]
        total, seen = sum(u.nbytes for u in mine) or 1, 0
        for u in mine:
            out[u.index] = min(tp - 1, seen * tp // total)
            seen += u.nbytes
    return out
