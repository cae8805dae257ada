"""Realistic ``mcore-bridge-verify/1`` reports for the report and regression tests (no torch)."""

from __future__ import annotations

import copy
import re

# Typical magnitudes: fp32 agrees to ~1e-7; bf16 Megatron vs an fp32 HF reference to ~1e-2.
_BASE = {
    "fp32": dict(diff=1.0e-7, drift=2.0e-7, thresholds={
        "mean_diff": 1e-5, "max_diff": 1e-3, "mean_diff_with_loss": 1e-5, "max_diff_with_loss": 1e-3,
        "top1_agreement_min": 0.99, "layer_rel_drift": 1e-5}),
    "bf16": dict(diff=4.0e-3, drift=3.0e-3, thresholds={
        "mean_diff": 2e-2, "max_diff": 2e-1, "mean_diff_with_loss": 2e-2, "max_diff_with_loss": 2e-1,
        "top1_agreement_min": 0.95, "layer_rel_drift": 3e-2}),
}
_MERGED = ("metrics", "thresholds", "timing", "versions", "layout")


def parse_layout(layout_id: str) -> dict:
    nums = {k: int(v) for k, v in re.findall(r"(tp|pp|vpp)(\d+)", layout_id)}
    return {"tp": nums.get("tp", 1), "pp": nums.get("pp", 1), "vpp": nums.get("vpp", 1),
            "sp": layout_id.endswith("-sp"), "first_stage_layers": None, "last_stage_layers": None}


def metrics_for(diff: float, top1: float = 1.0) -> dict:
    return {"token_mean_diff_mean": diff, "token_mean_diff_max": 3 * diff, "mean_diff": diff,
            "max_diff": 4 * diff, "mean_diff_with_loss": 1.1 * diff, "max_diff_with_loss": 3.5 * diff,
            "top1_agreement": top1, "kl_hf_mg": diff * diff, "cosine_mean": 1.0 - min(diff, 0.1),
            "cosine_min": 1.0 - min(10 * diff, 0.5), "loss_hf": 6.9312, "loss_mg": 6.9312 + diff}


def make_report(model="qwen3-tiny", layout_id="tp2-pp1-sp", dtype="fp32", *, num_layers=4,
                fail_at: int | None = None, scale: float = 1.0, **overrides) -> dict:
    """One case. ``fail_at=k`` makes layer k (and everything after it) drift past the threshold,
    with the matching failures, ``first_diverging`` and a "fail" verdict. ``scale`` multiplies
    every difference. ``overrides`` replace top-level keys; dict-valued ``metrics``, ``thresholds``,
    ``timing``, ``versions`` and ``layout`` are merged into the defaults instead."""
    base = _BASE[dtype]
    diff, drift = base["diff"] * scale, base["drift"] * scale
    thresholds = dict(base["thresholds"])
    family = model.split("-")[0]
    probes = ["embedding"] + [f"layer.{i}" for i in range(num_layers)] + ["final_norm"]
    layers = []
    for i, probe in enumerate(probes):
        layer = None if probe in ("embedding", "final_norm") else i - 1
        rel = 0.0 if probe == "embedding" else drift * (1 + 0.3 * i)
        if fail_at is not None and layer is not None and layer >= fail_at:
            rel = 300 * thresholds["layer_rel_drift"] * (1 + 0.1 * (layer - fail_at))
        if fail_at is not None and probe == "final_norm":
            rel = 400 * thresholds["layer_rel_drift"]
        layers.append({"probe": probe, "layer": layer, "rel_mean_diff": rel, "max_diff": 8 * rel,
                       "threshold": thresholds["layer_rel_drift"], "ok": rel <= thresholds["layer_rel_drift"]})
    metrics = metrics_for(diff, top1=1.0 if dtype == "fp32" else 0.992)
    failures, first = [], None
    if fail_at is not None:
        metrics = metrics_for(thresholds["max_diff"] * 5 / 4, top1=0.62)  # max_diff = 5 x its threshold
        failures = [f"max_diff {metrics['max_diff']:.1e} > {thresholds['max_diff']:.1e}",
                    f"layer.{fail_at} drift {layers[fail_at + 1]['rel_mean_diff']:.1e} > "
                    f"{thresholds['layer_rel_drift']:.1e}"]
        first = {"probe": f"layer.{fail_at}", "layer": fail_at,
                 "rel_mean_diff": layers[fail_at + 1]["rel_mean_diff"],
                 "hf_params": [f"model.layers.{fail_at}.self_attn.{p}_proj.weight" for p in "qkvo"],
                 "mcore_params": [f"decoder.layers.{fail_at}.self_attention.linear_qkv.weight",
                                  f"decoder.layers.{fail_at}.self_attention.linear_proj.weight"]}
    inputs = [{"name": "random-32", "tokens": 64, "loss_tokens": 40},
              {"name": "chat", "tokens": 96, "loss_tokens": 51},
              {"name": "random-384", "tokens": 768, "loss_tokens": 700}]
    report = {
        "schema": "mcore-bridge-verify/1",
        "model": model, "source": f"builtin:{family}", "family": family,
        "layout": parse_layout(layout_id), "layout_id": layout_id, "dtype": dtype,
        "device": "cpu", "world_size": parse_layout(layout_id)["tp"] * parse_layout(layout_id)["pp"],
        "versions": {"torch": "2.13.0", "megatron_core": "0.16.1", "transformers": "4.57.1",
                     "mcore_bridge": "0.1.0"},
        "timing": {"load_s": 0.4, "megatron_forward_s": 1.2, "reference_s": 0.8, "total_s": 3.0},
        "inputs": inputs,
        "metrics": metrics,
        "per_input": {i["name"]: metrics_for(metrics["mean_diff"] * (0.8 + 0.2 * k), metrics["top1_agreement"])
                      for k, i in enumerate(inputs)},
        "thresholds": thresholds,
        "layers": layers,
        "first_diverging": first,
        "calibration": None,
        "failures": failures,
        "verdict": "fail" if failures else "pass",
        "created": "2026-11-28T03:50:00Z",
    }
    if dtype == "bf16":
        report["calibration"] = {"hf_bf16_vs_fp32": metrics_for(2.5e-3, top1=0.994),
                                 "layers": [0.0] + [2.0e-3 * (1 + 0.25 * i) for i in range(1, len(probes))]}
    for key, value in overrides.items():
        if key in _MERGED and isinstance(value, dict):
            report[key] = {**report[key], **copy.deepcopy(value)}
        else:
            report[key] = copy.deepcopy(value)
    return report
