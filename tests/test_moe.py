"""Mixture-of-experts models through the bridge, on CPU process groups: byte-exact round trips over
EP / expert-TP / TP+SP / PP / VPP layouts with sequential and grouped experts, fp32 verification
with router agreement, TE-spec names, per-rank expert reads, and negative controls."""

from __future__ import annotations

import pytest

from mcore_bridge import ParallelLayout as L
from mcore_bridge import zoo
from mcore_bridge.hf_io import HFCheckpoint
from mcore_bridge.model import local_grouped_experts_available
from tests import cases, verify_cases
from tests.matrix import case_id

MOE = zoo.MOE
# megatron-core 0.16's local spec builds grouped-GEMM experts (legacy GroupedMLP); 0.19's has none
# without TransformerEngine, so there the grouped cases check that the bridge refuses them.
GROUPED = local_grouped_experts_available()


def assert_grouped_refused(pools, world, source, layout):
    errors = pools.get(world).run(cases.build_error, timeout=300, source=str(source), layout=layout.to_dict(),
                                  grouped=True)
    assert all(e and e.startswith("UsageError: grouped_experts=True") and "SequentialMLP" in e
               for e in errors), errors
# (world size, layout, grouped experts)
LAYOUTS = [
    (1, L(), False),
    (2, L(ep=2), False),
    (2, L(ep=2), True),
    (2, L(tp=2, sp=True), False),  # etp = tp = 2, ep 1
    (2, L(tp=2, sp=True, ep=2, etp=1), False),  # experts whole on each rank, attention split
    (2, L(pp=2, vpp=2), False),
    (4, L(ep=4), False),
    (4, L(tp=2, sp=True, ep=2), False),  # etp 2 x ep 2
    (4, L(tp=2, sp=True, ep=2, etp=1), True),
    (4, L(ep=2, etp=2), False),  # expert-TP without dense TP
    (4, L(pp=2, ep=2), False),
    (4, L(tp=2, sp=True, pp=2, ep=2, etp=1), False),
    (4, L(pp=2, vpp=2, ep=2), False),
]


def runs(model, layout, grouped=False) -> bool:
    """gpt-oss's expert biases need etp 1 and SequentialMLP experts (megatron-core asserts both;
    test_gpt_oss checks the refusals)."""
    return not (model == "gpt_oss" and (layout.etp != 1 or grouped))


def _param(model, world, layout, grouped):
    cid = case_id(model, world, layout) + ("-grouped" if grouped else "")
    return pytest.param(model, world, layout, grouped, id=cid, marks=pytest.mark.world(world))


@pytest.mark.parametrize("model,world,layout,grouped", [_param(m, *c) for c in LAYOUTS for m in MOE
                                                       if runs(m, c[1], c[2])])
def test_moe_roundtrip_is_byte_exact(model, world, layout, grouped, pools, zoo_model, tmp_path):
    src = zoo_model(model)
    if grouped and not GROUPED:
        return assert_grouped_refused(pools, world, src, layout)
    out = tmp_path / "converted"
    results = pools.get(world).run(cases.roundtrip, timeout=300, source=str(src), layout=layout.to_dict(),
                                   out_dir=str(out), grouped=grouped)
    expected = cases.check_roundtrip(results, src, out)
    # the experts really went through: one tensor per expert, or stacked [E, ...] (gpt-oss)
    assert any(".experts.7." in n or n.endswith(".experts.gate_up_proj") for n in expected)


@pytest.fixture(scope="session")
def ref_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("moe-reference-cache"))


def verify(pools, zoo_model, ref_cache, model, world, layout, **kw) -> dict:
    out = pools.get(world).run(verify_cases.verify, timeout=300, source=str(zoo_model(model)),
                               layout=layout.to_dict(), reference_cache=ref_cache, **kw)
    reports = [r for r in out if r is not None]
    assert len(reports) == 1
    return reports[0]


VERIFY = [(1, L()), (2, L(ep=2)), (2, L(tp=2, sp=True, ep=2, etp=1)), (4, L(tp=2, sp=True, ep=2)),
          (4, L(pp=2, ep=2)), (4, L(pp=2, vpp=2, ep=2)), (4, L(ep=4))]


@pytest.mark.parametrize("model,world,layout", [
    pytest.param(m, w, lay, id=case_id(m, w, lay), marks=pytest.mark.world(w)) for w, lay in VERIFY for m in MOE
    if runs(m, lay)])
def test_moe_verifies_fp32_with_full_router_agreement(model, world, layout, pools, zoo_model, ref_cache):
    r = verify(pools, zoo_model, ref_cache, model, world, layout)
    assert r["verdict"] == "pass", r["failures"]
    m = r["metrics"]
    assert m["max_diff"] < 1e-4 and m["top1_agreement"] == 1.0
    assert m["router_agreement"] == 1.0 and r["thresholds"]["router_agreement_min"] == 0.99
    routed = [x["layer"] for x in r["layers"] if "router_agreement" in x]
    # mlp_only_layers / first_k_dense_replace
    dense = {"qwen2_moe": 1, "deepseek_v3": 0, "deepseek_v2": 0, "glm4_moe": 0}.get(model)
    assert routed == [i for i in range(4) if i != dense]


@pytest.mark.world(2)
@pytest.mark.parametrize("model", ["mixtral", "qwen3_moe"])
def test_grouped_experts_verify_in_bf16(model, pools, zoo_model, ref_cache):
    """megatron-core's grouped-GEMM experts run only in bf16: checked against HF's own bf16 drift."""
    if not GROUPED:
        return assert_grouped_refused(pools, 2, zoo_model(model), L(ep=2))
    r = verify(pools, zoo_model, ref_cache, model, 2, L(ep=2), dtype="bf16", grouped=True)
    assert r["verdict"] == "pass", r["failures"]
    assert r["metrics"]["router_agreement"] >= r["thresholds"]["router_agreement_min"]


@pytest.mark.world(1)
def test_built_experts_are_the_kind_asked_for(pools, zoo_model):
    """With the up-front refusal lifted, a spec that ignores ``moe_grouped_gemm`` (0.19) is still
    caught by checking what megatron built; where grouped experts exist (0.16) they build."""
    errors = pools.get(1).run(cases.build_error, timeout=300, source=str(zoo_model("qwen3_moe")),
                              layout=L().to_dict(), grouped=True, skip_refusal=True)
    if GROUPED:
        assert errors == [None]
    else:
        assert "megatron built SequentialMLP experts, asked for grouped experts" in errors[0], errors


CONTROLS = [  # (model, world, layout, control, probe named first, cause)
    ("qwen3_moe", 2, L(ep=2), "swap_experts:2:0:1", "layer.2", "weights"),
    ("mixtral", 4, L(tp=2, sp=True, ep=2), "swap_experts:1:2:3", "layer.1", "weights"),
    ("qwen2_moe", 2, L(ep=2), "zero:decoder.layers.2.mlp.shared_experts.gate_weight", "layer.2", "weights"),
    ("mixtral", 2, L(ep=2), "scale:decoder.layers.1.mlp.router.weight:-1", "layer.1", "routing"),
    # a dropped e_score_correction_bias changes which experts win, not their weights
    ("deepseek_v3", 4, L(tp=2, sp=True, ep=2), "zero:decoder.layers.2.mlp.router.expert_bias", "layer.2",
     "routing"),
    ("deepseek_v2", 2, L(ep=2), "scale:decoder.layers.1.mlp.router.weight:-1", "layer.1", "routing"),
    ("glm4_moe", 2, L(tp=2, sp=True, ep=2, etp=1), "zero:decoder.layers.2.mlp.router.expert_bias", "layer.2",
     "routing"),
    ("olmoe", 2, L(tp=2, sp=True), "swap_experts:2:0:1", "layer.2", "weights"),
]


@pytest.mark.parametrize("model,world,layout,control,where,cause", [
    pytest.param(*c, id=f"{c[0]}-{c[3].split(':')[0]}-{c[4]}", marks=pytest.mark.world(c[1])) for c in CONTROLS])
def test_moe_negative_controls_are_caught_and_located(model, world, layout, control, where, cause, pools,
                                                      zoo_model, ref_cache):
    r = verify(pools, zoo_model, ref_cache, model, world, layout, control=control)
    assert r["verdict"] == "fail"
    first = r["first_diverging"]
    assert first["probe"] == where and first["cause"] == cause
    before = r["layers"][: [x["probe"] for x in r["layers"]].index(where)]
    assert all(x["ok"] for x in before)
    layer = int(where.split(".")[1])
    entry = r["layers"][layer + 1]
    if cause == "routing":
        assert entry["router_agreement"] < 0.99
    else:  # the experts got the same tokens: the error is in weights, not in routing
        assert entry["router_agreement"] == 1.0


@pytest.mark.world(2)
def test_olmoe_full_width_q_norm_error_is_located(pools, zoo_model, ref_cache):
    """OLMoE's q norm spans all heads and is split over TP: 2% off is caught at its layer. (Its
    layer's router reads the changed attention output, so the cause reads as routing.)"""
    r = verify(pools, zoo_model, ref_cache, "olmoe", 2, L(tp=2, sp=True),
               control="scale:decoder.layers.1.self_attention.q_layernorm.weight:1.02")
    assert r["verdict"] == "fail" and r["first_diverging"]["probe"] == "layer.1"
    assert [x["ok"] for x in r["layers"][:2]] == [True, True]  # embedding, layer.0


@pytest.mark.world(4)
@pytest.mark.parametrize("model", ["qwen2_moe", "qwen3_moe"])
def test_te_spec_names_export_identically(model, pools, zoo_model):
    results = pools.get(4).run(cases.te_names_export, timeout=300, source=str(zoo_model(model)),
                               layout=L(tp=2, sp=True, ep=2).to_dict())
    for r in results:
        assert r["mismatches"] == [] and r["count"] == len(HFCheckpoint(zoo_model(model)).names())
        assert r["te_grouped_names"] > 0 and r["te_norm_names"] > 0  # the TE spellings were exercised


@pytest.mark.world(4)
def test_each_expert_rank_reads_only_its_experts_and_rows(pools, zoo_model):
    results = pools.get(4).run(cases.expert_reads, timeout=300, source=str(zoo_model("qwen3_moe")),
                               layout=L(ep=2, etp=2).to_dict())
    for r in results:  # 8 experts over ep=2; intermediate 32 over etp=2
        assert r["experts"] == list(range(4 * r["ep_rank"], 4 * r["ep_rank"] + 4)), r
        assert r["gate_rows"] == [(16 * r["etp_rank"], 16 * r["etp_rank"] + 16)], r
