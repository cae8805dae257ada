"""Training in the loop (``verify --train-steps N``): N optimizer steps on both sides from the same
weights, on the same batch (verify's samples, the loss of ``verify.grad``), with AdamW and the same
settings; the losses per step compared, then the trained megatron weights exported to HF names
(``Bridge.export_weights``) and compared with HF's own trained weights.

Megatron trains as a trainer does: chunks in megatron's ``DistributedDataParallel``, megatron-core's
own optimizer (``get_megatron_optimizer``, Adam with decoupled weight decay, no gradient clipping)
and its ``OptimizerParamScheduler`` (constant learning rate and weight decay). megatron's standard
parameter groups skip weight decay on biases and 1-D tensors (norms); the HF side uses the same
two groups with ``torch.optim.AdamW``. Weights are compared through their updates (trained minus
initial): the relative error of the update, which a wrong step shows at full size.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from mcore_bridge.runtime import dist as rt

from . import grad

REL_MAX = 2e-2  # relative error of a parameter's update after a few Adam steps (fp32; clean: <= 4.8e-3 measured,
# the worst a key bias, whose near-zero gradient Adam's normalisation amplifies)
LOSS_REL_MAX = 1e-5


@dataclasses.dataclass(frozen=True)
class AdamW:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1


def megatron_optimizer(ddp, hp: AdamW, steps: int):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    cfg = OptimizerConfig(optimizer="adam", lr=hp.lr, min_lr=hp.lr, weight_decay=hp.weight_decay,
                          adam_beta1=hp.beta1, adam_beta2=hp.beta2, adam_eps=hp.eps, clip_grad=0.0,
                          bf16=False, fp16=False, params_dtype=torch.float32, use_distributed_optimizer=False)
    opt = get_megatron_optimizer(cfg, ddp, use_gloo_process_groups=False)
    sched = OptimizerParamScheduler(opt, init_lr=hp.lr, max_lr=hp.lr, min_lr=hp.lr, lr_warmup_steps=0,
                                    lr_decay_steps=max(steps, 1), lr_decay_style="constant", start_wd=hp.weight_decay,
                                    end_wd=hp.weight_decay, wd_incr_steps=max(steps, 1), wd_incr_style="constant")
    return opt, sched


def hf_optimizer(model, hp: AdamW):
    """torch AdamW over the trainable parameters, in megatron's two standard groups."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=hp.lr, betas=(hp.beta1, hp.beta2), eps=hp.eps)


def megatron_train(bridge, models, ddp, samples, steps: int, hp: AdamW, exclude=None) -> tuple[list, dict | None]:
    """Collective: ``steps`` optimizer steps; (losses, trained weights in HF names) on rank 0.
    ``exclude``: a megatron parameter left out of the optimizer (a negative control)."""
    vocab = int(bridge.family.cfg.require("vocab_size"))
    total = grad.loss_tokens(samples)
    opt, sched = megatron_optimizer(ddp, hp, steps)
    if exclude:
        _drop_from_optimizer(opt, models, exclude)
    losses = []
    for _ in range(steps):
        opt.zero_grad()  # as megatron's train_step: drops the optimizer's param.grad aliases of main_grad
        losses.append(grad.megatron_backward(ddp, samples, vocab, total))
        ok, _, _ = opt.step()
        if not ok:
            raise RuntimeError("megatron's optimizer skipped a step (non-finite gradients)")
        sched.step(increment=1)
    lora = bridge.lora is not None
    weights = {}
    for name, t in bridge.export_weights(models, dtype=torch.float32, peft_format=lora, merge_lora=False,
                                         device="cpu"):
        if rt.rank() == 0:
            weights[name] = t.clone()
    if rt.rank() != 0:
        return losses, None
    return losses, (grad.peft_layout(bridge, weights) if lora else weights)


def _drop_from_optimizer(opt, models, name: str) -> int:
    """Leave megatron parameter ``name`` (global layer numbers) out of every param group."""
    from .controls import find_param

    param = find_param(models, name)
    dropped = 0
    for o in getattr(opt, "chained_optimizers", [opt]):
        for group in o.optimizer.param_groups:
            keep = [p for p in group["params"] if p is not param]
            dropped += len(group["params"]) - len(keep)
            group["params"] = keep
    return dropped


def hf_train(hf_dir: Path, device: str, samples, steps: int, hp: AdamW, adapter: Path | None = None):
    """(losses, initial tensors, trained tensors), both in the checkpoint's names."""
    model = grad.hf_trainable(hf_dir, device, adapter)
    lora = adapter is not None
    initial = grad.as_checkpoint(model, lora)
    opt = hf_optimizer(model, hp)
    total = grad.loss_tokens(samples)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        losses.append(grad.hf_backward(model, samples, total))
        opt.step()
    return losses, initial, grad.as_checkpoint(model, lora)


def run_train(bridge, models, ddp, samples, hf_dir: Path, steps: int, adapter: Path | None = None,
              hp: AdamW = AdamW(), exclude: str | None = None) -> dict | None:
    """Collective: the ``train`` report section on rank 0."""
    t0 = time.time()
    mg_losses, trained = megatron_train(bridge, models, ddp, samples, steps, hp, exclude)
    t_mg = time.time() - t0
    if rt.rank() != 0:
        return None
    hf_losses, initial, hf_trained = hf_train(hf_dir, bridge.device, samples, steps, hp, adapter)
    names = [n for n in trained if n in initial]
    ref = {n: hf_trained[n].float() - initial[n].float() for n in names}
    got = {n: trained[n].float() - initial[n].float() for n in names}
    result = grad.compare(ref, got, rel_max=REL_MAX, cos_min=0.0)
    fails = [f.replace("gradient of", "update of") for f in result.pop("failures")]
    fails = [f for f in fails if not f.startswith("HF gradients without")]  # frozen or untrained tensors
    missing = sorted(n for n in trained if n not in initial)
    if missing:
        fails.append(f"megatron exported tensors the HF model does not have: {missing[:4]}")
    steps_out = []
    for i, (lh, lm) in enumerate(zip(hf_losses, mg_losses)):
        rel = abs(lm - lh) / abs(lh)
        steps_out.append({"step": i, "loss_hf": lh, "loss_mg": lm, "rel_diff": rel})
        if rel > LOSS_REL_MAX and not any(f.startswith("loss at step") for f in fails):
            fails.insert(0, f"loss at step {i}: {lm:.6f} (megatron) vs {lh:.6f} (HF), rel {rel:.1e} > {LOSS_REL_MAX:.0e}")
    return {"steps": steps, "optimizer": {"type": "AdamW", **dataclasses.asdict(hp), "clip_grad": 0.0,
                                          "megatron": "get_megatron_optimizer + OptimizerParamScheduler (constant)",
                                          "hf": "torch.optim.AdamW, no decay on biases and 1-D tensors"},
            **({"excluded_from_optimizer": exclude} if exclude else {}),
            "losses": steps_out, "thresholds": {"update_rel_err": REL_MAX, "loss_rel": LOSS_REL_MAX},
            "params": result["params"], "first_diverging": result["first_diverging"],
            # after the first step every update inherits a fault: the worst parameter points at it
            "worst": max(result["params"], key=lambda p: p["rel_err"], default=None),
            "max_rel_err": result["max_rel_err"], "failures": fails, "verdict": "fail" if fails else "pass",
            "timing": {"megatron_s": t_mg, "hf_s": time.time() - t0 - t_mg}}
