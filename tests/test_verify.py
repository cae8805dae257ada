"""The verification layer: every family passes fp32 on a CPU matrix, and deliberate errors are
caught and located (negative controls)."""

from __future__ import annotations

import pytest

from mcore_bridge import ParallelLayout as L
from mcore_bridge import zoo
from tests import verify_cases
from verify.matrix import params

MATRIX = "tp=1,2 pp=1,2 sp=0,1"


@pytest.fixture(scope="session")
def ref_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("reference-cache"))


def run(pools, zoo_model, ref_cache, model, layout, **kw) -> dict:
    src = zoo_model(model)
    out = pools.get(layout.model_parallel_size).run(
        verify_cases.verify, timeout=300, source=str(src), layout=layout.to_dict(),
        reference_cache=ref_cache, **kw)
    reports = [r for r in out if r is not None]
    assert len(reports) == 1  # rank 0 reports
    return reports[0]


@pytest.mark.parametrize("model,layout", params(zoo.DENSE, MATRIX))
def test_family_passes_fp32(model, layout, pools, zoo_model, ref_cache):
    r = run(pools, zoo_model, ref_cache, model, layout)
    assert r["verdict"] == "pass", r["failures"]
    assert r["first_diverging"] is None
    m = r["metrics"]
    assert m["max_diff"] < 1e-4 and m["max_diff_with_loss"] <= m["max_diff"]
    assert m["top1_agreement"] == 1.0 and abs(m["loss_hf"] - m["loss_mg"]) < 1e-5
    probes = [layer["probe"] for layer in r["layers"]]
    assert probes == ["embedding"] + [f"layer.{i}" for i in range(4)] + ["final_norm"]
    assert {i["name"] for i in r["inputs"]} >= {"random-32", "random-384", "chat"}
    assert r["layout_id"] == layout.short() and r["world_size"] == layout.model_parallel_size


CONTROLS = [  # (model, layout, control, the probe that must be named first)
    ("llama", L(pp=2, vpp=2), "scale:decoder.layers.2.mlp.linear_fc2.weight:1.01", "layer.2"),
    ("qwen2", L(tp=2, sp=True), "scale:decoder.layers.3.input_layernorm.weight:1.01", "layer.3"),
    ("mistral", L(tp=2), "swap_qk:1", "layer.1"),
    ("qwen3", L(pp=2), "swap_qk:2", "layer.2"),
    ("qwen3", L(tp=2), "rope_base:2.0", "layer.0"),
]


@pytest.mark.parametrize("model,layout,control,where", [
    pytest.param(m, l, c, w, id=f"{m}-{l.short()}-{c.split(':')[0]}", marks=pytest.mark.world(l.model_parallel_size))
    for m, l, c, w in CONTROLS])
def test_negative_control_is_caught_and_located(model, layout, control, where, pools, zoo_model, ref_cache):
    r = run(pools, zoo_model, ref_cache, model, layout, control=control)
    assert r["verdict"] == "fail"
    first = r["first_diverging"]
    assert first is not None and first["probe"] == where
    layer = int(where.split(".")[1])
    assert all(f"layers.{layer}." in p for p in first["hf_params"] + first["mcore_params"])
    assert f"model.layers.{layer}.self_attn.q_proj.weight" in first["hf_params"]
    # every probe before it is clean
    before = r["layers"][: [l["probe"] for l in r["layers"]].index(where)]
    assert before and all(l["ok"] for l in before)
    if control.startswith("scale:"):  # the scaled tensor is among the named parameters
        assert control.split(":")[1] in first["mcore_params"]
