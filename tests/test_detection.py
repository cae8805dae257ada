"""Detection power in every verify report: the standard positive controls (×1.01 of a mid-depth
weight; two swapped experts in an MoE model) run beside the case, on the same reference, and the
report says whether the gate caught and located them; an fp32 gate that misses one fails."""

from __future__ import annotations

import copy

import pytest

from tests import verify_cases
from verify import detection
from verify.report import render_markdown


@pytest.fixture(scope="module")
def moe_report(pools, zoo_model):
    out = pools.get(1).run(verify_cases.verify, timeout=300, source=str(zoo_model("qwen3_moe")), layout={},
                                  detection=True)
    return [r for r in out if r is not None][0]


@pytest.mark.world(1)
def test_moe_report_states_detection_power(moe_report):
    r = moe_report
    assert r["verdict"] == "pass", r["failures"]
    d = r["detection"]
    specs = [e["control"] for e in d["controls"]]
    assert specs == ["scale:decoder.layers.2.self_attention.linear_proj.weight:1.01", "swap_experts:2:0:1"]
    for e in d["controls"]:
        assert e["caught"] and e["located"] and e["first_diverging"] == "layer.2", e
        assert e["failures"], e
    assert d["gate"] and d["status"] == "caught and located"
    assert "detection_s" in r["timing"]
    assert "| detection | caught and located: scale:decoder.layers.2" in render_markdown(r)


@pytest.mark.world(1)
def test_blind_gate_fails_fp32_and_is_reported_in_bf16(moe_report):
    """A control report that passes (the gate missed the fault) turns the fp32 verdict into fail;
    in bf16 the same miss is reported, not gated."""
    base = copy.deepcopy(moe_report)
    base.pop("detection")
    missed = copy.deepcopy(base)  # stands for the control's report: the control went unnoticed
    run = {"control": "scale:decoder.layers.2.mlp.linear_fc2.weight:1.01", "layer": 2}
    r32 = copy.deepcopy(base)
    detection.apply(r32, detection.summarise(r32, [(run, missed)]))
    assert r32["verdict"] == "fail" and r32["failures"][-1].startswith("gate blind: positive control not caught")
    assert r32["detection"]["status"] == "blind: positive control not caught"
    r16 = dict(copy.deepcopy(base), dtype="bf16")
    detection.apply(r16, detection.summarise(r16, [(run, missed)]))
    assert r16["verdict"] == "pass" and not r16["detection"]["gate"]
    assert "bf16 is not the conversion gate" in detection.line(r16["detection"])


def test_standard_controls_pick_existing_weights():
    from mcore_bridge.bridge import Bridge

    dense = detection.standard_controls(Bridge("builtin:qwen3"))
    assert dense == [("scale:decoder.layers.2.mlp.linear_fc2.weight:1.01", 2)]
