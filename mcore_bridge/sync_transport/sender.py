"""Trainer side: buckets of ``Bridge.export_buckets`` broadcast to the engine ranks of a
``TransportGroup``, one step at a time (``BEGIN``, the buckets, ``END``)."""

from __future__ import annotations

import time

import torch

from ..errors import UsageError

BEGIN, BUCKET, END, ABORT = 1, 2, 3, 4
FORMATS = ("weights", "lora")


class Sender:
    """Rank 0 of ``group`` (the trainer's sending rank). ``send`` broadcasts one step's buckets:
    a bucket's metadata travels with it on the first step and whenever it changed, otherwise the
    engine reuses the metadata it kept (the layout fixes it). A bucket's broadcast overlaps the
    export of the next one (the exporter allocates each bucket afresh; the sent one is kept alive
    until its broadcast finished)."""

    def __init__(self, group):
        if group.rank != 0:
            raise UsageError(f"Sender: rank 0 of the transport group sends, this process is rank {group.rank}; "
                             f"engine ranks use Receiver")
        self.group = group
        self.step = 0

    def send(self, buckets, *, fmt: str = "weights", fp8_block=None) -> dict:
        """Broadcast ``buckets`` (``sync.Bucket`` objects, e.g. from ``export_buckets``). ``fmt``:
        "weights" (HF checkpoint names) or "lora" (PEFT factor names); ``fp8_block``: the
        ``[rows, cols]`` block of FP8 tensors in the buckets (their ``_scale_inv`` alongside).
        Returns ``{"step", "buckets", "bytes", "metas" (buckets whose metadata travelled), "seconds"}``."""
        if fmt not in FORMATS:
            raise UsageError(f"fmt={fmt!r}: choose {', '.join(FORMATS)}")
        self.step += 1
        g = self.group
        t0 = time.perf_counter()
        g.send_message(BEGIN, self.step, {"format": fmt, "fp8_block": list(fp8_block) if fp8_block else None},
                       None)
        count = total = metas = 0
        in_flight = None
        kind = f"{fmt}/{'fp8' if fp8_block else 'as-exported'}"  # metadata kept per kind of step
        try:
            for bucket in buckets:
                meta = bucket.meta.to_dict()
                known = g.metas.get((kind, count)) == meta  # kept by the group: every engine saw it
                g.metas[(kind, count)] = meta
                metas += not known
                work = g.send_message(BUCKET, count, None if known else meta, bucket.buffer[:bucket.meta.nbytes],
                                      async_op=True)
                if in_flight is not None and in_flight[0] is not None:
                    in_flight[0].wait()
                in_flight = (work, bucket)
                count += 1
                total += bucket.meta.nbytes
            if in_flight is not None and in_flight[0] is not None:
                in_flight[0].wait()
        except Exception as e:  # the engines learn that this step ended without its tensors
            if in_flight is not None and in_flight[0] is not None:
                in_flight[0].wait()
            g.send_message(ABORT, count, {"error": f"{type(e).__name__}: {e}"}, None)
            raise
        g.send_message(END, count, {"buckets": count, "bytes": total}, None)
        if g.device.type == "cuda":
            torch.cuda.current_stream(g.device).synchronize()
        return {"step": self.step, "buckets": count, "bytes": total, "metas": metas, "seconds": time.perf_counter() - t0}


def push(bridge, models, sender: Sender | None, *, sending_rank: int = 0, dtype=None, lora: bool = False,
         bucket_bytes: int | None = None, merge_lora: bool = True) -> dict | None:
    """One weight sync, called by EVERY trainer rank (the export is collective): the buckets reach
    ``sending_rank`` (a global rank of the trainer), which passes ``sender`` (the others pass
    None) and broadcasts them to the engines. ``dtype="fp8"``: blockwise FP8 with scales;
    ``lora``: the LoRA factors only (PEFT names), for engines that apply adapters. Returns the
    sender's stats on the sending rank, None elsewhere."""
    from ..bridge import DEFAULT_BUCKET_BYTES
    from ..runtime import dist as rt

    me = rt.rank()
    if (sender is not None) != (me == sending_rank):
        raise UsageError(f"push: rank {me} {'passes' if sender is not None else 'lacks'} a Sender; exactly "
                         f"sending_rank={sending_rank} passes one (the rank that created the transport group)")
    _, fp8 = bridge.fp8_plan(dtype, lora)
    kwargs = dict(bucket_bytes=bucket_bytes or DEFAULT_BUCKET_BYTES, dtype=dtype, receivers=sending_rank,
                  merge_lora=merge_lora, peft_format=lora)
    if sender is not None and sender.group.device.type == "cuda":
        kwargs["device"] = sender.group.device
    stream = bridge.export_buckets(models, **kwargs)
    if sender is None:
        for _ in stream:  # not a receiver of the export: nothing arrives, the collectives run
            pass
        return None
    return sender.send(stream, fmt="lora" if lora else "weights", fp8_block=fp8[1] if fp8 else None)
