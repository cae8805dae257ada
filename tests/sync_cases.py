"""RL weight-sync functions run inside the ranks of a ``verify.pool.Pool`` (see ``tests/cases.py``)."""

from __future__ import annotations

import os

from mcore_bridge.lora import LoraSpec
from mcore_bridge.runtime import dist as rt
from mcore_bridge.sync import unpack_bucket
from tests.cases import _loaded
from tests.lora_cases import _logits


def stream(source: str, layout: dict, receivers=None, lora: bool = False, buckets: bool = False,
           bucket_bytes: int = 1 << 20, expert_storage: str | None = "source", peft_format: bool = False,
           local_world_size: int | None = None, device: str | None = None) -> dict:
    """What this rank receives from ``export_weights`` / ``export_buckets`` (cloned tensors), the
    megatron logits (first TP rank of the last stage) and the bucket sizes seen."""
    if local_world_size:
        os.environ["LOCAL_WORLD_SIZE"] = str(local_world_size)
    bridge, models = _loaded(source, layout)
    if lora:
        bridge.apply_lora(models, LoraSpec(r=4, alpha=8.0), random_b=True)
    got, sizes = {}, []
    if buckets:
        for b in bridge.export_buckets(models, bucket_bytes=bucket_bytes, receivers=receivers, device=device,
                                       peft_format=peft_format):
            sizes.append((b.meta.nbytes, len(b.meta.names), str(b.buffer.device)))
            for name, t in unpack_bucket(b.buffer.clone(), b.meta.to_dict()):  # as an engine process would
                assert name not in got, name
                got[name] = t.clone()
    else:
        for name, t in bridge.export_weights(models, bucket_bytes=bucket_bytes, receivers=receivers,
                                             expert_storage=expert_storage, peft_format=peft_format, device=device):
            assert name not in got, name
            got[name] = t.clone()
    os.environ.pop("LOCAL_WORLD_SIZE", None)
    return {"rank": rt.rank(), "got": got, "sizes": sizes, "logits": _logits(bridge, models)}
