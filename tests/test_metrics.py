"""Alignment metrics and thresholds, on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch

from verify import metrics
from verify.matrix import case_id, expand, parse
from mcore_bridge import ParallelLayout


def _labels(n: int, prompt: int) -> torch.Tensor:
    labels = torch.arange(n)
    labels[:prompt] = -100
    return labels


def test_loss_masked_metrics_ignore_prompt_tokens():
    torch.manual_seed(0)
    ref = torch.randn(16, 50)
    got = ref.clone()
    got[:7] += 5.0  # large differences only where the next label is -100 (prompt of 8 tokens)
    m = metrics.compare_logits(ref, got, _labels(16, prompt=8))
    assert m["max_diff"] == pytest.approx(5.0, rel=1e-6)
    assert m["mean_diff"] > 1.0
    assert m["max_diff_with_loss"] == 0.0 and m["mean_diff_with_loss"] == 0.0
    assert m["loss_hf"] == pytest.approx(m["loss_mg"])  # loss only sees the reply


def test_loss_position_mask_is_shifted():
    mask = metrics.loss_positions(torch.tensor([-100, -100, 5, 6, -100]))
    assert mask.tolist() == [False, True, True, False, False]


def test_identical_logits_are_perfect():
    ref = torch.randn(8, 30)
    m = metrics.compare_logits(ref, ref.clone(), _labels(8, 2))
    assert m["max_diff"] == 0 and m["kl_hf_mg"] == pytest.approx(0, abs=1e-12)
    assert m["top1_agreement"] == 1 and m["cosine_min"] == pytest.approx(1)
    assert metrics.failures(m, metrics.thresholds("fp32")) == []


def test_disagreement_fails_fp32_with_named_metric():
    ref = torch.randn(8, 30)
    got = ref + 0.01 * torch.randn(8, 30)
    fails = metrics.failures(metrics.compare_logits(ref, got, _labels(8, 2)), metrics.thresholds("fp32"))
    assert any(f.startswith("max_diff ") for f in fails) and any(f.startswith("mean_diff ") for f in fails)


def test_bf16_thresholds_follow_calibration():
    calib = {"mean_diff": 0.01, "max_diff": 0.2, "mean_diff_with_loss": 0.01, "max_diff_with_loss": 0.2,
             "kl_hf_mg": 1e-3, "top1_agreement": 0.97}
    t = metrics.thresholds("bf16", calib)
    assert t["max_diff"] == pytest.approx(0.6) and t["top1_agreement_min"] == pytest.approx(0.95)
    tight = metrics.thresholds("bf16", {k: v / 1000 for k, v in calib.items()} | {"top1_agreement": 1.0})
    assert tight["max_diff"] == metrics.BF16_FLOORS["max_diff"]  # floors keep noise from failing
    with pytest.raises(ValueError):
        metrics.thresholds("bf16")


def test_combine_weights_means_and_keeps_worst():
    a = {"mean_diff": 1.0, "max_diff": 1.0, "cosine_min": 0.9, "top1_agreement": 1.0}
    b = {"mean_diff": 3.0, "max_diff": 5.0, "cosine_min": 0.5, "top1_agreement": 0.0}
    c = metrics.combine({"a": a, "b": b}, {"a": 3, "b": 1})
    assert c["mean_diff"] == pytest.approx(1.5) and c["max_diff"] == 5.0
    assert c["cosine_min"] == 0.5 and c["top1_agreement"] == pytest.approx(0.75)


def test_probe_drift_is_relative():
    ref = torch.full((4, 8), 100.0)
    d = metrics.probe_drift(ref, ref * 1.01)
    assert d["rel_mean_diff"] == pytest.approx(0.01) and d["max_diff"] == pytest.approx(1.0)
    assert not math.isnan(metrics.probe_drift(torch.zeros(3), torch.zeros(3))["rel_mean_diff"])


def test_matrix_expansion_skips_invalid_with_reason():
    assert len(parse("tp=1,2 pp=1,2 sp=0,1")) == 8
    valid, skipped = expand("tp=1,2,3 sp=0,1", dims=dict(num_layers=4, num_attention_heads=8,
                                                            num_query_groups=4, ffn_hidden_size=128))
    assert [l.short() for l in valid] == ["tp1-pp1", "tp2-pp1", "tp2-pp1-sp"]
    reasons = " | ".join(r for _, r in skipped)
    assert "needs tensor parallelism" in reasons and "tp=3" in reasons
    assert case_id("qwen3-tiny", ParallelLayout(tp=2, pp=2, sp=True)) == "qwen3-tiny[tp2-pp2-sp]"
    with pytest.raises(ValueError, match="unknown axis"):
        parse("zz=2")  # cp is an axis (context parallel); anything unknown is refused
    assert parse("ep=1,2 etp=1") == [{"ep": 1, "etp": 1}, {"ep": 2, "etp": 1}]
    with pytest.raises(ValueError, match=r"--matrix: tp='1;tp=2' is not a comma-separated list.*separated by spaces"):
        parse("tp=1;tp=2")  # a usage error naming the option and the syntax, not int()'s message


def test_nan_logits_fail():
    ref = torch.randn(8, 30)
    got = ref.clone()
    got[3, 4] = float("nan")
    fails = metrics.failures(metrics.compare_logits(ref, got, _labels(8, 2)), metrics.thresholds("fp32"))
    assert any("NaN" in f for f in fails)


def test_top1_slack_widens_only_for_few_tokens():
    assert metrics.top1_slack(0.97, None) == metrics.BF16_TOP1_SLACK
    assert metrics.top1_slack(0.97, 100_000) == metrics.BF16_TOP1_SLACK  # many tokens: the fixed slack
    few = metrics.top1_slack(0.967, 145)  # 3 sigma of a binomial with p=0.033, n=145
    assert few == pytest.approx(3 * (0.033 * 0.967 / 145) ** 0.5) and few > 0.04
    calib = {"mean_diff": 0.1, "max_diff": 1.0, "mean_diff_with_loss": 0.1, "max_diff_with_loss": 1.0,
             "kl_hf_mg": 1e-3, "top1_agreement": 0.967, "top1_agreement_with_loss": 0.967}
    t = metrics.thresholds("bf16", calib, gate="with_loss", tokens=(1_000_000, 145))
    assert t["top1_agreement_with_loss_min"] == pytest.approx(0.967 - few) and "top1_agreement_min" not in t
    t = metrics.thresholds("bf16", calib, tokens=(1_000_000, 145))
    assert t["top1_agreement_min"] == pytest.approx(0.967 - 0.02) and "top1_agreement_with_loss_min" not in t


def test_loss_masked_gate_drops_unmasked_limits_and_uses_masked_top1():
    t = metrics.thresholds("fp32", gate="with_loss")
    assert not set(metrics.UNMASKED) & set(t) and "mean_diff_with_loss" in t
    assert "top1_agreement_min" not in t and t["top1_agreement_with_loss_min"] == 0.99
    ok = {"mean_diff": 5.0, "max_diff": 5.0, "kl_hf_mg": 1.0, "mean_diff_with_loss": 1e-7,
          "max_diff_with_loss": 1e-6, "top1_agreement": 0.5, "top1_agreement_with_loss": 1.0}
    assert metrics.failures(ok, t, "with_loss") == []  # image/prompt logits are reported, not gated
    bad = dict(ok, top1_agreement_with_loss=0.9)
    assert metrics.failures(bad, t, "with_loss") == ["top1_agreement_with_loss 0.9000 < 0.9900"]
    assert "mean_diff 5.00e+00 > 1.0e-05" in metrics.failures(ok, metrics.thresholds("fp32"))
    with pytest.raises(ValueError, match="gate"):
        metrics.thresholds("fp32", gate="images")
