"""The key layout of megatron-core's TransformerEngine spec in torch_dist checkpoints.

Megatron-LM trains with ``--transformer-impl transformer_engine`` by default, and its checkpoints
carry the sharded keys of megatron's TE layer spec. The bridge builds models with the local spec;
their ``sharded_state_dict()`` already uses several TE names (megatron maps ``input_layernorm`` /
``pre_mlp_layernorm`` of non-MLA layers onto ``linear_qkv.layer_norm_*`` / ``linear_fc1.layer_norm_*``,
and TEGroupedMLP's sharded keys equal SequentialMLP's), but not all. Measured against megatron's own
TE-spec models (``tests/te_standin.py``), on megatron-core 0.16.1, the layouts differ only in:

* MoE layers (non-MLA): the pre-MLP norm is ``pre_mlp_layernorm.*`` (a TENorm) in TE, while the
  local spec's key map files it under ``mlp.linear_fc1.layer_norm_*`` even though no fc1 exists;
* multi-latent attention: the q/kv latent norms are fused into the up projections
  (``linear_q_up_proj.layer_norm_weight``, ``linear_kv_up_proj.layer_norm_weight``); the pre-MLP norm
  of a dense MLA layer is ``mlp.linear_fc1.layer_norm_weight`` (local: ``pre_mlp_layernorm.weight``);
* ``_extra_state``: every TE module has one (the local linears have one too, ``None``); TE 2.x's
  norms (TENorm: ``input_layernorm`` under MLA, ``pre_mlp_layernorm`` of MoE layers, ``q/k_layernorm``,
  and ``final_layernorm`` of block-spec models) add theirs; so does the core attention where it has a
  learnable softmax offset (attention sinks: megatron then saves that module's whole state dict).

Why the extra states are written: a TE model's ``sharded_state_dict()`` asks for them (megatron wraps
every ``_extra_state`` of a module's ``state_dict`` in a ``ShardedObject``), and
``dist_checkpointing.load`` with ``StrictHandling.ASSUME_OK_UNEXPECTED`` -- megatron's default, and the
default of Megatron-LM's ``--dist-ckpt-strictness`` -- does not check for keys the checkpoint lacks, so
the underlying torch.distributed.checkpoint load fails on the first one (``tests/test_te_layout.py``
shows this). The payloads are what TE writes without FP8: an empty uint8 tensor for modules, a
pickled empty dict for the op-based norms; TE's ``set_extra_state`` accepts both (and ``None``).

Reading: ``detect`` tells from the checkpoint's own key set which layout it holds; ``rename`` points a
local-spec model's sharded state dict at the TE keys (tensor for tensor; extra states the model lacks
are left to ``dist_ckpt.load``'s accounting, which lists them as ignored).
"""

from __future__ import annotations

import pickle
import re

import torch

from .errors import MappingError

LOCAL, TE = "local", "te"
SPECS = (TE, LOCAL)

_LAYER = re.compile(r"^(?P<pre>(?:.*\.)?layers\.(?:\d+\.)?)(?P<rest>[^.].*)$")
_EXTRA = "_extra_state"


class LayoutMismatch(MappingError):
    """A checkpoint's keys fit neither the local nor the TransformerEngine layout."""


def _te_rest_map(rests: set[str]) -> tuple[dict, list]:
    """For one layer's key suffixes (local spec): {local suffix: TE suffix} and the TE modules whose
    extra state the TE layer has in addition, with its payload (norms: an op state, others: a module
    state)."""
    mla = "self_attention.linear_kv_down_proj.weight" in rests
    moe = "mlp.router.weight" in rests
    rename, norms = {}, []
    if mla:
        for local, te in (("self_attention.q_layernorm.", "self_attention.linear_q_up_proj.layer_norm_"),
                          ("self_attention.kv_layernorm.", "self_attention.linear_kv_up_proj.layer_norm_")):
            for p in ("weight", "bias"):
                rename[local + p] = te + p
        if "input_layernorm.weight" in rests:
            norms.append("input_layernorm")
        if moe:
            norms.append("pre_mlp_layernorm")
        else:
            for p in ("weight", "bias"):
                rename[f"pre_mlp_layernorm.{p}"] = f"mlp.linear_fc1.layer_norm_{p}"
    else:
        if moe:
            for p in ("weight", "bias"):
                rename[f"mlp.linear_fc1.layer_norm_{p}"] = f"pre_mlp_layernorm.{p}"
            norms.append("pre_mlp_layernorm")
        for qk in ("q_layernorm", "k_layernorm"):
            if f"self_attention.{qk}.weight" in rests:
                norms.append(f"self_attention.{qk}")
    # the layer's own norms that no TE linear absorbs (sandwich post-norms): standalone TENorms
    norms += sorted(r[: -len(".weight")] for r in rests if r.endswith("layernorm.weight") and r.count(".") == 1
                    and r[: -len(".weight")] not in ("input_layernorm", "pre_mlp_layernorm"))
    extras = [(n, _empty_op_state) for n in norms]
    if "self_attention.core_attention.softmax_offset" in rests:
        extras.append(("self_attention.core_attention", _empty_module_state))
    return {k: v for k, v in rename.items() if k in rests}, extras


def _sharded_items(state: dict):
    """(container dict, dict key, sharded object) for every sharded entry, nested dicts included."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    for k, v in list(state.items()):
        if isinstance(v, dict):
            yield from _sharded_items(v)
        elif isinstance(v, ShardedBase):
            yield state, k, v


def _plan(state: dict, block: bool):
    """Per sharded key of ``state`` (local spec): its TE key; plus the norm extra states to add as
    (template ShardedObject, new key, container, dict key)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    layers: dict[str, set] = {}
    items = list(_sharded_items(state))
    for _, _, v in items:
        m = _LAYER.match(v.key)
        if m:
            layers.setdefault(m["pre"], set()).add(m["rest"])
    maps = {pre: _te_rest_map(rests) for pre, rests in layers.items()}
    renames, extras = {}, []
    templates = {}
    for container, dkey, v in items:
        m = _LAYER.match(v.key)
        if m:
            new = maps[m["pre"]][0].get(m["rest"])
            if new is not None:
                renames[v.key] = m["pre"] + new
            if isinstance(v, ShardedObject) and m["rest"].endswith(_EXTRA) and dkey.endswith(m["rest"]):
                # one template per layer of the chunk (stacked layers share the key, not the dict key)
                templates.setdefault(dkey[: -len(m["rest"])], (m["pre"], container, v))
        elif v.key.endswith("final_layernorm.weight") and block:
            extras.append((v, v.key[: -len("weight")] + _EXTRA, container, dkey[: -len("weight")] + _EXTRA,
                           _empty_op_state))
    for dpre, (pre, container, tmpl) in templates.items():
        for module, payload in maps[pre][1]:
            extras.append((tmpl, f"{pre}{module}.{_EXTRA}", container, f"{dpre}{module}.{_EXTRA}", payload))
    return renames, extras


def _empty_module_state() -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


def _empty_op_state() -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps({})), dtype=torch.uint8)


def to_te(state: dict, block: bool) -> dict:
    """Turn a local-spec model chunk's sharded state dict (in place) into what megatron's TE-spec
    model of the same configuration produces: renamed norms, TE's extra states. ``block``: the model
    was built from ``get_gpt_decoder_block_spec`` (its TE final norm is a TENorm)."""
    import copy

    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    renames, extras = _plan(state, block)
    for container, dkey, v in list(_sharded_items(state)):
        if v.key in renames:
            v.key = renames[v.key]
        if isinstance(v, ShardedObject) and v.key.endswith(_EXTRA):
            v.data = _empty_module_state()
    for tmpl, key, container, dkey, payload in extras:
        if isinstance(tmpl, ShardedTensor):  # final norm: one object, replicated like the weight
            obj = ShardedObject(key, payload(), (1,), (0,), replica_id=tmpl.replica_id)
        else:
            obj = copy.copy(tmpl)
            obj.key, obj.data = key, payload()
        container[dkey] = obj
    return state


def rename(state: dict) -> dict:
    """Point a local-spec sharded state dict at the TE keys (in place; no extra states added)."""
    renames, _ = _plan(state, block=False)
    for _, _, v in _sharded_items(state):
        if v.key in renames:
            v.key = renames[v.key]
    return state


def _base(key: str) -> str:
    return key.split("/shard_", 1)[0]


def detect(state: dict, checkpoint_keys) -> str:
    """Which layout a checkpoint (its ``.metadata`` keys) holds, judged by the keys where the two
    layouts of ``state`` (this rank's local-spec sharded state dict) differ. Models whose layouts
    coincide (dense models without q/k norms) read as ``local``."""
    ckpt = {_base(k) for k in checkpoint_keys}
    renames, _ = _plan(state, block=False)
    only_local = {k for k in renames if k not in renames.values()}
    only_te = {v for v in renames.values() if v not in renames}
    has_local, has_te = sorted(only_local & ckpt), sorted(only_te & ckpt)
    if has_local and has_te:
        raise LayoutMismatch(f"the checkpoint mixes the local-spec key {has_local[0]!r} and the "
                             f"TransformerEngine-spec key {has_te[0]!r}")
    return TE if has_te else LOCAL


def checkpoint_keys(ckpt_dir) -> list[str]:
    """The keys of a torch_dist checkpoint's ``.metadata`` (check it with ``dist_ckpt.check_metadata``
    first: torch unpickles it)."""
    from torch.distributed.checkpoint import FileSystemReader

    return list(FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata)
