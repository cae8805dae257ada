"""Cases for tests/test_splice.py, run inside ``verify.pool.Pool`` ranks (one call per rank)."""

from __future__ import annotations

from pathlib import Path

import torch

from mcore_bridge import Bridge, ParallelLayout, checkpoint, transforms
from mcore_bridge.runtime import dist as rt


def plain_both_ways(source: str, layout: dict, out_dir: str, swap_kv: bool = False) -> dict:
    """HF -> plain twice: loaded into the model and written from memory (``loaded/``), and with the
    whole-row parameters copied file to file (``spliced/``) into a model whose memory is NaN.
    ``swap_kv`` (a negative control): q/k/v's runs take v's rows where k's belong and k's for v's."""
    if swap_kv:
        right = transforms.QKV.row_runs

        def swapped(self, *args):
            return [({1: 2, 2: 1}.get(i, i), a, b) for i, a, b in right(self, *args)]
        transforms.QKV.row_runs = swapped
    try:
        return _plain_both_ways(source, layout, out_dir)
    finally:
        if swap_kv:
            transforms.QKV.row_runs = right


def _plain_both_ways(source: str, layout: dict, out_dir: str) -> dict:
    bridge = Bridge(source, ParallelLayout(**layout))
    bridge.setup("cpu")
    dtype = bridge.source_dtype()
    models = bridge.build_model(dtype)
    bridge.load_weights(models)
    checkpoint.save_mcore(bridge, models, Path(out_dir) / "loaded", overwrite=True, fmt="plain")
    models = bridge.build_model(dtype)
    with torch.no_grad():
        for p in (p for m in models for p in m.parameters() if p.is_floating_point()):
            p.fill_(float("nan"))  # a spliced parameter written from memory would show
    spliced: dict = {}
    bridge.load_weights(models, spliced=spliced)
    checkpoint.save_mcore(bridge, models, Path(out_dir) / "spliced", overwrite=True, fmt="plain", spliced=spliced)
    return {"rank": rt.rank(), "spliced": sorted(f"{c}.{n}" for c, n in spliced),
            "params": len(bridge.state(models))}
