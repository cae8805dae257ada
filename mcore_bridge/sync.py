"""Weight sync for RL: HF-named weights streamed from a sharded megatron model to an inference
engine (vLLM / SGLang), in buckets.

A ``Bucket`` is one flat ``uint8`` buffer holding several HF tensors back to back (16-byte aligned)
plus ``BucketMeta``: names, shapes, dtypes, offsets. The buffer can travel by CUDA IPC or an NCCL
broadcast to a separate engine process; there ``unpack_bucket(buffer, meta)`` (torch only, no
megatron) gives the ``(name, tensor)`` pairs to hand to ``model.load_weights``. The metadata is the
same on every rank and every step (it follows from the layout), so it can be sent once.

Who receives (``receivers``): "all" (every rank: engines colocated with the trainer's ranks),
"node" (local rank 0 of every node), or "rank" / an int (one global rank, default 0). For the
latter two a bucket is gathered onto one rank of its owning stage and sent point to point to the
first receiver, which broadcasts it to the other node leaders: no per-parameter collective, no
metadata exchange.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import torch

from .errors import UsageError

ALIGN = 16


@dataclasses.dataclass(frozen=True)
class BucketMeta:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]  # torch dtype names without the "torch." prefix, e.g. "bfloat16"
    offsets: tuple[int, ...]  # byte offset of each tensor in the buffer
    nbytes: int  # buffer size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BucketMeta":
        return cls(tuple(d["names"]), tuple(tuple(s) for s in d["shapes"]), tuple(d["dtypes"]),
                   tuple(d["offsets"]), int(d["nbytes"]))


@dataclasses.dataclass
class Bucket:
    buffer: torch.Tensor  # flat uint8
    meta: BucketMeta

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        return unpack_bucket(self.buffer, self.meta)


def unpack_bucket(buffer: torch.Tensor, meta: BucketMeta | dict) -> list[tuple[str, torch.Tensor]]:
    """The receiver side: ``(name, tensor)`` views into ``buffer`` (no copy)."""
    if isinstance(meta, dict):
        meta = BucketMeta.from_dict(meta)
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < meta.nbytes:
        raise ValueError(f"bucket buffer: expected a flat uint8 tensor of {meta.nbytes} bytes, got "
                         f"{buffer.dtype} {tuple(buffer.shape)}")
    out = []
    for name, shape, dtype, off in zip(meta.names, meta.shapes, meta.dtypes, meta.offsets):
        dt = getattr(torch, dtype)
        n = torch.Size(shape).numel() * dt.itemsize
        out.append((name, buffer[off:off + n].view(dt).view(shape)))
    return out


def meta_of(named: list[tuple[str, torch.Tensor]]) -> BucketMeta:
    offsets, off = [], 0
    for _, t in named:
        offsets.append(off)
        off += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return BucketMeta(tuple(n for n, _ in named), tuple(tuple(t.shape) for _, t in named),
                      tuple(str(t.dtype).replace("torch.", "") for _, t in named), tuple(offsets), off)


def resolve_receivers(receivers, world: int) -> str | list[int]:
    """"all", or the sorted global ranks that receive. "node": local rank 0 of every node, from
    torchrun's LOCAL_WORLD_SIZE (every process on one node without it)."""
    if receivers in ("all", None):
        return "all"
    if receivers == "rank":
        return [0]
    if receivers == "node":
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        return list(range(0, world, per_node))
    if isinstance(receivers, int):
        if not 0 <= receivers < world:
            raise UsageError(f"receivers={receivers}: not a rank of this world of {world}")
        return [receivers]
    if isinstance(receivers, (list, tuple)) and receivers and all(isinstance(r, int) for r in receivers):
        bad = [r for r in receivers if not 0 <= r < world]
        if bad:
            raise UsageError(f"receivers {bad}: not ranks of this world of {world}")
        return sorted(set(receivers))
    raise UsageError(f"receivers={receivers!r}: choose 'all', 'node', 'rank', a global rank or a list of ranks")


def to_device(stream, device):
    """Move each bucket of an ``Exporter.iterate_buckets`` stream to ``device`` as one packed copy
    (host memory: pinned, from torch's caching host allocator), tensors re-pointed into it."""
    from .export import pack

    device = torch.device(device)
    for bucket, tensors, buf in stream:
        if tensors is None:
            yield bucket, tensors, buf
            continue
        meta = meta_of(tensors)
        if buf is None or buf.numel() != meta.nbytes:
            buf = pack([t for _, t in tensors], tensors[0][1].device)
        if buf.device != device:
            pinned = device.type == "cpu" and buf.is_cuda
            moved = torch.empty(buf.numel(), dtype=torch.uint8, device=device, pin_memory=pinned)
            moved.copy_(buf, non_blocking=pinned)
            if pinned:
                torch.cuda.current_stream(buf.device).synchronize()
            buf = moved
        yield bucket, unpack_bucket(buf, meta), buf


def buckets_from(stream) -> Iterator[Bucket]:
    """``Exporter.iterate_buckets`` output -> ``Bucket`` objects (re-packed only when the last hop
    did not already deliver the bucket packed)."""
    from .export import pack

    for _, tensors, buf in stream:
        if tensors is None:
            continue
        meta = meta_of(tensors)
        if buf is None or buf.numel() != meta.nbytes:
            buf = pack([t for _, t in tensors], tensors[0][1].device)
        yield Bucket(buf, meta)
