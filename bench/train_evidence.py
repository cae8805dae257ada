"""Checks of a training run of ``examples/finetune_hf.py`` (the GPU evidence of ``bench/gpu_train.sh``;
the CPU tests use the same functions):

* ``hf_check``: the saved HF directory loads in transformers, strictly (no missing, unexpected or
  mismatched keys), and its fp32 logits on the run's probe sample equal the logits megatron's
  final in-memory model gave (``--probe_out``); the untrained source model's logits are the
  negative control (they must differ by far more).
* ``compare``: two runs' per-iteration losses (``--loss_log``) over the iterations both have.
* ``falls``: mean of the last ``k`` losses below the mean of the first ``k``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from finetune_data import read_losses  # noqa: E402,F401


def hf_logits(hf_dir, probe: dict, device: str = "cpu") -> tuple[torch.Tensor, dict]:
    """(fp32 logits of transformers' model in ``hf_dir`` on the probe, its loading info). The
    model computes its own (m)RoPE positions from the probe's tokens and images."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.utils import logging

    logging.disable_progress_bar()
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    cls = AutoModelForImageTextToText if "vision_config" in config else AutoModelForCausalLM
    model, info = cls.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    model = model.to(device).eval()
    kw = {k: v.to(device) for k, v in (probe.get("vision") or {}).items()}
    if kw:  # transformers 5 computes mRoPE positions from the processor's token types (1: image)
        kw["mm_token_type_ids"] = (probe["input_ids"] == int(config["image_token_id"])).int().to(device)
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"].to(device), use_cache=False, **kw).logits.float().cpu()
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return logits, {k: sorted(map(str, v)) for k, v in info.items()}


def hf_check(hf_dir, probe_path, source=None, device: str = "cpu") -> dict:
    probe = torch.load(probe_path, weights_only=False)
    meg = probe["logits"]
    got, info = hf_logits(hf_dir, probe, device)
    out = {"hf_dir": str(hf_dir), "strict": not any(info.values()), "loading_info": info,
           "max_abs_diff": (got - meg).abs().max().item(), "logits_absmax": meg.abs().max().item()}
    if source is not None:
        before, _ = hf_logits(source, probe, device)
        out["untrained_max_abs_diff"] = (before - meg).abs().max().item()
    return out


def compare(a: dict, b: dict, iterations=None) -> dict:
    """Max absolute and relative loss difference over ``iterations`` (default: those both have)."""
    its = sorted(set(a) & set(b)) if iterations is None else list(iterations)
    missing = [i for i in its if i not in a or i not in b]
    if missing or not its:
        raise ValueError(f"compare: iterations {missing or its} are not in both loss logs")
    diffs = [abs(a[i] - b[i]) for i in its]
    return {"iterations": [its[0], its[-1]], "count": len(its), "max_abs_diff": max(diffs),
            # relative to the reference loss, floored: a memorised batch can reach a loss of exactly 0
            "max_rel_diff": max(d / max(abs(a[i]), 1e-6) for d, i in zip(diffs, its))}


def falls(losses: dict, k: int = 20) -> dict:
    its = sorted(losses)
    first = sum(losses[i] for i in its[:k]) / k
    last = sum(losses[i] for i in its[-k:]) / k
    return {"first_mean": first, "last_mean": last, "ratio": last / first}
