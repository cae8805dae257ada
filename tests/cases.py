"""Functions run inside the ranks of a ``verify.pool.Pool`` (one call per rank, same kwargs).

Each sets up its own layout, so one process group serves many cases. Models are passed as HF
directories the test process materialised (not ``builtin:NAME``), so both sides read the very
same checkpoint. Return values are small and picklable; the assertions live in the test modules.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
import torch.distributed as dist

from mcore_bridge import Bridge, ParallelLayout
from mcore_bridge.hf_io import HFCheckpoint
from mcore_bridge.transforms import QKV, GatedMLP, Transform
from mcore_bridge.transforms.base import _rows
from mcore_bridge.runtime import dist as rt

BATCH, SEQ = 2, 32  # SEQ divisible by every tp used (sequence parallel)


# ---- deliberately wrong mappings (negative tests) ---------------------------------------------
class PlainQKV(QKV):
    """WRONG: fuses q, k, v as ``[all q; all k; all v]`` and splits the rows evenly over tp,
    ignoring megatron's per-query-group interleaving. Symmetric, so a round trip cannot see it."""

    to_mcore_into = Transform.to_mcore_into  # load through our to_mcore, not QKV's in-place copy

    def slices(self, hf, local, tp, rank):
        self._check_sources(hf)
        return [_rows(0, s[0], len(s)) for s in hf]

    def to_mcore(self, pieces, local, tp, rank):
        return torch.cat(pieces, dim=0).chunk(tp, dim=0)[rank]

    def to_hf(self, shards, hf):
        return list(torch.split(torch.cat(shards, dim=0), [s[0] for s in hf], dim=0))


class SwappedGatedMLP(GatedMLP):
    """WRONG: ``[up_r; gate_r]`` per rank instead of ``[gate_r; up_r]``."""

    to_mcore_into = Transform.to_mcore_into

    def to_mcore(self, pieces, local, tp, rank):
        return super().to_mcore(pieces[::-1], local, tp, rank)

    def to_hf(self, shards, hf):
        return super().to_hf(shards, hf)[::-1]


@contextlib.contextmanager
def broken_mapping(kind: str | None):
    """Swap a wrong transform into the dense families' rule table for the duration of a case."""
    from mcore_bridge.families import llama

    name, value = {None: (None, None), "qkv": ("QKV", PlainQKV),
                   "gate_up": ("GATED_MLP", SwappedGatedMLP())}[kind]
    if name is None:
        yield
        return
    original = getattr(llama, name)
    setattr(llama, name, value)
    try:
        yield
    finally:
        setattr(llama, name, original)


# ---- cases ------------------------------------------------------------------------------------
def _loaded(source: str, layout: dict, grouped: bool = False, dtype=torch.float32):
    bridge = Bridge(source, ParallelLayout(**layout))
    bridge.setup("cpu")
    models = bridge.build_model(dtype, grouped_experts=grouped)
    bridge.load_weights(models)
    return bridge, models


def build_error(source: str, layout: dict, grouped: bool = False, skip_refusal: bool = False) -> str | None:
    """The error building the model raises (type and message), or None. ``skip_refusal`` lifts the
    up-front grouped-experts refusal, so the check of what megatron actually built must catch it."""
    from mcore_bridge import model

    saved = model.local_grouped_experts_available
    if skip_refusal:
        model.local_grouped_experts_available = lambda: True
    try:
        _loaded(source, layout, grouped)
    except Exception as e:  # noqa: BLE001 -- the test inspects it
        return f"{type(e).__name__}: {e}"
    finally:
        model.local_grouped_experts_available = saved
    return None


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def check_roundtrip(results: list[dict], src, out) -> list[str]:
    """In the test process, on ``roundtrip``'s results: every rank received every tensor of ``src``
    once, byte-identical, and the checkpoint saved into ``out`` holds the same bytes. Returns the
    source's tensor names (sorted)."""
    source = HFCheckpoint(src)
    expected = sorted(source.names())
    for r in results:
        assert r["mismatches"] == [], f"rank {r['rank']}"
        assert r["names"] == expected, f"rank {r['rank']}"
        assert r["count"] == len(expected), f"rank {r['rank']}: duplicates in the export"
    saved = HFCheckpoint(out)
    assert sorted(saved.names()) == expected
    for name in expected:
        assert same_bytes(saved.read(name), source.read(name)), name
    return expected


def roundtrip(source: str, layout: dict, out_dir: str | None = None, broken: str | None = None,
              grouped: bool = False) -> dict:
    """Load the HF directory ``source``, export every tensor (all ranks receive all) and compare
    byte-exactly with it; then save into ``out_dir`` (collective)."""
    with broken_mapping(broken):
        bridge, models = _loaded(source, layout, grouped)
        source = HFCheckpoint(bridge.source)
        count, names, mismatches = 0, set(), []
        for name, tensor in bridge.export_weights(models):
            count += 1
            names.add(name)
            if name not in source.tensors:
                mismatches.append(f"{name}: not in the source")
            elif not same_bytes(tensor, ref := source.read(name)):
                mismatches.append(f"{name}: {tensor.dtype}{tuple(tensor.shape)} vs {ref.dtype}{tuple(ref.shape)}")
        if out_dir is not None:
            bridge.save_weights(models, out_dir, overwrite=True)
    return {"rank": rt.rank(), "count": count, "names": sorted(names), "mismatches": mismatches}


def logits(source: str, layout: dict, broken: str | None = None) -> float | None:
    """Max |megatron - HF| over the logits of a random batch, from the first rank of the last
    pipeline stage (which runs the HF reference); ``None`` on every other rank."""
    with broken_mapping(broken):
        bridge, models = _loaded(source, layout)
        vocab = int(bridge.hf_config["vocab_size"])
        input_ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
        from verify.forward import hf_logits, megatron_logits

        got = megatron_logits(models, input_ids, vocab)
    from megatron.core import parallel_state as ps

    if got is None or ps.get_tensor_model_parallel_rank() != 0 or ps.get_data_parallel_rank() != 0:
        return None
    ref = hf_logits(bridge.source, input_ids)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float((got - ref).abs().max())


class TENamed(torch.nn.Module):
    """A megatron chunk seen through TransformerEngine-spec names: fused norms
    (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``) and grouped experts
    (``experts.linear_fc1.weight{i}``) -- the synthetic state dict of a TE-built model."""

    def __init__(self, chunk):
        super().__init__()
        self.chunk = chunk

    def state_dict(self, *args, **kwargs):
        import re

        out = {}
        for name, t in self.chunk.state_dict(*args, **kwargs).items():
            name = name.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
            if "shared_experts" not in name:
                name = name.replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")
            name = re.sub(r"mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight",
                          r"mlp.experts.\2.weight\1", name)
            out[name] = t
        return out


def te_names_export(source: str, layout: dict) -> dict:
    """Export through TE-named chunks; returns the mismatches against the source and the names seen."""
    bridge, models = _loaded(source, layout)
    te = [TENamed(m) for m in models]
    te_keys = [k for m in te for k in m.state_dict(keep_vars=True)]
    src = HFCheckpoint(bridge.source)
    mismatches, count = [], 0
    for name, tensor in bridge.export_weights(te):
        count += 1
        if not same_bytes(tensor, src.read(name)):
            mismatches.append(name)
    return {"count": count, "mismatches": mismatches,
            "te_grouped_names": sum(".experts.linear_fc" in k for k in te_keys),
            "te_norm_names": sum("layer_norm_weight" in k for k in te_keys)}


@contextlib.contextmanager
def spied_reads():
    """Record every ``HFCheckpoint.read(name, region)`` made in this process while active."""
    reads = []
    original = HFCheckpoint.read

    def spy(self, name, region=None):
        reads.append((name, region))
        return original(self, name, region)

    HFCheckpoint.read = spy
    try:
        yield reads
    finally:
        HFCheckpoint.read = original


def expert_reads(source: str, layout: dict) -> dict:
    """Which expert tensors (and which rows of them) this rank read while loading."""
    import re

    with spied_reads() as reads:
        _loaded(source, layout)
    from megatron.core import parallel_state as ps

    experts, rows = set(), set()
    for name, region in reads:
        m = re.search(r"experts\.(\d+)\.", name)
        if m:
            experts.add(int(m.group(1)))
            if region is not None and name.endswith(("gate_proj.weight", "w1.weight")):
                rows.add((region[0].start, region[0].stop))
    return {"ep_rank": ps.get_expert_model_parallel_rank(), "etp_rank": ps.get_expert_tensor_parallel_rank(),
            "experts": sorted(experts), "gate_rows": sorted(rows), "all": len(reads)}


# ---- pool self-tests --------------------------------------------------------------------------
def whoami() -> tuple[int, int]:
    dist.barrier()
    return dist.get_rank(), dist.get_world_size()


def raise_on(rank: int) -> None:
    """``rank`` raises; the others wait in a barrier that never completes."""
    if dist.get_rank() == rank:
        raise ValueError(f"deliberate failure on rank {rank}")
    dist.barrier()


def exit_on(rank: int) -> None:
    """``rank`` dies without a Python exception (as on a crash); the others wait in a barrier."""
    if dist.get_rank() == rank:
        os._exit(3)
    dist.barrier()


def exit_on_after_peer_error(rank: int) -> None:
    """``rank`` dies (exit code 3) a moment after the others report what a collective says when a
    peer is gone: the pool must name the dead rank, not the messenger."""
    if dist.get_rank() == rank:
        time.sleep(0.3)
        os._exit(3)
    raise RuntimeError("[gloo/transport/tcp/pair.cc] Read error: Connection reset by peer")


def hang_on(rank: int) -> None:
    """``rank`` sleeps forever; the others wait for it in a barrier."""
    if dist.get_rank() == rank:
        time.sleep(3600)
    dist.barrier()


def export_against(source: str, layout: dict, reference: str, expert_storage: str | None, out_dir: str) -> dict:
    """Load ``source``, export with ``expert_storage`` (all ranks) and compare with the checkpoint
    ``reference`` byte for byte; then save into ``out_dir``. Also returns a digest of this rank's
    loaded parameters (so loads from differently stored checkpoints can be compared)."""
    bridge, models = _loaded(source, layout)
    ref = HFCheckpoint(reference)
    names, mismatches = [], []
    for name, tensor in bridge.export_weights(models, expert_storage=expert_storage):
        names.append(name)
        if name not in ref.tensors or not same_bytes(tensor, ref.read(name)):
            mismatches.append(name)
    bridge.save_weights(models, out_dir, overwrite=True, expert_storage=expert_storage)
    digest = {f"{c}.{n}": float(t.double().sum()) + float((t.double() ** 2).sum())
              for (c, n), t in bridge.state(models).items()}
    return {"rank": rt.rank(), "names": sorted(names), "mismatches": mismatches, "digest": digest}


def stacked_reads(source: str, layout: dict) -> dict:
    """The regions of stacked expert tensors this rank read while loading."""
    with spied_reads() as reads:
        _loaded(source, layout)
    from megatron.core import parallel_state as ps

    experts, cols, whole = set(), set(), 0
    for name, region in reads:
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            if region is None or region[0] == slice(None):
                whole += 1
                continue
            experts.add(region[0].start)
            if name.endswith("gate_up_proj"):
                cols.add((region[2].start, region[2].stop))
    return {"ep_rank": ps.get_expert_model_parallel_rank(), "etp_rank": ps.get_expert_tensor_parallel_rank(),
            "experts": sorted(experts), "gate_up_cols": sorted(cols), "whole_stack_reads": whole}


def mcore_save(source: str, layout: dict, out_dir: str, fmt: str = "torch_dist") -> int:
    """HF ``source`` -> megatron at ``layout`` -> a Megatron checkpoint in ``out_dir``."""
    from mcore_bridge import checkpoint

    bridge, models = _loaded(source, layout)
    checkpoint.save_mcore(bridge, models, out_dir, overwrite=True, fmt=fmt)
    return rt.rank()


def mcore_to_hf(ckpt: str, layout: dict, out_dir: str, hf_dir: str | None = None) -> int:
    """A Megatron checkpoint loaded at ``layout`` (any, for torch_dist) and saved as HF."""
    from mcore_bridge import checkpoint

    bridge = checkpoint.bridge_from_mcore(ckpt, ParallelLayout(**layout), hf_dir=hf_dir)
    bridge.setup("cpu")
    models = bridge.build_model()
    checkpoint.load_mcore(bridge, models, ckpt)
    bridge.save_weights(models, out_dir, overwrite=True)
    return rt.rank()


def conversion_memory(source: str, layout: dict, work: str, bucket_bytes: int) -> dict:
    """HF -> torch_dist -> HF on this rank, with the rise of peak RSS over the RSS before each phase
    (``/proc/self/clear_refs`` resets the peak) and the rank's share (bytes of its parameters)."""
    from pathlib import Path

    from mcore_bridge import checkpoint

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    def measured(fn):
        dist.barrier()
        before = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        out = fn()
        dist.barrier()
        return out, status("VmHWM") - before

    work = Path(work)
    bridge = Bridge(source, ParallelLayout(**layout))
    bridge.setup("cpu")
    rises = {}

    def load_hf():
        m = bridge.build_model(torch.float32)
        bridge.load_weights(m)
        return m

    models, rises["load_hf"] = measured(load_hf)
    share = sum(t.numel() * t.element_size() for t in bridge.state(models).values())
    _, rises["save_dist"] = measured(lambda: checkpoint.save_mcore(bridge, models, work / "dist", overwrite=True))
    models = None  # free the first model before the second is built
    reader = checkpoint.bridge_from_mcore(work / "dist")

    def load_dist():
        m = reader.build_model(torch.float32)
        checkpoint.load_mcore(reader, m, work / "dist")
        return m

    fresh, rises["load_dist"] = measured(load_dist)
    _, rises["save_hf"] = measured(lambda: reader.save_weights(fresh, work / "hf", overwrite=True,
                                                              bucket_bytes=bucket_bytes))
    largest = max(i.nbytes for i in bridge.hf.tensors.values())
    return {"rank": rt.rank(), "share": share, "largest_tensor": largest, "rises": rises}
