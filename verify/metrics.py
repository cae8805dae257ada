"""Alignment metrics between reference (HF) and candidate (megatron) logits, and thresholds.

All metrics take logits ``[S, V]`` of one sample plus the sample's labels; "with loss" variants
keep only positions that predict a label other than -100 (logits at t predict labels[t+1]), so
prompt and image tokens drop out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mcore_bridge.errors import UsageError, VerificationError

LOWER_IS_BETTER = ("token_mean_diff_mean", "token_mean_diff_max", "mean_diff", "max_diff",
                   "mean_diff_with_loss", "max_diff_with_loss", "kl_hf_mg")
HIGHER_IS_BETTER = ("top1_agreement", "top1_agreement_with_loss", "cosine_mean", "cosine_min", "router_agreement")
# Vision-language models gate on the loss tokens only (image and prompt logits differ more and
# train nothing); the metrics over all tokens are reported, not gated.
UNMASKED = ("mean_diff", "max_diff", "kl_hf_mg")

# fp32: both sides compute the same math; only summation order differs between layouts.
FP32_THRESHOLDS = {"mean_diff": 1e-5, "max_diff": 1e-3, "mean_diff_with_loss": 1e-5,
                   "max_diff_with_loss": 1e-3, "kl_hf_mg": 1e-6, "top1_agreement_min": 0.99,
                   "layer_rel_drift": 1e-4}
# bf16: measured against HF's own bf16-vs-fp32 drift on the same inputs, times this factor.
BF16_FACTOR = 3.0
# fp32 with a calibration (HF's own fp32 run against its fp64 run, on the same inputs: the default on a
# GPU, where summation order varies with the GEMM algorithm chosen per shape): each limit is the larger
# of the fixed one above and this factor times HF's own fp32 error.
FP32_FACTOR = 3.0
BF16_FLOORS = {"mean_diff": 1e-3, "max_diff": 1e-2, "mean_diff_with_loss": 1e-3,
               "max_diff_with_loss": 1e-2, "kl_hf_mg": 1e-4, "layer_rel_drift": 1e-3}
BF16_TOP1_SLACK = 0.02
# MoE: fraction of tokens routed to the same expert set on both sides, worst layer. fp32 routing
# flips only on near-ties; bf16 may flip as often as HF's own bf16 run does, plus this slack.
FP32_ROUTER_AGREEMENT_MIN = 0.99
BF16_ROUTER_SLACK = 0.05


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask over positions whose next-token label counts in the loss."""
    labels = labels.reshape(-1)
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:-1] = labels[1:] != -100
    return mask


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> float:
    labels = labels.reshape(-1)
    target = labels[1:]
    keep = target != -100
    if not keep.any():
        return float("nan")
    return F.cross_entropy(logits[:-1][keep].double(), target[keep]).item()


def compare_logits(ref: torch.Tensor, got: torch.Tensor, labels: torch.Tensor) -> dict:
    """Metrics for one sample: ``ref``/``got`` are ``[S, V]`` logits, ``labels`` ``[S]``."""
    ref, got = ref.double(), got.double()
    diff = (got - ref).abs()
    per_token = diff.mean(dim=-1)
    mask = loss_positions(labels)
    masked = diff[mask] if mask.any() else diff[:0]
    logp_ref, logp_got = F.log_softmax(ref, -1), F.log_softmax(got, -1)
    kl = (logp_ref.exp() * (logp_ref - logp_got)).sum(-1)
    cos = F.cosine_similarity(ref, got, dim=-1)
    return {
        "token_mean_diff_mean": per_token.mean().item(),
        "token_mean_diff_max": per_token.max().item(),
        "mean_diff": diff.mean().item(),
        "max_diff": diff.max().item(),
        "mean_diff_with_loss": masked.mean().item() if masked.numel() else float("nan"),
        "max_diff_with_loss": masked.max().item() if masked.numel() else float("nan"),
        "top1_agreement": (ref.argmax(-1) == got.argmax(-1)).double().mean().item(),
        "top1_agreement_with_loss": ((ref[mask].argmax(-1) == got[mask].argmax(-1)).double().mean().item()
                                     if mask.any() else float("nan")),
        "kl_hf_mg": kl.mean().item(),
        "cosine_mean": cos.mean().item(),
        "cosine_min": cos.min().item(),
        "loss_hf": _ce(ref, labels),
        "loss_mg": _ce(got, labels),
    }


def combine(per_input: dict[str, dict], weights: dict[str, int]) -> dict:
    """Aggregate per-sample metrics: maxima of maxima/minima of minima, token-weighted means."""
    out = {}
    keys = next(iter(per_input.values())).keys()
    for k in keys:
        vals = [(m[k], weights[name]) for name, m in per_input.items() if not math.isnan(m[k])]
        if not vals:
            out[k] = float("nan")
        elif k.endswith("_max") or k == "max_diff" or k == "max_diff_with_loss":
            out[k] = max(v for v, _ in vals)
        elif k == "cosine_min":
            out[k] = min(v for v, _ in vals)
        else:
            out[k] = sum(v * w for v, w in vals) / sum(w for _, w in vals)
    return out


def probe_drift(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """Hidden-state drift of one probe: mean |diff| relative to mean |ref|, and max |diff|."""
    ref, got = ref.double(), got.double()
    diff = (got - ref).abs()
    scale = ref.abs().mean().clamp_min(1e-30)
    return {"rel_mean_diff": (diff.mean() / scale).item(), "max_diff": diff.max().item()}


def routing_agreement(ref: torch.Tensor, got: torch.Tensor) -> float:
    """Fraction of tokens whose expert sets match; ``ref``/``got`` are boolean ``[tokens, E]``."""
    if ref.shape != got.shape:
        raise VerificationError(f"routing maps differ in shape: {tuple(ref.shape)} vs {tuple(got.shape)}")
    return (ref == got).all(dim=-1).double().mean().item()


def thresholds(dtype: str, calibration: dict | None = None, moe: bool = False, gate: str = "all",
               tokens: tuple[int, int] | None = None) -> dict:
    """Pass/fail limits. fp32: fixed, or with a ``calibration`` (HF fp32 vs fp64) no tighter than
    ``FP32_FACTOR`` x HF's own fp32 error. bf16: ``BF16_FACTOR`` x HF's own bf16-vs-fp32 drift, top-1
    agreement within ``top1_slack`` of HF's own (``tokens``: (all, loss) token counts).
    ``gate="with_loss"``: only the loss-token metrics and top-1 over loss tokens are limited."""
    out = _thresholds(dtype, calibration, moe, tokens or (None, None))
    if gate == "with_loss":
        out = {k: v for k, v in out.items() if k not in UNMASKED}
        top1 = out.pop("top1_agreement_min")
        out.setdefault("top1_agreement_with_loss_min", top1)
    elif gate == "all":
        out.pop("top1_agreement_with_loss_min", None)
    else:
        raise UsageError(f"gate={gate!r}: choose all or with_loss")
    return out


def gated_metrics(dtype: str = "fp32", gate: str = "all", moe: bool = False) -> list[str]:
    """The overall metrics a verdict is gated on for a model kind (``gate``: "all" for text
    models, "with_loss" for vision-language ones; ``moe``: routed experts), in threshold order:
    the keys of :func:`thresholds`, less ``_min``, less the per-probe ``layer_rel_drift``."""
    calibration = None
    if dtype != "fp32":  # bf16 limits scale HF's own drift; which metrics are limited does not depend on it
        calibration = {**dict.fromkeys(BF16_FLOORS, 0.0), "top1_agreement": 1.0, "top1_agreement_with_loss": 1.0}
    limits = thresholds(dtype, calibration, moe=moe, gate=gate)
    return [k.removesuffix("_min") for k in limits if k != "layer_rel_drift"]


def _thresholds(dtype: str, calibration: dict | None, moe: bool, tokens) -> dict:
    if dtype == "fp32":
        out = dict(FP32_THRESHOLDS)
        for k in LOWER_IS_BETTER:  # calibrated: no tighter than HF's own fp32 error allows
            if calibration and k in out and k != "layer_rel_drift" and not math.isnan(calibration.get(k, math.nan)):
                out[k] = max(out[k], FP32_FACTOR * calibration[k])
        if moe:
            out["router_agreement_min"] = FP32_ROUTER_AGREEMENT_MIN
        return out
    if calibration is None:
        raise UsageError(f"{dtype} thresholds need HF's {dtype}-vs-fp32 calibration")
    out = {k: max(BF16_FACTOR * calibration[k], floor) for k, floor in BF16_FLOORS.items()
           if k in calibration}
    out["top1_agreement_min"] = calibration["top1_agreement"] - top1_slack(calibration["top1_agreement"], tokens[0])
    if not math.isnan(calibration.get("top1_agreement_with_loss", float("nan"))):
        out["top1_agreement_with_loss_min"] = calibration["top1_agreement_with_loss"] - top1_slack(
            calibration["top1_agreement_with_loss"], tokens[1])
    out["layer_rel_drift"] = BF16_FLOORS["layer_rel_drift"]
    if moe:
        out["router_agreement_min"] = calibration.get("router_agreement", 1.0) - BF16_ROUTER_SLACK
    return out


def calibration_factor(dtype: str) -> float:
    """How many times HF's own error (at ``dtype``, against the more precise run) a limit allows."""
    return FP32_FACTOR if dtype == "fp32" else BF16_FACTOR


def top1_slack(agreement: float, tokens: int | None) -> float:
    """How far below HF's own bf16 top-1 agreement megatron's may fall: ``BF16_TOP1_SLACK``, or
    three binomial standard deviations when the tokens are few (another summation order flips
    another draw of near-tied tokens: 145 loss tokens at 96.7% agreement give 0.045)."""
    if not tokens:
        return BF16_TOP1_SLACK
    p = min(max(1.0 - agreement, 0.0), 1.0)
    return max(BF16_TOP1_SLACK, 3.0 * math.sqrt(p * (1.0 - p) / tokens))


# The gate, in one place: ``thresholds()`` returns the limits, ``gated()`` reads which metric each
# limit bounds and in which direction, ``failures()`` applies them, and verify/regression.py compares
# exactly what ``gated()`` names (plus the reported metrics above), so a new limit is compared too.
PER_LAYER = ("layer_rel_drift",)  # bounds each probe's rel_mean_diff (verify.run.build_report)


def gated(limits: dict) -> dict[str, str]:
    """``{metric: "lower" | "higher"}``: the aggregate metrics that ``limits`` (as :func:`thresholds`
    returns them) bound and which way is better. ``<metric>_min`` bounds ``metric`` from below; any
    other key except :data:`PER_LAYER` bounds the metric of that name from above."""
    out = {}
    for k in limits:
        if k in PER_LAYER:
            continue
        if k.endswith("_min"):
            out[k[:-len("_min")]] = "higher"
        else:
            out[k] = "lower"
    return out


def failures(metrics: dict, limits: dict, gate: str = "all") -> list[str]:
    """What fails the gate: every metric :func:`gated` names against its limit (``gate`` is kept for
    callers; :func:`thresholds` already chose the limits for it)."""
    out = []
    for k, better in gated(limits).items():
        limit = limits[k] if better == "lower" else limits[k + "_min"]
        v = metrics.get(k)
        if better == "higher":
            if v is None or not v >= limit:  # also catches NaN; a missing gated metric fails
                shown = float("nan") if v is None else v
                out.append(f"{k} {shown:.4f} < {limit:.4f}")
            continue
        if v is None:
            continue
        if math.isnan(v):
            if not k.endswith("_with_loss"):  # NaN logits must fail; no loss tokens is legitimate
                out.append(f"{k} is NaN")
        elif v > limit:
            out.append(f"{k} {v:.2e} > {limit:.1e}")
    return out
