"""Pool cases for blockwise-FP8 checkpoints (run in every rank of a ``verify.pool`` pool)."""

from __future__ import annotations

import torch

from mcore_bridge import quant
from mcore_bridge.hf_io import HFCheckpoint
from mcore_bridge.runtime import dist as rt
from tests.cases import _loaded, same_bytes, spied_reads


def fp8_roundtrip(source: str, layout: dict, out_dir: str, out_fp8: str) -> dict:
    """FP8 source -> megatron (fp32) -> (a) the default export, against the dequantised view
    byte for byte; (b) the FP8 export, against the source's stored bytes: FP8 payload bytes that
    differ and the largest relative difference of a regenerated scale. Saves both (collective)."""
    bridge, models = _loaded(source, layout)
    src = HFCheckpoint(bridge.source)
    view = quant.open_quantized(HFCheckpoint(bridge.source))
    default = {"names": set(), "mismatches": []}
    for name, t in bridge.export_weights(models):
        default["names"].add(name)
        if not same_bytes(t, view.read(name)):
            default["mismatches"].append(name)
    fp8 = {"names": set(), "payload_bytes_differing": 0, "payload_bytes": 0, "scale_rel": 0.0, "other": []}
    for name, t in bridge.export_weights(models, dtype="fp8"):
        fp8["names"].add(name)
        ref = src.read(name)
        if name.endswith(quant.SCALE_SUFFIX):
            assert t.dtype == torch.float32 and t.shape == ref.shape, name
            fp8["scale_rel"] = max(fp8["scale_rel"], float(((t - ref) / ref).abs().max()))
        elif ref.dtype == quant.FP8:
            assert t.dtype == quant.FP8, name
            fp8["payload_bytes"] += ref.numel()
            fp8["payload_bytes_differing"] += int((t.view(torch.uint8) != ref.view(torch.uint8)).sum())
        elif not same_bytes(t, ref):
            fp8["other"].append(name)
    from mcore_bridge import sync

    buckets = {"names": set(), "mismatches": []}  # the RL path: packed buckets, unpacked by the engine
    for bucket in bridge.export_buckets(models, dtype="fp8", bucket_bytes=1 << 16):
        for name, t in sync.unpack_bucket(bucket.buffer, bucket.meta):
            buckets["names"].add(name)
            if not same_bytes(t, src.read(name)):
                buckets["mismatches"].append(name)
    buckets["names"] = sorted(buckets["names"])
    bridge.save_weights(models, out_dir, overwrite=True)
    bridge.save_weights(models, out_fp8, overwrite=True, dtype="fp8")
    default["names"], fp8["names"] = sorted(default["names"]), sorted(fp8["names"])
    return {"rank": rt.rank(), "default": default, "fp8": fp8, "buckets": buckets}


def fp8_reads(source: str, layout: dict) -> dict:
    """Bytes this rank read while loading: of FP8 weights and their scales, and the whole sizes."""
    with spied_reads() as reads:
        _loaded(source, layout)
    ckpt = HFCheckpoint(source)
    got = {"fp8": 0, "scale": 0, "regions": {}}
    for name, region in reads:
        info = ckpt.info(name)
        if info.dtype != quant.FP8 and not name.endswith(quant.SCALE_SUFFIX):
            continue
        n = info.shape[0] * info.shape[1] if region is None else \
            (region[0].indices(info.shape[0])[1] - region[0].indices(info.shape[0])[0]) * \
            (region[1].indices(info.shape[1])[1] - region[1].indices(info.shape[1])[0])
        got["scale" if name.endswith(quant.SCALE_SUFFIX) else "fp8"] += n * info.dtype.itemsize
        if "layers.0.self_attn" in name and region is not None:
            got["regions"][name] = [(s.start, s.stop) for s in region]
    got["fp8_total"] = sum(i.nbytes for i in ckpt.tensors.values() if i.dtype == quant.FP8)
    got["scale_total"] = sum(i.nbytes for n, i in ckpt.tensors.items() if n.endswith(quant.SCALE_SUFFIX))
    return got


def logits_latent_eps(source: str, layout: dict, latent_eps: float | None = None) -> float | None:
    """``cases.logits`` with the q/kv latent norms' eps forced (a control), or as the family builds them."""
    from mcore_bridge.families import deepseek
    from tests.cases import logits

    saved = deepseek.HF_LATENT_NORM_EPS
    if latent_eps is not None:
        deepseek.HF_LATENT_NORM_EPS = latent_eps
    try:
        return logits(source, layout)
    finally:
        deepseek.HF_LATENT_NORM_EPS = saved
