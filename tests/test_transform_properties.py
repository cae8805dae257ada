"""What a transform means for export and LoRA is declared by the transform itself: every
transform of ``mcore_bridge.transforms`` states it, the declarations agree with what the transform does,
and the exporter's fast path (parameters sent as they lie) follows them."""

from __future__ import annotations

import inspect

import pytest
import torch

from mcore_bridge import transforms as T
from mcore_bridge.export import ExportUnit, Exporter, Groups
from mcore_bridge.families import family_for
from mcore_bridge.layout import ParallelLayout
from mcore_bridge.plan import LocalItem, inventory
from mcore_bridge.zoo import _COMMON

DECLARED = ("parallel_mode", "as_stored")  # no silent default: each transform states these


def _concrete():
    return [c for _, c in inspect.getmembers(T, inspect.isclass)
            if issubclass(c, T.Transform) and c is not T.Transform and not c.__name__.startswith("_")]


def undeclared(cls) -> list[str]:
    """Properties ``cls`` inherits from the base ``Transform`` instead of stating them."""
    out = []
    for name in DECLARED:
        owner = next(k for k in cls.__mro__ if name in vars(k))
        if owner is T.Transform:
            out.append(name)
    return out


def _instances():
    """One instance of every concrete transform (a new class must be added here, or this fails)."""
    qkv = T.QKV(4, 2, 3)
    made = [T.REPLICATED, T.COLUMN, T.ROW, T.VOCAB, qkv, T.GATED_MLP, T.Shared(3), T.Stacked(2),
            T.Blocks(qkv, 3), T.Blocks(T.GATED_MLP, 2), T.FusedQKV(4, 2, 3), T.FUSED_GATED_MLP,
            T.Copies(T.VOCAB, 2), T.Copies(T.COLUMN, 3),
            T.GroupedRows(2, ((1, 2), (2, 1)), ((1, 0), (0, 0), (0, 1), (1, 1)), per_group=True),
            T.FusedBlocks(((2, 4), (6,)))]
    assert {type(t) for t in made} == set(_concrete()), "add the new transform to _instances()"
    return made


def test_every_transform_declares_its_properties():
    classes = _concrete()
    assert len(classes) >= 8
    for cls in classes:
        assert undeclared(cls) == [], f"{cls.__name__} inherits {undeclared(cls)} from Transform"


def test_the_check_catches_a_transform_that_declares_nothing():  # negative control
    class Forgetful(T.Transform):
        pass

    class Explicit(T.Transform):
        parallel_mode = "row"
        as_stored = False

    assert undeclared(Forgetful) == list(DECLARED)
    assert undeclared(Explicit) == []
    assert Forgetful().as_stored is False and Forgetful().lora_factor_transforms(1, False) is None


@pytest.mark.parametrize("t", _instances(), ids=repr)
def test_declarations_match_behaviour(t):
    assert t.parallel_mode in ("column", "row", "replicated")
    assert t.tp_split == (t.parallel_mode != "replicated")
    n = t.n_sources
    qkv = next((x for x in (t, getattr(t, "inner", None)) if isinstance(x, T.QKV)), None)
    cols = 2 if isinstance(t, T.Blocks) else 5
    if isinstance(t, T.FusedQKV):  # one [q; k; v] tensor
        hf = [((t.heads + 2 * t.groups) * t.head_dim, cols)]
    elif qkv is not None:
        hf = [(qkv.heads * qkv.head_dim, cols)] + [(qkv.groups * qkv.head_dim, cols)] * 2
    else:
        hf = [(6, cols)] * n
    local = t.local_shape(hf, 1)
    if local is None:  # Vocab: no padding here
        local = hf[0]
    shard = torch.arange(torch.Size(local).numel(), dtype=torch.float32).reshape(local)
    if isinstance(t, T.Blocks):  # a valid block-structured B: zero off its blocks
        shard = t.split([torch.randn(s) for s in hf], tuple(local), 1, 0)
    out = t.to_hf([shard], hf)
    same_bytes = torch.cat([o.reshape(-1) for o in out]).equal(shard.reshape(-1))
    if t.as_stored:  # the fast export path sends the parameter itself: it must be the HF bytes
        assert same_bytes, f"{t!r} declares as_stored but to_hf reorders or copies"
    if t.swiglu:  # [gate; up]: two HF tensors, or one fused
        assert n in (1, 2) and t.parallel_mode == "column"


@pytest.mark.parametrize("t", _instances(), ids=repr)
def test_lora_factor_transforms(t):
    n = t.n_sources
    for per_projection in (False, True):
        factors = t.lora_factor_transforms(n, per_projection)
        if factors is None:
            continue
        a, b = factors
        assert isinstance(a, T.Transform) and isinstance(b, T.Transform)
        if t.parallel_mode == "row":
            assert (a, b) == (T.ROW, T.REPLICATED)
        elif t.parallel_mode == "replicated":
            assert (a, b) == (T.REPLICATED, T.REPLICATED)
        elif n == 1:
            assert (a, b) == (T.REPLICATED, t)
        elif per_projection:
            assert (a, b) == (T.Stacked(n), T.Blocks(t, n))
        else:
            assert (a, b) == (T.Shared(n), t) and a.identical_sources
    supported = {repr(t) for t in _instances() if t.lora_factor_transforms(t.n_sources, False) is not None}
    assert supported == {"Replicated", "Column", "Row", "QKV", "GatedMLP", "FusedQKV", "FusedGatedMLP"}


def _exporter(model_type: str, tp: int, dtype=torch.float32):
    fam = family_for({**_COMMON, "model_type": model_type, "tie_word_embeddings": False})
    layout = ParallelLayout(tp=tp)
    units, state = [], {}
    for u in inventory(fam, layout):
        if not u.rule.export:
            continue
        shapes = [(64, 64)] * len(u.hf_names)
        param = u.rule.mcore.replace("{L}", str(u.layer))
        state[(0, param)] = torch.zeros(4, 4)
        units.append(ExportUnit(u, len(units), shapes, [dtype] * len(shapes), LocalItem(u, 0, param)))
    return Exporter(units, state, Groups(tp=tp), "cpu"), units


def _fast(model_type, tp, dtype=torch.float32):
    exporter, units = _exporter(model_type, tp, dtype)
    buckets = [[u] for u in units]  # kept alive: the exporter caches its decision per bucket
    return {u.unit.rule.mcore.split(".", 3)[-1] if u.unit.layer is not None else u.unit.rule.mcore:
            exporter.as_stored(b) for b in buckets for u in b}


def test_fast_export_path_taken_for_transforms_stored_as_hf_lays_them_out():
    fast = _fast("qwen3", 1)
    assert fast == {
        "embedding.word_embeddings.weight": False,  # Vocab: padding rows dropped
        "input_layernorm.weight": True, "self_attention.linear_qkv.weight": False,  # QKV reorders
        "self_attention.linear_proj.weight": True, "self_attention.q_layernorm.weight": True,
        "self_attention.k_layernorm.weight": True, "pre_mlp_layernorm.weight": True,
        "mlp.linear_fc1.weight": True, "mlp.linear_fc2.weight": True,
        "decoder.final_layernorm.weight": True, "output_layer.weight": False}
    # split over tp=2 only the replicated ones qualify; a cast never does
    assert {k for k, v in _fast("qwen3", 2).items() if v} == {
        "input_layernorm.weight", "self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight",
        "pre_mlp_layernorm.weight", "decoder.final_layernorm.weight"}
    assert not any(_fast("qwen3", 1, torch.bfloat16).values())
