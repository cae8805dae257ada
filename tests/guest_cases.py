"""A host process -- a trainer or RL framework -- that initialises torch.distributed and megatron's
parallel state itself and then uses the bridge through its public API. Run in the ranks of a bare
``verify.pool.Pool`` (no process group, no compat scope: the case does everything); what the host
observes before and after is returned, the assertions live in ``tests/test_guest.py``."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.overrides import _get_current_function_mode_stack

_GROUPS = ("tensor_model_parallel", "pipeline_model_parallel", "data_parallel", "context_parallel",
           "model_parallel", "expert_model_parallel", "expert_tensor_parallel", "embedding")


def _patchable() -> dict:
    """Every attribute a compat adaptation declares it patches -> its current value (identity)."""
    from mcore_bridge.runtime import compat

    out = {}
    for fns in compat._ADAPTATIONS.values():
        for fn in fns:
            for owner, names in compat._owners(fn):
                for n in names:
                    out[f"{getattr(owner, '__module__', '')}.{getattr(owner, '__name__', owner)}.{n}"] = \
                        vars(owner).get(n)
    return out


def _same_bytes(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def host(source: str, tp: int = 1, cp: int = 1, out_dir: str | None = None) -> dict:
    from megatron.core import parallel_state as ps
    from torch._dynamo.testing import CompileCounter
    from torch.distributed import distributed_c10d as c10d

    cuda_current_device, cuda_synchronize = torch.cuda.current_device, torch.cuda.synchronize
    if not dist.is_initialized():  # the pool's first case: RANK, WORLD_SIZE, MASTER_* as torchrun sets them
        dist.init_process_group("gloo")
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    try:
        return _as_guest(source, out_dir, ps, c10d, CompileCounter, cuda_current_device, cuda_synchronize)
    finally:  # the host tears down its megatron groups (WORLD stays), so the pool can serve the next case
        ps.destroy_model_parallel()
        for group in list(c10d._world.pg_map):
            if group is not c10d.GroupMember.WORLD:
                dist.destroy_process_group(group)


def _as_guest(source, out_dir, ps, c10d, CompileCounter, cuda_current_device, cuda_synchronize) -> dict:
    from mcore_bridge import Bridge, LayoutError, ParallelLayout
    from mcore_bridge.hf_io import HFCheckpoint
    from mcore_bridge.runtime import compat
    from mcore_bridge.sync import unpack_bucket

    groups = {g: getattr(ps, f"get_{g}_group")() for g in _GROUPS}
    process_groups = list(c10d._world.pg_map)
    patchable = _patchable()
    env = dict(os.environ)
    r = {"rank": dist.get_rank()}

    layout = ParallelLayout.from_parallel_state()
    r["layout"] = layout.to_dict()
    other = ParallelLayout(tp=1 if layout.tp > 1 else 2)  # a layout that does not match the host's
    r["shorts"] = (layout.short(), other.short())
    try:
        Bridge(source, other).setup("cpu")
        r["mismatch_error"] = None
    except LayoutError as e:
        r["mismatch_error"] = str(e)
    r["groups_after_mismatch"] = all(getattr(ps, f"get_{g}_group")() is groups[g] for g in _GROUPS)

    bridge = Bridge(source, layout)
    models = bridge.build_model(torch.float32)  # adopts the host's state (Bridge.setup inside)
    bridge.load_weights(models)
    r["layout_from_models"] = ParallelLayout.from_parallel_state(models).to_dict()

    # load + export_weights, byte-exact, with the host's own compiled function called between items
    src = HFCheckpoint(bridge.source)
    host_fn = CompileCounter()
    compiled = torch.compile(lambda x: x * 2 + 1, backend=host_fn)
    modes_between, mismatches, names = set(), [], []
    for name, t in bridge.export_weights(models):
        modes_between.add(len(_get_current_function_mode_stack()))
        compiled(torch.ones(3))  # runs outside the scope: it compiles (once)
        names.append(name)
        if not _same_bytes(t, src.read(name)):
            mismatches.append(name)
    r["export"] = {"names": sorted(names), "count": len(names), "mismatches": mismatches,
                   "mode_stack_between_items": sorted(modes_between), "host_frames_compiled": host_fn.frame_count}

    if out_dir is not None:
        bridge.save_weights(models, out_dir, overwrite=True)

    # RL sync: packed buckets to ranks 0 and 1 (one leader group, created once), twice
    synced = []
    for step in range(2):
        got = {}
        for b in bridge.export_buckets(models, bucket_bytes=1 << 20, receivers=[0, 1]):
            for name, t in unpack_bucket(b.buffer.clone(), b.meta.to_dict()):
                got[name] = _same_bytes(t, src.read(name))
        synced.append({"names": sorted(got), "exact": all(got.values()),
                       "process_groups": len(c10d._world.pg_map)})
    r["sync"] = synced

    # what the host sees afterwards
    fresh = CompileCounter()

    def double(x):
        return x * 2

    compiled_after = torch.compile(double, backend=fresh)
    compiled_after(torch.ones(3))
    r["after"] = {
        "compile_is_identity": compiled_after is double,
        "compiled_frames": fresh.frame_count,
        "mode_stack": len(_get_current_function_mode_stack()),
        "env_added": sorted(set(os.environ) - set(env)),
        "env_changed": sorted(k for k in env if os.environ.get(k) != env[k]),
        "groups_same": {g: getattr(ps, f"get_{g}_group")() is groups[g] for g in _GROUPS},
        "host_process_groups_alive": all(g in c10d._world.pg_map for g in process_groups),
        "cuda_current_device_restored": torch.cuda.current_device is cuda_current_device,
        "cuda_synchronize_restored": torch.cuda.synchronize is cuda_synchronize,
        "patched_not_restored": sorted(k for k, v in _patchable().items() if patchable[k] is not v),
        "compat_active": compat.active(),
    }

    # control: inside the scope the same kind of function runs eagerly, megatron's helpers too
    inside = CompileCounter()
    from megatron.core import activations
    from torch._dynamo.utils import counters

    frames = dict(counters["frames"])
    with compat.scope("cpu"):
        r["inside"] = {"mode_stack": len(_get_current_function_mode_stack()),
                       "cuda_current_device_patched": torch.cuda.current_device is not cuda_current_device}
        torch.compile(lambda x: x - 1, backend=inside)(torch.ones(3))
        activations.quick_gelu(torch.ones(4))  # a megatron jit_fuser (torch.compile) helper
    r["inside"].update(compiled_frames=inside.frame_count, dynamo_frames_delta=
                       counters["frames"].get("total", 0) - frames.get("total", 0),
                       megatron_helper_is_compiled=hasattr(activations.quick_gelu, "_torchdynamo_orig_callable"))
    return r


def cp_attention_probe(source: str) -> str | None:
    """In a cp=2 parallel state: build megatron-core's local-spec core attention with
    ``context_parallel_size=2``; returns its error (None if it builds)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from mcore_bridge import Bridge, ParallelLayout
    from mcore_bridge.model import transformer_config
    from mcore_bridge.runtime import compat

    bridge = Bridge(source, ParallelLayout(cp=2))
    bridge.setup("cpu")
    with compat.scope("cpu"):
        config = transformer_config(bridge.family, bridge.layout, torch.float32, "cpu")
        config.context_parallel_size = 2
        try:
            DotProductAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
        except AssertionError as e:
            return str(e)
    return None
