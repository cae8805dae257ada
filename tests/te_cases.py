"""Pool cases (one call per rank) for the TransformerEngine key layout (``tests/test_te_layout.py``)."""

from __future__ import annotations

import contextlib
from unittest import mock

import torch

from mcore_bridge import Bridge, ParallelLayout, te_layout
from mcore_bridge.runtime import dist as rt


# The MLA down projections are ColumnParallelLinear in the local spec (split over tp) and TELinear
# with parallel_mode "duplicated" in the TE spec (every tp rank holds all of it): same key, same
# global tensor in the checkpoint, only which rank writes which rows differs.
SPLIT_LOCALLY = ("self_attention.linear_q_down_proj.weight", "self_attention.linear_kv_down_proj.weight")


def _entries(state: dict) -> dict:
    """Everything of a sharded state dict that decides what a checkpoint holds and where: per key
    (ShardedObjects by their unique key, which carries the offsets), the global shape, this rank's
    offset, dtype, and for objects the payload's type and size."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    apply_factories(state)
    out = {}
    for v in nested_values(state):
        if isinstance(v, ShardedTensor):
            offset = "split or replicated" if v.key.endswith(SPLIT_LOCALLY) else tuple(v.global_offset)
            entry = ("tensor", tuple(v.global_shape), offset, str(v.dtype))
            out.setdefault(v.key, []).append(entry)
        elif isinstance(v, ShardedObject):
            data = v.data
            size = None if data is None else (data.dtype, data.numel()) if isinstance(data, torch.Tensor) else "?"
            out.setdefault(v.unique_key, []).append(("object", tuple(v.global_shape), str(size)))
    return {k: sorted(e) for k, e in out.items()}


@contextlib.contextmanager
def megatron_te_specs():
    """megatron's spec builders, as the bridge calls them, return their TransformerEngine variants
    (built on the stand-in of ``tests/te_standin.py``): ``get_gpt_layer_local_spec(...)`` ->
    ``get_gpt_layer_with_transformer_engine_spec(...)`` with the same arguments (TE norms are always
    RMSNorm/LayerNorm from config.normalization), ``get_gpt_decoder_block_spec(...,
    use_transformer_engine=False)`` -> ``use_transformer_engine=True``."""
    from megatron.core.models.gpt import gpt_layer_specs as g

    from tests.te_standin import te_spec

    block = g.get_gpt_decoder_block_spec

    def te_layer(normalization=None, **kw):
        return g.get_gpt_layer_with_transformer_engine_spec(**kw)

    def te_block(config, use_transformer_engine, **kw):
        return block(config, use_transformer_engine=True, **kw)

    with te_spec(), mock.patch.object(g, "get_gpt_layer_local_spec", te_layer), \
            mock.patch.object(g, "get_gpt_decoder_block_spec", te_block):
        yield


def te_keys(source: str, layout: dict, grouped: bool = False) -> dict:
    """This rank's sharded state: megatron's TE-spec model vs the bridge's ``--spec te`` writer (and,
    as a control, its local layout). Returns the differing keys of each."""
    bridge = Bridge(source, ParallelLayout(**layout))
    bridge.setup("cpu")
    block = bridge.family.decoder_block_spec
    ours = bridge.build_model(torch.float32)
    from mcore_bridge import dist_ckpt

    written = {k: _entries(v) for k, v in dist_ckpt.sharded_state(ours, spec="te", block=block).items()}
    local = {k: _entries(v) for k, v in dist_ckpt.sharded_state(ours, spec="local").items()}
    with megatron_te_specs():
        te_models = bridge.build_model(torch.float32, grouped_experts=grouped)
        kinds = sorted({type(m).__name__ for c in te_models for m in c.modules()
                        if type(m).__module__.startswith("mcore_bridge_te_standin")})
        reference = {dist_ckpt.model_key(i, len(te_models)): _entries(c.sharded_state_dict())
                     for i, c in enumerate(te_models)}

    def diff(a, b):
        out = []
        for chunk in sorted(set(a) | set(b)):
            x, y = a.get(chunk, {}), b.get(chunk, {})
            out += [f"{chunk}: {k}: {x.get(k)} vs megatron TE {y.get(k)}" for k in sorted(set(x) | set(y))
                    if x.get(k) != y.get(k)]
        return out

    return {"rank": rt.rank(), "keys": sum(len(v) for v in reference.values()), "te_modules": kinds,
            "mismatches": diff(written, reference), "local_differs": len(diff(local, reference))}


def te_model_loads(source: str, layout: dict, te_ckpt: str, local_ckpt: str) -> dict:
    """megatron's TE-spec model (stand-in leaves) loads ``te_ckpt`` through ``dist_checkpointing.load``
    at megatron's default strictness (Megatron-LM's ``--dist-ckpt-strictness`` default), and every
    tensor it receives equals the bridge's model's tensor of the same (canonical) name; the same load
    of ``local_ckpt`` fails (returned as text)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException

    from mcore_bridge.checkpoint import bridge_from_mcore, load_mcore
    from mcore_bridge.families.base import canonical_param_name
    from tests.cases import same_bytes

    bridge = bridge_from_mcore(te_ckpt, ParallelLayout(**layout))
    bridge.setup("cpu")
    ours = bridge.build_model(torch.float32)
    load_mcore(bridge, ours, te_ckpt)
    mine = {(i, n): t for i, c in enumerate(ours) for n, t in c.state_dict().items() if isinstance(t, torch.Tensor)}
    with megatron_te_specs():
        te_models = bridge.build_model(torch.float32)
        for c in te_models:
            for p in c.parameters():
                p.data.fill_(float("nan"))  # anything not loaded stays visible
        sd = {f"model{i}" if len(te_models) > 1 else "model": c.sharded_state_dict()
              for i, c in enumerate(te_models)}
        loaded = dist_checkpointing.load(sd, te_ckpt + "/release", strict=StrictHandling.ASSUME_OK_UNEXPECTED)
        compared, wrong = 0, []
        for i, c in enumerate(te_models):
            result = c.load_state_dict(loaded[f"model{i}" if len(te_models) > 1 else "model"], strict=False)
            wrong += [f"not loaded: {k}" for k in result.missing_keys if not k.endswith("_extra_state")]
            wrong += [f"unexpected: {k}" for k in result.unexpected_keys]
            for name, t in c.state_dict().items():
                if not isinstance(t, torch.Tensor) or name.endswith("_extra_state") or t.dtype == torch.uint8:
                    continue
                ref = mine.get((i, canonical_param_name(name)))
                compared += 1
                if ref is None or not same_bytes(t, ref):
                    wrong.append(name)
        fresh = bridge.build_model(torch.float32)
        sd = {f"model{i}" if len(fresh) > 1 else "model": c.sharded_state_dict() for i, c in enumerate(fresh)}
        try:
            dist_checkpointing.load(sd, local_ckpt + "/release", strict=StrictHandling.ASSUME_OK_UNEXPECTED)
            local_error = None
        except (Exception, CheckpointException) as e:  # torch's is a BaseException; the failure is the result
            local_error = [line for line in str(e).splitlines() if line.strip()][-1][:300]
    return {"rank": rt.rank(), "compared": compared, "wrong": wrong, "local_error": local_error}


def save_spec(source: str, layout: dict, out_dir: str, spec: str, rename: dict | None = None) -> int:
    """HF ``source`` -> a torch_dist checkpoint in ``spec``'s layout; ``rename`` {old key: new key}
    tampers with sharded keys before writing (negative tests)."""
    from mcore_bridge import checkpoint, dist_ckpt

    bridge = Bridge(source, ParallelLayout(**layout))
    bridge.setup("cpu")
    models = bridge.build_model(torch.float32)
    bridge.load_weights(models)
    if not rename:
        checkpoint.save_mcore(bridge, models, out_dir, overwrite=True, spec=spec)
        return rt.rank()
    original = dist_ckpt.in_spec

    def tampered(*args, **kwargs):
        state = original(*args, **kwargs)
        for _, _, v in te_layout._sharded_items(state):
            v.key = rename.get(v.key, v.key)
        return state

    with mock.patch.object(dist_ckpt, "in_spec", tampered):
        checkpoint.save_mcore(bridge, models, out_dir, overwrite=True, spec=spec)
    return rt.rank()


def load_error(ckpt: str, layout: dict) -> str | None:
    """Load a torch_dist checkpoint at ``layout``; the error text, or None."""
    from mcore_bridge import checkpoint

    try:
        bridge = checkpoint.bridge_from_mcore(ckpt, ParallelLayout(**layout))
        bridge.setup("cpu")
        models = bridge.build_model()
        checkpoint.load_mcore(bridge, models, ckpt)
    except Exception as e:  # noqa: BLE001 - the failure is the result
        return f"{type(e).__name__}: {e}"
    return None


def resave(ckpt: str, layout: dict, out_dir: str, spec: str, grouped: bool = False) -> int:
    """A torch_dist checkpoint loaded at ``layout`` (into grouped-GEMM experts with ``grouped``) and
    written again in ``spec``'s layout."""
    from mcore_bridge import checkpoint

    bridge = checkpoint.bridge_from_mcore(ckpt, ParallelLayout(**layout))
    bridge.setup("cpu")
    models = bridge.build_model(grouped_experts=grouped)
    checkpoint.load_mcore(bridge, models, ckpt)
    checkpoint.save_mcore(bridge, models, out_dir, overwrite=True, spec=spec)
    return rt.rank()


def lora_save(source: str, adapter: str, layout: dict, out_dir: str, spec: str) -> int:
    """HF weights + a PEFT adapter -> one torch_dist checkpoint holding both (content "full")."""
    from mcore_bridge import checkpoint

    bridge = Bridge(source, ParallelLayout(**layout))
    bridge.setup("cpu")
    models = bridge.build_model(torch.float32)
    bridge.load_weights(models)
    bridge.load_adapter(models, adapter)
    checkpoint.save_mcore(bridge, models, out_dir, overwrite=True, content="full", spec=spec)
    return rt.rank()


def lora_back(ckpt: str, layout: dict, base_out: str, peft_out: str) -> int:
    """A full LoRA torch_dist checkpoint -> HF base weights (unmerged) and the PEFT adapter."""
    from mcore_bridge import checkpoint

    bridge = checkpoint.bridge_from_mcore(ckpt, ParallelLayout(**layout))
    bridge.setup("cpu")
    models = bridge.build_model()
    checkpoint.load_mcore(bridge, models, ckpt)
    bridge.save_weights(models, base_out, overwrite=True, merge_lora=False)
    bridge.save_weights(models, peft_out, overwrite=True, peft_format=True)
    return rt.rank()
