"""Export planning: buckets and the choice of writer ranks (pure data, no process group)."""

from __future__ import annotations

import torch

from mcore_bridge.export import ExportUnit, Groups, balanced_writers, make_buckets, pack, unpack
from mcore_bridge.families import family_for
from mcore_bridge.layout import ParallelLayout
from mcore_bridge.plan import inventory
from mcore_bridge.zoo import _COMMON


def _units(layout: ParallelLayout, model_type: str = "qwen3", **extra):
    fam = family_for({**_COMMON, "model_type": model_type, "tie_word_embeddings": False, **extra})
    out = []
    for u in inventory(fam, layout):
        if u.rule.export:
            shapes = [(1000, 64)] * len(u.hf_names)  # sizes only matter for balancing
            out.append(ExportUnit(u, len(out), shapes, [torch.float32] * len(shapes)))
    return out


def test_writers_are_contiguous_balanced_and_per_stage():
    layout = ParallelLayout(tp=4, pp=2)
    units = _units(layout)
    w = balanced_writers(units, Groups(tp=4))
    for stage in (0, 1):
        seq = [w[u.index] for u in units if u.unit.stage == stage]
        assert seq == sorted(seq) and set(seq) == {0, 1, 2, 3}  # contiguous runs, every rank writes
        load = [sum(u.nbytes for u in units if u.unit.stage == stage and w[u.index] == r) for r in range(4)]
        assert max(load) <= 2 * min(load)


def test_buckets_never_mix_stages_or_writers_and_respect_size():
    units = _units(ParallelLayout(tp=2, pp=2))
    w = balanced_writers(units, Groups(tp=2))
    limit = 3 * units[0].nbytes
    buckets = make_buckets(units, limit, w)
    assert [u.index for b in buckets for u in b] == [u.index for u in units]  # order kept, each once
    for b in buckets:
        assert len({(u.unit.stage, w[u.index]) for u in b}) == 1
        assert len(b) == 1 or sum(u.nbytes for u in b) <= limit


def test_pack_unpack_mixed_dtypes_roundtrip():
    ts = [torch.randn(3, 5), torch.arange(7, dtype=torch.int64), torch.randn(2, 2).to(torch.bfloat16)]
    back = unpack(pack(ts, "cpu"), [(tuple(t.shape), t.dtype) for t in ts])
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(ts, back))


MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)


def test_expert_units_have_one_owner_each_and_buckets_follow_owners():
    layout = ParallelLayout(tp=2, sp=True, ep=4, etp=1, pp=2)
    units = _units(layout, "qwen3_moe", **MOE)
    experts = [u for u in units if u.unit.expert is not None]
    assert len(experts) == 4 * 8 * 2  # layers x experts x (fc1, fc2)
    for u in experts:  # 8 experts over ep=4: experts 2r and 2r+1 on EP rank r
        assert u.unit.ep_rank == u.unit.expert // 2
        assert u.unit.owner == (u.unit.stage, u.unit.ep_rank)
    assert all(u.unit.ep_rank is None for u in units if u.unit.expert is None)
    w = balanced_writers(units, Groups(tp=2, etp=1))
    assert {w[u.index] for u in experts} == {0}  # etp=1: the single expert-TP rank writes
    assert {w[u.index] for u in units if u.unit.expert is None} == {0, 1}
    for b in make_buckets(units, 4 * units[0].nbytes, w):
        assert len({(u.unit.owner, w[u.index]) for u in b}) == 1


def test_expert_order_is_hf_order():
    units = _units(ParallelLayout(ep=2), "qwen3_moe", **MOE)
    names = [n for u in units if u.unit.layer == 1 and u.unit.expert is not None for n in u.unit.hf_names]
    assert names[:3] == [f"model.layers.1.mlp.experts.0.{p}_proj.weight" for p in ("gate", "up", "down")]
    assert names[-1] == "model.layers.1.mlp.experts.7.down_proj.weight"
