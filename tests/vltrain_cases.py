"""Vision-language training cases run inside ``verify.pool.Pool`` ranks (one call per rank):
one backward pass through megatron's own schedule and DDP, with or without activation
recomputation, packed (THD) or one sample per micro-batch; freezing with megatron's optimizer."""

from __future__ import annotations

import torch

from mcore_bridge import ParallelLayout


def _samples(bridge, source: str):
    from verify.inputs import multimodal_samples

    return multimodal_samples(bridge.family, source, lengths=(32,))  # 2 image samples + 1 text


def _build(source: str, layout: dict, training: dict | None):
    from mcore_bridge.bridge import Bridge
    from mcore_bridge.train_options import TrainOptions

    bridge = Bridge(source, ParallelLayout(**layout))
    bridge.setup("cpu")
    models = bridge.build_model(torch.float32, training=TrainOptions(**training) if training else None)
    bridge.load_weights(models)
    return bridge, models


def _backward(ddp, batches, vocab: int, weights=None) -> list[float] | None:
    """One backward over ``batches`` (each: input_ids [1, T], position_ids [3, 1, T], vision,
    packed_seq_params or None, labels [T], bounds [(start, end)] of its samples); the loss is the
    summed next-token cross-entropy of every sample (times its ``weights`` entry: 0 leaves a sample
    out of the gradient) over all loss tokens. Returns each sample's summed loss in order
    (tensor-parallel rank 0; None elsewhere)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from verify.grad import loss_sum

    total = sum(int((b["labels"][lo + 1:hi] != -100).sum()) for b in batches for lo, hi in b["bounds"])
    n = len(batches)
    losses = []
    model = ddp[0]
    model.zero_grad_buffer()
    model.train()

    def step(data_iterator, model):
        b = next(data_iterator)
        extra = {k: v for k, v in b["vision"].items()}
        if b["packed"] is not None:
            extra["packed_seq_params"] = b["packed"]
        out = model(b["input_ids"], b["position_ids"], None, **extra)

        def loss_func(logits):
            full = gather_from_tensor_model_parallel_region(logits)[0, :, :vocab].float()
            parts = [loss_sum(full[lo:hi], b["labels"][lo:hi]) for lo, hi in b["bounds"]]
            first = len(losses)
            losses.extend(float(p.detach()) for p in parts)
            w = torch.tensor([1.0 if weights is None else float(weights[first + i]) for i in range(len(parts))])
            return (torch.stack(parts) * w).sum() * (n / total), {}

        return out, loss_func

    get_forward_backward_func()(forward_step_func=step, data_iterator=iter(batches), model=model,
                                num_microbatches=n, seq_length=max(b["input_ids"].shape[1] for b in batches),
                                micro_batch_size=1, forward_only=False)
    finalize_model_grads(ddp)
    model.eval()
    return losses if ps.get_tensor_model_parallel_rank() == 0 else None


def train_grads(source: str, layout: dict, training: dict | None = None, packed: bool = False,
                bad_offset: tuple[int, int] | None = None, control: str | None = None,
                weights: list[float] | None = None) -> dict | None:
    """Per-sample losses, the gradients (HF names, fp32) of one backward pass and how often the
    layers / core attentions ran (recomputation runs them again); rank 0 only."""
    from mcore_bridge.families.vl_train import pack
    from mcore_bridge.runtime import dist as rt
    from verify.grad import megatron_grads, wrap_ddp

    bridge, models = _build(source, layout, training)
    samples = _samples(bridge, source)
    if packed:
        p = pack(samples, align=8, bad_offset=bad_offset)
        batches = [dict(input_ids=p.input_ids, position_ids=p.position_ids, vision=p.vision,
                        packed=p.packed_seq_params, labels=p.labels, bounds=p.bounds)]
    else:
        batches = [dict(input_ids=s.input_ids[None], position_ids=s.position_ids[:, None], vision=s.vision,
                        packed=None, labels=s.labels, bounds=[(0, s.input_ids.numel())]) for s in samples]
    if control == "deepstack_lost_in_recompute":
        _lose_deepstack_in_recompute(models[0])
    calls = {"layer": 0, "core_attention": 0}
    handles = []
    for layer in models[0].decoder.layers:
        handles.append(layer.register_forward_hook(lambda *_: calls.__setitem__("layer", calls["layer"] + 1)))
        handles.append(layer.self_attention.core_attention.register_forward_hook(
            lambda *_: calls.__setitem__("core_attention", calls["core_attention"] + 1)))
    ddp = wrap_ddp(models)
    losses = _backward(ddp, batches, int(bridge.family.cfg.require("vocab_size")), weights)
    for h in handles:
        h.remove()
    grads = megatron_grads(bridge, models)
    if rt.rank() != 0:
        return None
    return {"losses": losses, "names": [s.name for s in samples], "grads": grads, "calls": calls,
            "microbatches": len(batches), "recompute": models[0].config.recompute_granularity}


def _lose_deepstack_in_recompute(chunk) -> None:
    """Negative control: the deepstack layers see their features only in the first forward, not
    when recomputation replays them (what forward hooks keyed on the forward's state would do)."""
    for layer in chunk.decoder.layers:
        if not hasattr(layer, "deepstack_index"):
            continue
        forward = layer.forward

        def lossy(*args, context=None, _forward=forward, **kwargs):
            return _forward(*args, context=None if torch.is_grad_enabled() else context, **kwargs)

        layer.forward = lossy


def freeze_step(source: str, layout: dict, parts: list[str]) -> dict | None:
    """Build with ``freeze=parts``, one backward and one step of megatron's optimizer; per part:
    parameters, how many are trainable, have a gradient, changed in the step. Rank 0 only."""
    from mcore_bridge.runtime import dist as rt
    from mcore_bridge.train_options import part_of
    from verify.grad import wrap_ddp
    from verify.train import AdamW, megatron_optimizer

    bridge, models = _build(source, layout, {"freeze": tuple(parts)})
    samples = _samples(bridge, source)
    batches = [dict(input_ids=s.input_ids[None], position_ids=s.position_ids[:, None], vision=s.vision,
                    packed=None, labels=s.labels, bounds=[(0, s.input_ids.numel())]) for s in samples[:2]]
    chunk = models[0]
    before = {n: p.detach().clone() for n, p in chunk.named_parameters()}
    ddp = wrap_ddp(models)
    opt, sched = megatron_optimizer(ddp, AdamW(), 1)
    _backward(ddp, batches, int(bridge.family.cfg.require("vocab_size")))
    with_grad = {n for n, p in chunk.named_parameters()
                 if getattr(p, "main_grad", None) is not None and bool(p.main_grad.abs().sum() > 0)}
    ok, _, _ = opt.step()
    sched.step(1)
    summary = {}
    for n, p in chunk.named_parameters():
        s = summary.setdefault(part_of(n), {"params": 0, "trainable": 0, "with_grad": 0, "changed": 0})
        s["params"] += 1
        s["trainable"] += int(p.requires_grad)
        s["with_grad"] += int(n in with_grad)
        s["changed"] += int(not torch.equal(before[n], p.detach()))
    return {"summary": summary, "step_ok": bool(ok)} if rt.rank() == 0 else None


def text_grads(source: str, layout: dict, training: dict | None = None) -> dict | None:
    """A text model's per-sample losses and gradients (one backward, two random samples) and how
    often its layers ran; rank 0 only."""
    from mcore_bridge.runtime import dist as rt
    from verify.grad import megatron_grads, wrap_ddp
    from verify.inputs import random_sample

    bridge, models = _build(source, layout, training)
    vocab = int(bridge.family.cfg.require("vocab_size"))
    samples = [random_sample(vocab, n, seed=n) for n in (32, 48)]
    batches = [dict(input_ids=s.input_ids[None], position_ids=torch.arange(s.input_ids.numel())[None], vision={},
                    packed=None, labels=s.labels, bounds=[(0, s.input_ids.numel())]) for s in samples]
    calls = {"layer": 0}
    handles = [layer.register_forward_hook(lambda *_: calls.__setitem__("layer", calls["layer"] + 1))
               for layer in models[0].decoder.layers]
    losses = _backward(wrap_ddp(models), batches, vocab)
    for h in handles:
        h.remove()
    grads = megatron_grads(bridge, models)
    if rt.rank() != 0:
        return None
    return {"losses": losses, "grads": grads, "calls": calls["layer"], "layers": len(models[0].decoder.layers)}
