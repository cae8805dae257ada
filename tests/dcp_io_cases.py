"""Cases for tests/test_dcp_io.py, run inside ``verify.pool.Pool`` ranks (one call per rank)."""

from __future__ import annotations

from pathlib import Path

import torch

from mcore_bridge import ParallelLayout
from mcore_bridge.runtime import dist as rt
from tests import cases


def _params(models) -> dict:
    return {f"{i}.{n}": p.detach() for i, m in enumerate(models) for n, p in m.named_parameters()}


def _differing(a: dict, b: dict) -> list:
    assert sorted(a) == sorted(b)
    return [n for n in a if a[n].dtype != b[n].dtype or a[n].shape != b[n].shape
            or not torch.equal(a[n].reshape(-1).view(torch.uint8), b[n].reshape(-1).view(torch.uint8))]


def _fresh(bridge, models):
    """Models of the same build, every parameter overwritten with NaN (a load must fill them all)."""
    fresh = bridge.build_model(next(models[0].parameters()).dtype)
    with torch.no_grad():
        for p in (p for m in fresh for p in m.parameters()):
            p.fill_(float("nan"))
    return fresh


def megatron_reads_ours(source: str, layout: dict, out_dir: str) -> dict:
    """HF -> megatron -> torch_dist by mcore-bridge (the direct writer) -> megatron-core's own
    ``dist_checkpointing.load`` (its default strategy and DCP's reader) into NaN-filled models."""
    from megatron.core import dist_checkpointing

    from mcore_bridge import checkpoint, dist_ckpt

    bridge, models = cases._loaded(source, layout)
    checkpoint.save_mcore(bridge, models, out_dir, overwrite=True, spec="local")
    fresh = _fresh(bridge, models)
    state = dist_ckpt.sharded_state(fresh)
    loaded = dist_checkpointing.load(state, str(Path(out_dir) / "release"))
    for i, m in enumerate(fresh):
        m.load_state_dict(loaded[dist_ckpt.model_key(i, len(fresh))], strict=False)
    return {"rank": rt.rank(), "differing": _differing(_params(models), _params(fresh))}


def we_read_megatrons(source: str, layout: dict, out_dir: str) -> dict:
    """HF -> megatron -> torch_dist by megatron-core's own ``dist_checkpointing.save`` (its default
    strategy) -> mcore-bridge's load (the direct reader) into NaN-filled models, at ``layout``."""
    from megatron.core import dist_checkpointing

    from mcore_bridge import dcp_reader, dist_ckpt

    bridge, models = cases._loaded(source, layout)
    ckpt = Path(out_dir)
    if rt.rank() == 0:
        ckpt.mkdir(parents=True)
    torch.distributed.barrier()
    state = dist_ckpt.sharded_state(models)
    state.update(checkpoint_version=3.0, iteration=0)
    dist_checkpointing.save(state, str(ckpt))
    torch.distributed.barrier()
    fresh = _fresh(bridge, models)
    before = dcp_reader.DirectReader.direct_items
    dist_ckpt.load(fresh, ckpt)
    return {"rank": rt.rank(), "differing": _differing(_params(models), _params(fresh)),
            "direct": dcp_reader.DirectReader.direct_items - before}


def failing_save(source: str, layout: dict, out_dir: str, fail_after: int) -> str:
    """A torch_dist save whose writer fails (disk full) at its ``fail_after + 1``-th write call,
    inside a record: the error seen. Then a garbage collection, which crashed (segfault) on
    Python 3.12 / megatron-core 0.19.2 while the failed frames' locals were kept."""
    import gc

    from mcore_bridge import checkpoint, dcp_writer

    bridge, models = cases._loaded(source, layout)
    real, count = dcp_writer._write_all, [0]

    def failing(fd, data):
        count[0] += 1
        if count[0] > fail_after:
            raise OSError(28, "No space left on device (injected)")
        return real(fd, data)

    dcp_writer._write_all = failing  # this rank process only, restored below
    try:
        checkpoint.save_mcore(bridge, models, out_dir, overwrite=True)
        seen = "no error"
    except BaseException as e:
        seen = f"{type(e).__name__}: {e}"
    finally:
        dcp_writer._write_all = real
    gc.collect()
    return seen


def reshard_counts(ckpt: str, layout: dict, out_dir: str) -> dict:
    """A torch_dist checkpoint loaded at another layout, saved as HF: how the records were read."""
    from mcore_bridge import dcp_reader

    d0, s0 = dcp_reader.DirectReader.direct_items, dcp_reader.DirectReader.staged_items
    cases.mcore_to_hf(ckpt, layout, out_dir)
    return {"direct": dcp_reader.DirectReader.direct_items - d0, "staged": dcp_reader.DirectReader.staged_items - s0}


__all__ = ["megatron_reads_ours", "we_read_megatrons", "failing_save", "reshard_counts", "ParallelLayout"]
