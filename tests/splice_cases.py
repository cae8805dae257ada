"""Cases for tests/test_splice.py, run inside ``verify.pool.Pool`` ranks (one call per rank)."""

from __future__ import annotations

from pathlib import Path

import torch

from mcore_bridge import Bridge, ParallelLayout, checkpoint, transforms
from mcore_bridge.runtime import dist as rt


def plain_both_ways(source: str, layout: dict, out_dir: str, swap_kv: bool = False, fmt: str = "plain") -> dict:
    """HF -> ``fmt`` (plain or torch_dist) twice: loaded into the model and written from memory (``loaded/``), and with the
    whole-row parameters copied file to file (``spliced/``) into a model whose memory is NaN.
    ``swap_kv`` (a negative control): q/k/v's runs take v's rows where k's belong and k's for v's."""
    if swap_kv:
        right = transforms.QKV.row_runs

        def swapped(self, *args):
            return [({1: 2, 2: 1}.get(i, i), a, b) for i, a, b in right(self, *args)]
        transforms.QKV.row_runs = swapped
    try:
        return _both_ways(source, layout, out_dir, fmt)
    finally:
        if swap_kv:
            transforms.QKV.row_runs = right


def _both_ways(source: str, layout: dict, out_dir: str, fmt: str) -> dict:
    bridge = Bridge(source, ParallelLayout(**layout))
    bridge.setup("cpu")
    dtype = bridge.source_dtype()
    models = bridge.build_model(dtype)
    bridge.load_weights(models)
    checkpoint.save_mcore(bridge, models, Path(out_dir) / "loaded", overwrite=True, fmt=fmt)
    models = bridge.build_model(dtype)
    with torch.no_grad():
        for p in (p for m in models for p in m.parameters() if p.is_floating_point()):
            p.fill_(float("nan"))  # a spliced parameter written from memory would show
    spliced: dict = {}
    bridge.load_weights(models, spliced=spliced)
    checkpoint.save_mcore(bridge, models, Path(out_dir) / "spliced", overwrite=True, fmt=fmt, spliced=spliced)
    return {"rank": rt.rank(), "spliced": sorted(f"{c}.{n}" for c, n in spliced),
            "params": len(bridge.state(models))}


def derived_tensor_refused(source: str, layout: dict, out_dir: str) -> dict:
    """torch_dist with spliced parameters when megatron's sharded state holds a tensor computed from
    the model (here: one parameter's data replaced by a copy): every rank raises ``splice.Unsafe``
    before writing, nothing is left; then loading every parameter and saving works."""
    from mcore_bridge import dist_ckpt, splice

    bridge = Bridge(source, ParallelLayout(**layout))
    bridge.setup("cpu")
    models = bridge.build_model(bridge.source_dtype())
    spliced: dict = {}
    bridge.load_weights(models, spliced=spliced)
    real = dist_ckpt.sharded_state

    def with_a_copy(*args, **kwargs):
        state = real(*args, **kwargs)
        from megatron.core.dist_checkpointing import ShardedTensor
        from megatron.core.dist_checkpointing.dict_utils import nested_values

        first = next(v for v in nested_values(state) if isinstance(v, ShardedTensor) and "linear_qkv.weight" in v.key)
        first.data = first.data.clone()
        return state
    dist_ckpt.sharded_state = with_a_copy
    out = Path(out_dir) / "ckpt"
    try:
        checkpoint.save_mcore(bridge, models, out, overwrite=True, spliced=spliced)
        error = None
    except splice.Unsafe as e:
        error = str(e)
    finally:
        dist_ckpt.sharded_state = real
    torch.distributed.barrier()  # rank 0 removes the staging directory as it raises
    left = out.exists() or any(Path(out_dir).glob(".ckpt*"))
    bridge.load_weights(models)
    checkpoint.save_mcore(bridge, models, out, overwrite=True)
    return {"rank": rt.rank(), "error": error, "left": left, "spliced": len(spliced)}
