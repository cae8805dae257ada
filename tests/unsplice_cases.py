"""Cases for tests/test_unsplice.py, run inside ``verify.pool.Pool`` ranks (one call per rank)."""

from __future__ import annotations

from pathlib import Path

import torch

from mcore_bridge import Bridge, ParallelLayout, checkpoint, transforms


def hf_both_ways(source: str, layout: dict, out_dir: str, fmt: str, swap_kv: bool = False,
                 export_dtype: str | None = None) -> dict:
    """HF -> ``fmt`` (written from the loaded model), then that checkpoint -> HF twice: loaded into
    the model and exported from memory (``loaded/``), and with the parameters that are one record
    left unread and their HF tensors copied file to file (``spliced/``) from a model whose memory is
    NaN. ``swap_kv`` (a negative control): q/k/v's runs take v's rows where k's belong and k's for v's."""
    right = transforms.QKV.row_runs
    if swap_kv:
        def swapped(self, *args):
            return [({1: 2, 2: 1}.get(i, i), a, b) for i, a, b in right(self, *args)]
    out = Path(out_dir)
    bridge = Bridge(source, ParallelLayout(**layout))
    bridge.setup("cpu")
    dtype = bridge.source_dtype()
    models = bridge.build_model(dtype)
    bridge.load_weights(models)
    checkpoint.save_mcore(bridge, models, out / "mcore", overwrite=True, fmt=fmt)
    reader = checkpoint.bridge_from_mcore(out / "mcore", ParallelLayout(**layout))
    reader.setup("cpu")
    models = reader.build_model(dtype)
    checkpoint.load_mcore(reader, models, out / "mcore")
    reader.save_weights(models, out / "loaded", overwrite=True, dtype=export_dtype)
    models = reader.build_model(dtype)
    with torch.no_grad():
        for p in (p for m in models for p in m.parameters() if p.is_floating_point()):
            p.fill_(float("nan"))  # a parameter left unread and exported from memory would show
    spliced: dict = {}
    checkpoint.load_mcore(reader, models, out / "mcore", spliced=spliced)
    deferred = len(spliced)
    if swap_kv:
        transforms.QKV.row_runs = swapped
    try:
        reader.save_weights(models, out / "spliced", overwrite=True, spliced=spliced, dtype=export_dtype)
    finally:
        transforms.QKV.row_runs = right
    return {"rank": torch.distributed.get_rank(), "deferred": deferred,
            "copied": sorted(f"{c}.{n}" for c, n in spliced), "params": len(reader.state(models))}
