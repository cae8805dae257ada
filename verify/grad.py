"""Gradient alignment (``verify --grad``): one backward pass on both sides with the same loss, the
gradients compared per parameter under the HF checkpoint's names.

Loss: mean next-token cross-entropy over every loss token (labels != -100) of verify's samples,
fp32. Megatron runs its own pipeline schedule (``get_forward_backward_func``, forward_only=False)
over chunks wrapped in megatron's ``DistributedDataParallel``; ``finalize_model_grads`` then does
what it does in training (data-parallel reduction, the tensor-parallel all-reduce of
sequence-parallel norms and q/k norms, the embedding-group all-reduce of tied embeddings). The
gradient shards are exported through the bridge's own export plan (``Bridge.export_weights``
with ``tensor_of``): TP/ETP shards gathered, EP/PP collected, named and shaped like the HF weights.

HF: the real transformers model (+ PEFT adapter), ``.grad`` of every parameter, written in the
checkpoint's layout by transformers' own ``save_pretrained`` (parameters replaced by their
gradients), so that fused in-memory tensors (e.g. stacked experts) come out under the names the
bridge exports.
"""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from mcore_bridge.runtime import dist as rt

REL_MAX = 1e-4  # fp32: relative error of a parameter's gradient (clean runs measure <= ~1e-5)
COS_MIN = 1 - 1e-6
LOSS_REL_MAX = 1e-5
# A parameter whose HF gradient norm is below this fraction of the largest one is compared
# against that floor instead of its own norm (its relative error is fp32 noise, not a fault).
NORM_FLOOR = 1e-6
_LAYER = re.compile(r"\blayers\.(\d+)\.")


# ---- the loss ------------------------------------------------------------------------------------
def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of ``logits [S, V]`` over the positions whose next label
    is not -100 (fp32)."""
    labels = labels.to(logits.device)
    mask = labels[1:] != -100
    return torch.nn.functional.cross_entropy(logits[:-1][mask].float(), labels[1:][mask], reduction="sum")


def loss_tokens(samples) -> int:
    return sum(s.loss_tokens for s in samples)


# ---- megatron side ---------------------------------------------------------------------------------
def wrap_ddp(models) -> list:
    """The chunks in megatron's ``DistributedDataParallel`` (fp32 gradient buffers, no overlap), as
    a trainer wraps them; gradients then live in ``param.main_grad``."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                        use_distributed_optimizer=False)
    return [DistributedDataParallel(config=m.config, ddp_config=cfg, module=m, disable_bucketing=i > 0)
            for i, m in enumerate(models)]


def megatron_backward(ddp, samples, vocab: int, total: int) -> float | None:
    """The gradient of the mean loss over all ``samples`` (megatron's schedule, one call per
    sample), then ``finalize_model_grads``. Returns the loss on rank 0 (None elsewhere)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    for m in ddp:
        m.zero_grad_buffer()
        m.train()  # as in training: megatron's training-only checks apply (dropout is 0 in these models)
    device = next(ddp[0].parameters()).device
    sums = []

    def step(data_iterator, model):
        s, weight, n = next(data_iterator)
        seq = s.input_ids.numel()
        pos = (torch.arange(seq)[None] if s.position_ids is None else s.position_ids[:, None]).to(device)
        extra = {k: v.to(device) for k, v in s.vision.items()}
        out = model(s.input_ids[None].to(device), pos, None, **extra)

        def loss_func(logits):
            full = gather_from_tensor_model_parallel_region(logits)[0, :, :vocab].float()
            ce = loss_sum(full, s.labels) * weight
            sums.append(float(ce.detach()))
            # the schedule divides by the number of micro-batches: the result is the mean over tokens
            return ce * (n / total), {}

        return out, loss_func

    # One schedule call per sample (pipeline stages exchange activations of one fixed length); the
    # gradients accumulate in the DDP buffers and are reduced once, by finalize_model_grads.
    for s in samples:
        batches = [(s, 1.0)]
        if len(ddp) > 1:  # the interleaved schedule wants >= pp micro-batches: pad with weightless ones
            batches += [(s, 0.0)] * max(0, ps.get_pipeline_model_parallel_world_size() - 1)
        batches = [(b, w, len(batches)) for b, w in batches]
        iters = [iter(batches) for _ in ddp]
        get_forward_backward_func()(
            forward_step_func=step, data_iterator=iters if len(ddp) > 1 else iters[0],
            model=ddp if len(ddp) > 1 else ddp[0], num_microbatches=len(batches), seq_length=s.input_ids.numel(),
            micro_batch_size=1, forward_only=False)
    finalize_model_grads(ddp)
    for m in ddp:
        m.eval()
    mine = sum(sums) / total if (sums and ps.get_tensor_model_parallel_rank() == 0
                                 and ps.is_pipeline_last_stage(ignore_virtual=True)) else None
    return _on_rank0(mine)


def _on_rank0(value):
    if not (dist.is_initialized() and rt.world_size() > 1):
        return value
    parts = [None] * rt.world_size() if rt.rank() == 0 else None
    dist.gather_object(value, parts, dst=0)
    if rt.rank() != 0:
        return None
    return next(p for p in parts if p is not None)


def grad_of(param: torch.Tensor) -> torch.Tensor:
    """A parameter's gradient: ``main_grad`` under megatron's DDP, else ``.grad``; zeros for
    tensors without one (buffers, frozen weights)."""
    g = getattr(param, "main_grad", None)
    if g is None:
        g = param.grad
    return torch.zeros_like(param) if g is None else g.detach()


def megatron_grads(bridge, models, lora: bool = False) -> dict | None:
    """Gradients named and shaped like the HF tensors (the LoRA factors under PEFT's names with
    ``lora``), through the bridge's export plan; on rank 0 (None elsewhere)."""
    out = {}
    for name, t in bridge.export_weights(models, dtype=torch.float32, tensor_of=grad_of, peft_format=lora,
                                         merge_lora=False, device="cpu"):
        if rt.rank() == 0:
            out[name] = t.clone()
    if rt.rank() != 0:
        return None
    return peft_layout(bridge, out) if lora else out


def peft_layout(bridge, factors: dict) -> dict:
    """LoRA factors in the bridge's HF names -> as PEFT lays an adapter out on transformers 5
    (routed experts' factors stacked, module renames), the names PEFT's ``save_pretrained`` writes."""
    from mcore_bridge.lora import peft_io

    return peft_io.renamed(peft_io.stack_experts(factors, bridge.adapter_family), bridge.adapter_family.base,
                            to_file=True)


# ---- HF side -----------------------------------------------------------------------------------------
def hf_trainable(model_dir: Path, device: str, adapter: Path | None = None):
    """The fp32 reference model, with the PEFT adapter trainable on it (base frozen) if given."""
    from .forward import hf_model

    model = hf_model(model_dir, torch.float32, device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    return model


def hf_backward(model, samples, total: int) -> float:
    """Accumulate the gradient of the mean loss into ``.grad``; returns the loss."""
    from .forward import hf_forward

    loss = 0.0
    for s in samples:
        pos = None if s.position_ids is None else s.position_ids[:, None]
        ce = loss_sum(hf_forward(model, s.input_ids[None], pos, s.vision)[0], s.labels) / total
        ce.backward()
        loss += float(ce.detach())
    return loss


def as_checkpoint(model, adapter: bool, tensors=None) -> dict[str, torch.Tensor]:
    """The model's tensors in its checkpoint layout and names, written by transformers' (PEFT's)
    own ``save_pretrained``. ``tensors``: "grad" puts every parameter's gradient (zeros where none,
    buffers zeroed) in place of its value first -- the model is spent afterwards."""
    from safetensors.torch import load_file

    if tensors == "grad":
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.grad if p.grad is not None else torch.zeros_like(p)
            for b in model.buffers():
                if b.is_floating_point():
                    b.zero_()
    with tempfile.TemporaryDirectory(prefix="mcore-bridge-grad-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        out = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            out.update(load_file(f))
    if adapter:
        from mcore_bridge.lora.peft_io import PREFIX

        out = {n[len(PREFIX):] if n.startswith(PREFIX) else n: t for n, t in out.items()}
    return out


# ---- comparison ------------------------------------------------------------------------------------
def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def shared_groups(bridge, lora: bool) -> list[tuple[str, ...]]:
    """HF names that one megatron parameter stands for (a LoRA A shared by q/k/v or gate/up): its
    gradient is the sum of theirs."""
    from mcore_bridge.transforms import Shared

    units = bridge.lora_units if lora else bridge.units
    return [tuple(u.hf_names) for u in units if isinstance(u.rule.transform, Shared) and len(u.hf_names) > 1]


def compare(ref: dict, got: dict, groups=(), rel_max: float = REL_MAX, cos_min: float = COS_MIN) -> dict:
    """Per parameter (in the export order, i.e. forward order): relative error and cosine of the
    megatron gradient against HF's, the first one past the thresholds, and what is unmatched."""
    ref = dict(ref)
    for names in groups:  # one megatron gradient for several HF tensors: compare with their sum
        if all(n in ref for n in names):
            total = sum(ref[n] for n in names)
            for n in names:
                ref[n] = total
    floor = NORM_FLOOR * max((float(t.float().norm()) for n, t in ref.items() if n in got), default=0.0)
    params, first = [], None
    for name, g in got.items():
        if name not in ref:
            continue
        h = ref[name].float()
        g = g.float()
        if tuple(h.shape) != tuple(g.shape):
            raise RuntimeError(f"gradient of {name}: megatron exported {tuple(g.shape)}, HF has {tuple(h.shape)}")
        h, g = h.double(), g.double()
        nh, ng, diff = float(h.norm()), float(g.norm()), float((g - h).norm())
        rel = diff / max(nh, floor) if max(nh, floor) > 0 else (0.0 if ng == 0 else math.inf)
        cos = float((g * h).sum()) / (ng * nh) if ng > 0 and nh > 0 else (1.0 if ng == nh == 0 else 0.0)
        ok = rel <= rel_max and (cos >= cos_min or nh <= floor)
        entry = {"name": name, "layer": layer_of(name), "rel_err": rel, "cosine": cos, "norm_hf": nh,
                 "norm_mg": ng, "ok": ok}
        params.append(entry)
        if not ok and first is None:
            first = entry
    missing = sorted(n for n, t in ref.items() if n not in got and float(t.abs().max()) > 0)
    extra = sorted(n for n in got if n not in ref)
    fails = []
    if first is not None:
        bad = [p for p in params if not p["ok"]]
        fails.append(f"gradient of {first['name']} (layer {first['layer']}) rel_err {first['rel_err']:.2e} "
                     f"cosine {first['cosine']:.6f} (limits {rel_max:.0e}, {cos_min}); {len(bad)} parameter(s) "
                     f"diverge")
    if missing:
        fails.append(f"HF gradients without a megatron counterpart: {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    if extra:
        fails.append(f"megatron gradients without an HF tensor: {extra[:4]}{' ...' if len(extra) > 4 else ''}")
    return {"params": params, "first_diverging": first, "missing": missing, "extra": extra, "failures": fails,
            "max_rel_err": max((p["rel_err"] for p in params), default=0.0),
            "min_cosine": min((p["cosine"] for p in params), default=1.0)}


# ---- the run -----------------------------------------------------------------------------------------
def origin_of(params: list[dict]) -> dict | None:
    """The diverging parameter the backward pass meets first (the deepest one in forward order):
    where a gradient error starts, everything before it inheriting the error."""
    bad = [p for p in params if not p["ok"]]
    return bad[-1] if bad else None


def mla_rope_defect(bridge, ref: dict, got: dict, origin: dict | None) -> dict | None:
    """megatron-core's local MLA at TP > 1 (seen in 0.16.1): the gradient of the shared RoPE key
    (the last qk_rope_head_dim rows of linear_kv_down_proj, HF ``kv_a_proj_with_mqa``) keeps only
    this rank's heads' share, never summed over TP; the latent rows and the forward are exact.
    Detected on the measured gradients, not assumed from the version."""
    if origin is None or bridge.layout.tp == 1 or not origin["name"].endswith("kv_a_proj_with_mqa.weight"):
        return None
    if not bridge.family.architecture.config.get("multi_latent_attention"):
        return None
    rank = int(bridge.hf_config["kv_lora_rank"])
    h, g = ref[origin["name"]].double(), got[origin["name"]].double()

    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    latent, rope = rel(g[:rank], h[:rank]), rel(g[rank:], h[rank:])
    if latent > REL_MAX or rope <= 100 * REL_MAX:
        return None
    import megatron.core

    return {"id": "mla-tp-rope-key-grad", "megatron_core": megatron.core.__version__, "tp": bridge.layout.tp,
            "parameter": origin["name"], "layer": origin["layer"], "latent_rows_rel_err": latent,
            "rope_rows_rel_err": rope,
            "reason": f"known megatron-core defect (local MLA, TP > 1): the gradient of the shared RoPE key "
                      f"(rows {rank}: of {origin['name']}) is not summed over the {bridge.layout.tp} tensor-parallel "
                      f"ranks (rel err {rope:.2f} there, {latent:.1e} on the latent rows); the forward is exact. "
                      f"Every parameter upstream inherits it. Train MLA at TP 1, or on a megatron-core without it."}


def run_grad(bridge, models, ddp, samples, hf_dir: Path, adapter: Path | None = None) -> dict | None:
    """Collective: one backward on both sides, the ``grad`` report section on rank 0."""
    import time

    t0 = time.time()
    lora = bridge.lora is not None
    vocab = int(bridge.family.cfg.require("vocab_size"))
    total = loss_tokens(samples)
    loss_mg = megatron_backward(ddp, samples, vocab, total)
    got = megatron_grads(bridge, models, lora)
    t_mg = time.time() - t0
    if rt.rank() != 0:
        return None
    model = hf_trainable(hf_dir, bridge.device, adapter)
    loss_hf = hf_backward(model, samples, total)
    ref = as_checkpoint(model, lora, "grad")
    del model
    result = compare(ref, got, shared_groups(bridge, lora))
    result["origin"] = origin_of(result["params"])
    known = mla_rope_defect(bridge, ref, got, result["origin"])
    loss_rel = abs(loss_mg - loss_hf) / abs(loss_hf)
    fails = list(result.pop("failures"))
    if loss_rel > LOSS_REL_MAX:
        fails.insert(0, f"loss {loss_mg:.6f} (megatron) vs {loss_hf:.6f} (HF): rel {loss_rel:.1e} > {LOSS_REL_MAX:.0e}")
    if result["origin"] is not None and result["origin"] is not result["first_diverging"]:
        o = result["origin"]
        fails.append(f"the backward error starts at {o['name']} (layer {o['layer']}): the deepest diverging parameter")
    verdict = ("xfail" if known else "fail") if fails else "pass"
    return {"loss": {"hf": loss_hf, "mg": loss_mg, "rel_diff": loss_rel, "tokens": total,
                     "definition": "mean next-token cross-entropy over loss tokens (labels != -100), fp32"},
            "thresholds": {"rel_err": REL_MAX, "cosine": COS_MIN, "loss_rel": LOSS_REL_MAX, "norm_floor": NORM_FLOOR},
            **result, "known_defect": known, "failures": fails, "verdict": verdict,
            "timing": {"megatron_s": t_mg, "hf_s": time.time() - t0 - t_mg}}


def freeze_expert_bias(models) -> str | None:
    """megatron's trainer moves the router's expert bias after every step (aux-loss-free balancing,
    inside ``finalize_model_grads``); transformers has no such update, so it is switched off here
    (``moe_router_bias_update_rate = 0``) and the report says so."""
    configs = {id(m.config): m.config for m in models}
    if not any(getattr(c, "moe_router_enable_expert_bias", False) for c in configs.values()):
        return None
    rate = next(iter(configs.values())).moe_router_bias_update_rate
    for c in configs.values():
        c.moe_router_bias_update_rate = 0.0
    return (f"held fixed: megatron's aux-loss-free expert-bias update (rate {rate}) is off in this comparison, "
            f"as transformers has none")


def run_checks(report: dict | None, bridge, models, samples, hf_dir: Path, *, grad: bool = False,
               train_steps: int = 0, adapter: Path | None = None, control: str | None = None) -> dict | None:
    """Collective, after verify's forward comparison: the ``grad`` and ``train`` sections added to
    rank 0's ``report`` (failures prefixed ``grad:`` / ``train:``; a detected known defect is
    listed under ``known_defects`` as an expected failure instead)."""
    from . import controls
    from .train import run_train

    if any(n.endswith(("experts.weight1", "experts.weight2")) for m in models for n, _ in m.named_parameters()):
        raise ValueError("--grad / --train-steps: grouped-GEMM experts keep every expert in one parameter, which "
                         "the gradient export does not split; run without --grouped-experts")
    if bridge.family.num_experts and bridge.layout.tp > 1 and not bridge.layout.sp:
        # megatron's MoE layer refuses to train so ("During training, performance may degrade if
        # MoE and tensor parallelism are enabled without also enabling sequence parallelism")
        if report is not None:
            why = "megatron-core does not train MoE at tp > 1 without sequence parallel: verify this layout with sp"
            for key in ("grad",) * grad + ("train",) * bool(train_steps):
                report[key] = {"verdict": "skipped", "reason": why}
        return report
    frozen = freeze_expert_bias(models)
    ddp = wrap_ddp(models)
    sections = {}
    if grad:
        sections["grad"] = run_grad(bridge, models, ddp, samples, hf_dir, adapter)
    if train_steps:
        sections["train"] = run_train(bridge, models, ddp, samples, hf_dir, train_steps, adapter,
                                      exclude=controls.optimizer_exclusion(control))
    if report is None:
        return None
    for sec in sections.values():
        if frozen:
            sec["router_expert_bias"] = frozen
    known = (sections.get("grad") or {}).get("known_defect")
    for key, sec in sections.items():
        report[key] = sec
        if sec["verdict"] == "fail" and known and key == "train":
            sec["verdict"] = "xfail"  # the same defect, seen through the updates
        if sec["verdict"] == "fail":
            report["failures"] += [f"{key}: {f}" for f in sec["failures"]]
    if known:
        report.setdefault("known_defects", []).append(known)
    report["verdict"] = "fail" if report["failures"] else "pass"
    return report


def summary(report: dict) -> str:
    """The grad/train part of the one-line summary."""
    out = ""
    g, t = report.get("grad"), report.get("train")
    if (g or t or {}).get("verdict") == "skipped":
        return f"  grad/train SKIPPED: {(g or t)['reason']}"
    if g:
        out += f"  grad max_rel {g['max_rel_err']:.1e} {g['verdict'].upper()}"
        where = g["origin"] or g["first_diverging"]
        if where:
            out += f" at {where['name']}"
        if g.get("known_defect"):
            out += f" (known: {g['known_defect']['id']})"
    if t:
        out += f"  train[{t['steps']}] max_rel {t['max_rel_err']:.1e} {t['verdict'].upper()}"
        if t["first_diverging"]:
            out += f" worst {t['worst']['name']}"
    return out
