"""Moving megatron shards back to HF tensors: planned buckets, one collective per bucket.

Every rank knows the whole export statically (the inventory plus the HF shapes/dtypes), so no
metadata is ever exchanged. A bucket is a run of consecutive units with one owner -- a pipeline
stage, and for experts also the expert-parallel rank holding them. Its TP-split shards travel in a
single all-gather inside the owner's tensor-parallel group (the expert-TP group for experts) and,
when every rank must receive the weights, the finished HF tensors in a single broadcast over the
expert-parallel group (experts) and then over the pipeline group. Tensors are packed as raw bytes,
so mixed dtypes share a bucket.
"""

from __future__ import annotations

import dataclasses
import functools
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

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        return self.unit.hf_names

    @functools.cached_property
    def nbytes(self) -> int:
        return sum(_padded(nbytes(s, d)) for s, d in zip(self.hf_shapes, self.out_dtypes))


def nbytes(shape, dtype) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype``."""
    n = 1
    for d in shape:
        n *= d
    return n * dtype.itemsize


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _padded_total(bucket) -> int:
    return sum(u.nbytes for u in bucket)


def make_buckets(units: list[ExportUnit], bucket_bytes: int, writer=None) -> list[list[ExportUnit]]:
    """Consecutive units of one owner (and, when ``writer`` is given, one writer) up to the size."""
    def key(u):
        return (u.unit.owner, writer[u.index] if writer else None)

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
    """One flat uint8 buffer holding ``tensors`` back to back, each padded to ``ALIGN`` bytes --
    written by a single concatenation (one kernel for the bucket, not one copy per tensor)."""
    pieces, total = [], 0
    for t in tensors:
        n = t.numel() * t.element_size()
        pieces.append((t.view(-1) if t.is_contiguous() else t.reshape(-1)).view(torch.uint8))
        pad = _padded(n) - n
        if pad:
            pieces.append(torch.zeros(pad, dtype=torch.uint8, device=t.device))
        total += n + pad
    buf = torch.empty(total, dtype=torch.uint8, device=device)
    if pieces:
        torch.cat([p if p.device == buf.device else p.to(device) for p in pieces], out=buf)
    return buf


def unpack(buf: torch.Tensor, specs: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    dtype = specs[0][1] if specs else None
    if all(d == dtype and nbytes(sh, d) % ALIGN == 0 for sh, d in specs):  # no padding: one split
        numels = [nbytes(sh, d) // d.itemsize for sh, d in specs]
        flat = buf[: sum(numels) * dtype.itemsize].view(dtype)
        return [p.view(sh) for p, (sh, _) in zip(flat.split(numels), specs)]
    out, off = [], 0
    for shape, dtype in specs:
        n = nbytes(shape, dtype)
        out.append(buf[off:off + n].view(dtype).view(shape))
        off += _padded(n)
    return out


@dataclasses.dataclass
class Groups:
    """This rank's place in the dense and expert grids, and the process groups export uses."""

    pp_rank: int = 0
    tp: int = 1
    tp_rank: int = 0
    dp_rank: int = 0
    etp: int = 1
    etp_rank: int = 0
    ep: int = 1
    ep_rank: int = 0
    edp_rank: int = 0
    tp_group: object = None
    etp_group: object = None
    ep_group: object = None
    pp_group: object = None
    pp_ranks: list = dataclasses.field(default_factory=lambda: [0])  # global rank of each stage
    ep_ranks: list = dataclasses.field(default_factory=lambda: [0])  # global rank of each EP rank

    def split(self, rule) -> tuple[object, int, int]:
        """(group, size, my rank) of the tensor-parallel group that splits ``rule``'s parameters:
        the expert-TP group for experts, the TP group for everything else."""
        if rule.expert:
            return self.etp_group, self.etp, self.etp_rank
        return self.tp_group, self.tp, self.tp_rank

    def holds(self, owner) -> bool:
        stage, ep_owner = owner
        return stage == self.pp_rank and ep_owner in (None, self.ep_rank)

    def first_replica(self, owner) -> bool:
        """Whether this rank belongs to the replica that writes ``owner``'s tensors."""
        return (self.dp_rank if owner[1] is None else self.edp_rank) == 0


class Exporter:
    """Runs the export of one rank. ``state`` maps (chunk, param name) to the local tensor.
    ``spliced``: parameters a load left unread (``unsplice``); with ``as_runs`` (a consumer that
    writes ``splice.Runs``: the HF file writer) a unit made of them yields its HF tensors as runs of
    the checkpoint's files (collective), and any other of them is read into the model first."""

    def __init__(self, units: list[ExportUnit], state: dict, groups: Groups, device, spliced: dict | None = None,
                 as_runs: bool = False):
        self.units, self.state, self.g, self.device = units, state, groups, device
        self._stored: dict[int, bool] = {}
        self.runs: dict[int, list] = {}  # unit index -> its HF tensors as splice.Runs
        self.from_files: dict[int, list] = {}  # unit index -> its shards as splice.Runs, by TP rank
        if spliced is not None:
            from . import unsplice

            if as_runs:
                self.runs, self.from_files = unsplice.unit_runs(units, groups, spliced)
            unsplice.materialize(state, spliced, keep={
                (u.local.chunk, u.local.param) for u in units
                if u.local is not None and (u.index in self.runs or u.index in self.from_files)})

    def _local(self, u: ExportUnit) -> torch.Tensor:
        return self.state[(u.local.chunk, u.local.param)].detach()

    def gather(self, bucket: list[ExportUnit], dst: int | None = None) -> list[tuple[str, torch.Tensor]]:
        """On the owning ranks: full HF tensors of a bucket, one collective for all split units.
        ``dst`` (a rank of the splitting group): only it receives and rebuilds them; the others
        return []."""
        return self._finish(self._start(bucket, dst))

    def _start(self, bucket, dst):
        """Pack this rank's shards of the bucket's split units and start their collective
        (asynchronous: the next bucket's transfer overlaps the current one's reassembly)."""
        group, size, rank = self.g.split(bucket[0].unit.rule)
        split = [u for u in bucket if u.unit.rule.transform.tp_split and size > 1
                 and u.index not in self.runs and u.index not in self.from_files]
        receiving = dst is None or dst == rank
        state = {"bucket": bucket, "split": split, "receiving": receiving, "work": None}
        if split:
            local = [self._local(u) for u in split]
            buf = pack(local, self.device)
            state["specs"] = [(tuple(t.shape), t.dtype) for t in local]
            if dst is None:
                out = torch.empty(size * buf.numel(), dtype=torch.uint8, device=buf.device)
                state["work"] = dist.all_gather_into_tensor(out, buf, group=group, async_op=True)
                state["bufs"] = list(out.chunk(size))
            else:
                bufs = [torch.empty_like(buf) for _ in range(size)] if receiving else None
                state["work"] = dist.gather(buf, bufs, group=group, group_dst=dst, async_op=True)
                state["bufs"] = bufs
            state["keep"] = buf  # alive until the collective completes
        return state

    def _finish(self, state) -> list[tuple[str, torch.Tensor]]:
        if state["work"] is not None:
            state["work"].wait()
        if not state["receiving"]:
            return []
        shards: dict[int, list[torch.Tensor]] = {}
        if state["split"]:
            per_rank = [unpack(b, state["specs"]) for b in state["bufs"]]
            for i, u in enumerate(state["split"]):
                shards[u.index] = [r[i] for r in per_rank]
        out = []
        for u in state["bucket"]:
            if u.index in self.runs:
                out += zip(u.names, self.runs[u.index])
                continue
            if u.index in self.from_files:  # every shard read from the checkpoint's files, here
                parts = [r.read() for r in self.from_files[u.index]]
            else:
                parts = shards.get(u.index) or [self._local(u)]
            hf = u.unit.rule.transform.to_hf(parts, u.hf_shapes)
            for name, t, shape, dtype in zip(u.names, hf, u.hf_shapes, u.out_dtypes):
                if t.shape != shape:
                    raise RuntimeError(f"export of {name}: rebuilt shape {tuple(t.shape)} != {shape}")
                out.append((name, t if t.dtype == dtype else t.to(dtype)))
        return out

    def broadcast(self, bucket: list[ExportUnit], tensors, group, src: int):
        """Deliver a bucket's HF tensors from the rank holding them (global rank ``src``) to the
        rest of ``group``: ``(named tensors, packed buffer)``."""
        buf = pack([t for _, t in tensors], self.device) if tensors is not None else self._empty(bucket)
        dist.broadcast(buf, src=src, group=group)
        return self._named(bucket, buf), buf

    def iterate(self, buckets, all_stages: bool, writer: dict | None = None
                ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(hf_name, tensor)``. ``all_stages``: every rank receives every tensor (EP and
        PP broadcasts); otherwise each owner yields only its own tensors, and with ``writer``
        (unit index -> rank in the splitting group) only to that rank of the first replica."""
        for _, tensors, _ in self.iterate_buckets(buckets, "all" if all_stages else None, writer):
            if tensors is not None:
                yield from tensors

    def iterate_buckets(self, buckets, receivers, writer: dict | None = None, owner_rank=None, leaders=None):
        """Per bucket ``(bucket, [(hf_name, tensor)] or None, packed buffer or None)``; the buffer
        (the tensors packed as ``pack`` lays them out) when the last hop delivered one.

        ``receivers``: "all" (EP and PP broadcasts reach every rank), None (each owner keeps its
        own, see ``iterate``), or a sorted list of global ranks: the owner's first replica gathers
        onto its TP rank 0 (global rank ``owner_rank(owner)``), sends the packed bucket to the
        first receiver, which broadcasts it over ``leaders`` (a group of all receivers) if several."""
        g = self.g
        me = dist.get_rank() if dist.is_initialized() else 0
        steps = self._steps(buckets) if receivers == "all" else [[b] for b in buckets]

        def start(i):  # this rank's gather for step i, or None when it takes no part
            step = steps[i]
            if len(step) > 1:  # an EP round: each rank of the stage holds one of its buckets
                mine = [b for b in step if g.holds(b[0].unit.owner)]
                if mine and self.as_stored(mine[0]):  # packed straight from the parameters
                    return {"as_stored": mine[0]}
                return self._start(mine[0], None) if mine else None
            bucket = step[0]
            dst = 0 if isinstance(receivers, list) else (writer[bucket[0].index] if writer else None)
            if g.holds(bucket[0].unit.owner) and (dst is None or g.first_replica(bucket[0].unit.owner)):
                return self._start(bucket, dst)
            return None

        pending = start(0) if steps else None
        for i, step in enumerate(steps):
            current, pending = pending, (start(i + 1) if i + 1 < len(steps) else None)  # two in flight
            if current is not None and "as_stored" in current:
                yield from self._round(step, [self._local(u) for u in current["as_stored"]])
                continue
            tensors = (self._finish(current) or None) if current is not None else None  # [] off the dst
            if len(step) > 1:
                yield from self._round(step, [t for _, t in tensors] if tensors else None)
                continue
            bucket = step[0]
            stage, ep_owner = owner = bucket[0].unit.owner
            buf = None
            if receivers == "all":
                if ep_owner is not None and g.ep > 1 and stage == g.pp_rank:
                    tensors, buf = self.broadcast(bucket, tensors, g.ep_group, g.ep_ranks[ep_owner])
                if len(g.pp_ranks) > 1:
                    tensors, buf = self.broadcast(bucket, tensors, g.pp_group, g.pp_ranks[stage])
            elif isinstance(receivers, list):
                src, first = owner_rank(owner), receivers[0]
                if src != first and me in (src, first):
                    tensors, buf = self.send(bucket, tensors, src, first)
                if len(receivers) > 1 and me in receivers:
                    tensors, buf = self.broadcast(bucket, tensors, leaders, first)
                if me not in receivers:
                    tensors, buf = None, None
            yield bucket, tensors, buf

    def _steps(self, buckets) -> list[list]:
        """Buckets grouped into the steps of an every-rank export. Expert buckets of one layer come
        as one run per expert-parallel rank, mirror images of each other (same units, same bytes):
        their k-th buckets form a round, exchanged by a single all-gather over the EP group, every
        link busy both ways, instead of one broadcast per owner."""
        g, steps, i = self.g, [], 0
        while i < len(buckets):
            stage, ep_owner = buckets[i][0].unit.owner
            if ep_owner is None or g.ep == 1:
                steps.append([buckets[i]])
                i += 1
                continue
            layer, j = buckets[i][0].unit.layer, i
            while (j < len(buckets) and buckets[j][0].unit.owner[1] is not None
                   and buckets[j][0].unit.owner[0] == stage and buckets[j][0].unit.layer == layer):
                j += 1
            per = [[b for b in buckets[i:j] if b[0].unit.owner[1] == r] for r in range(g.ep)]
            mirrored = all(len(p) == len(per[0]) for p in per) and all(
                [u.nbytes for u in p[k]] == [u.nbytes for u in per[0][k]] for p in per for k in range(len(p)))
            steps += [list(r) for r in zip(*per)] if mirrored else [[b] for b in buckets[i:j]]
            i = j
        return steps

    def as_stored(self, bucket) -> bool:
        """Whether the bucket's HF tensors are its parameters' bytes as they lie (no TP split,
        no reordering, no cast: e.g. whole experts, whose fc1 rows are [gate; up])."""
        key = id(bucket)
        if key not in self._stored:  # decided once per plan
            _, size, _ = self.g.split(bucket[0].unit.rule)
            raw = getattr(self.state, "state", self.state)  # a MergedState's own weights
            self._stored[key] = all(
                (size == 1 or not u.unit.rule.transform.tp_split) and u.unit.rule.transform.as_stored
                and all(d == raw[(u.local.chunk, u.local.param)].dtype and nbytes(s, d) % ALIGN == 0
                        for s, d in zip(u.hf_shapes, u.out_dtypes)) for u in bucket)
        return self._stored[key]

    def _round(self, step, payload):
        """One EP round: this rank's bucket (``payload``: its HF tensors, or its parameters when
        stored as HF lays them out) all-gathered over the EP group, then the whole round broadcast
        over the pipeline group."""
        g = self.g
        stage = step[0][0].unit.owner[0]
        size = _padded_total(step[0])
        out = None
        if stage == g.pp_rank:
            out = torch.empty(size * len(step), dtype=torch.uint8, device=self.device)
            dist.all_gather_into_tensor(out, pack(payload, self.device), group=g.ep_group)
        if len(g.pp_ranks) > 1:
            if out is None:
                out = torch.empty(size * len(step), dtype=torch.uint8, device=self.device)
            dist.broadcast(out, src=g.pp_ranks[stage], group=g.pp_group)
        for k, bucket in enumerate(step):
            chunk = out[k * size:(k + 1) * size]
            yield bucket, self._named(bucket, chunk), chunk

    def send(self, bucket: list[ExportUnit], tensors, src: int, dst: int):
        """Point to point: the bucket's HF tensors from global rank ``src`` to ``dst``."""
        if tensors is not None:
            buf = pack([t for _, t in tensors], self.device)
            dist.send(buf, dst)
            return None, None
        buf = self._empty(bucket)
        dist.recv(buf, src)
        return self._named(bucket, buf), buf

    def _specs(self, bucket):
        return [(s, d) for u in bucket for s, d in zip(u.hf_shapes, u.out_dtypes)]

    def _empty(self, bucket) -> torch.Tensor:
        return torch.empty(sum(_padded(nbytes(s, d)) for s, d in self._specs(bucket)), dtype=torch.uint8,
                           device=self.device)

    def _named(self, bucket, buf):
        return list(zip([n for u in bucket for n in u.names], unpack(buf, self._specs(bucket))))


def balanced_writers(units: list[ExportUnit], groups: Groups) -> dict[int, int]:
    """Unit index -> rank (in the owner's splitting group) that writes it: each owner's units in
    contiguous runs of about equal bytes, so a bucket has one writer and every rank writes its share."""
    out = {}
    for owner in sorted({u.unit.owner for u in units}, key=str):
        mine = [u for u in units if u.unit.owner == owner]
        size = groups.etp if owner[1] is not None else groups.tp
        total, seen = sum(u.nbytes for u in mine) or 1, 0
        for u in mine:
            out[u.index] = min(size - 1, seen * size // total)
            seen += u.nbytes
    return out
