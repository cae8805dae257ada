"""fp32 checks calibrated against HF's own fp32 error (``--fp32-calibration``, default on a GPU): the HF
model also runs in fp64, and no limit is tighter than 3x HF's own fp32-vs-fp64 difference (never below
the fixed fp32 limits). On an H200 at published shapes, correct conversions of gpt-oss and OLMoE sat at
or over the fixed limits with every agreement metric perfect (reports/gpu-h200/published-session29.md);
a wrong weight must still fail and be located."""

from __future__ import annotations

import pytest

from mcore_bridge import ParallelLayout as L
from verify import metrics

MODEL = "qwen3"


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fp32-calibration-reference-cache"))


def test_limits_are_the_fixed_ones_or_3x_hf_s_own_fp32_error():
    tiny = {k: 1e-9 for k in metrics.LOWER_IS_BETTER}
    assert metrics.thresholds("fp32", tiny) == metrics.thresholds("fp32")  # never below the fixed limits
    noisy = {**tiny, "mean_diff": 1e-5, "max_diff": 2e-3, "kl_hf_mg": float("nan")}
    got = metrics.thresholds("fp32", noisy, moe=True)
    assert got["mean_diff"] == pytest.approx(3e-5) and got["max_diff"] == pytest.approx(6e-3)
    assert got["kl_hf_mg"] == metrics.FP32_THRESHOLDS["kl_hf_mg"]  # an unmeasured metric keeps its limit
    # the agreement minima and the per-layer floor do not move
    assert got["top1_agreement_min"] == metrics.FP32_THRESHOLDS["top1_agreement_min"]
    assert got["router_agreement_min"] == metrics.FP32_ROUTER_AGREEMENT_MIN
    assert got["layer_rel_drift"] == metrics.FP32_THRESHOLDS["layer_rel_drift"]


def _verify(pools, zoo_model, ref_cache, model=MODEL, **kw) -> dict:
    from tests import verify_cases

    out = pools.get(1).run(verify_cases.verify, timeout=600, source=str(zoo_model(model)), layout=L().to_dict(),
                           reference_cache=ref_cache, fp32_calibration=True, **kw)
    (report,) = [r for r in out if r is not None]
    return report


@pytest.mark.world(1)
def test_calibrated_fp32_check_passes_and_names_its_calibration(pools, zoo_model, ref_cache):
    from verify.report import render_markdown, validate_report

    r = _verify(pools, zoo_model, ref_cache)
    assert r["verdict"] == "pass", r["failures"]
    cal = r["calibration"]
    assert cal["against"] == "fp64" and 0 < cal["hf_bf16_vs_fp32"]["mean_diff"] < 1e-5
    assert len(cal["layers"]) == len(r["layers"])
    for k, v in metrics.FP32_THRESHOLDS.items():
        assert r["thresholds"][k] >= v
    assert "HF fp32 vs fp64" in render_markdown(validate_report(r))


@pytest.mark.world(1)
def test_calibrated_fp32_check_still_catches_and_locates_a_wrong_weight(pools, zoo_model, ref_cache):
    r = _verify(pools, zoo_model, ref_cache, control="scale:decoder.layers.1.mlp.linear_fc2.weight:1.01")
    assert r["verdict"] == "fail" and r["calibration"]["against"] == "fp64"
    assert r["first_diverging"]["probe"] == "layer.1"


@pytest.mark.world(1)
def test_calibrated_fp32_check_of_an_mtp_model(pools, zoo_model, ref_cache):
    """The MTP depth takes its own calibration (HF's fp64 MTP head through the same reference formula)."""
    r = _verify(pools, zoo_model, ref_cache, model="deepseek_v3_mtp")
    assert r["verdict"] == "pass", r["failures"]
    (depth,) = r["mtp"]["depths"]
    assert depth["ok"] and depth["threshold"] >= metrics.FP32_THRESHOLDS["layer_rel_drift"]
