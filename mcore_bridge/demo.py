"""``mcore-bridge demo``: every built-in model through HF -> Megatron -> Megatron checkpoint -> HF."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint, quant, zoo
from .bridge import Bridge
from .hf_io import HFCheckpoint
from .layout import ParallelLayout
from .runtime import dist as rt

# fp32 logits, HF vs megatron: verify's fp32 gate on the mean and the largest |diff| (a tiny model's
# largest logit difference can sit above 1e-5 where transformers' own fp32 is no closer: Gemma 3)
MEAN_TOLERANCE, MAX_TOLERANCE = 1e-5, 1e-3


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def roundtrip_one(name: str, layout: ParallelLayout, device: str, work: Path) -> dict:
    from verify.forward import hf_logits, megatron_logits

    t0 = time.time()
    bridge = Bridge(f"builtin:{name}", layout)
    bridge.setup(device)
    models = bridge.build_model(torch.float32)
    bridge.load_weights(models)
    mcore_dir = checkpoint.save_mcore(bridge, models, work / f"{name}-mcore", overwrite=True)
    back = checkpoint.bridge_from_mcore(mcore_dir)
    back.device = bridge.device
    fresh = back.build_model(torch.float32)
    checkpoint.load_mcore(back, fresh, mcore_dir)
    hf_out = back.save_weights(fresh, work / f"{name}-hf", overwrite=True)

    vocab = int(bridge.family.cfg.require("vocab_size"))
    pos = vision = None
    if bridge.family.multimodal:  # one sample with an image (3-D positions where the model has them)
        from verify.inputs import multimodal_samples

        sample = multimodal_samples(bridge.family, bridge.source)[0]
        ids, vision = sample.input_ids[None], sample.vision
        pos = None if sample.position_ids is None else sample.position_ids[:, None]  # Gemma 3: 1-D
    else:
        ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0))
    logits = megatron_logits(fresh, ids, vocab, pos, vision)
    diff = mean = -1.0
    if logits is not None:
        delta = (logits - hf_logits(bridge.source, ids, position_ids=pos, vision=vision)).abs()
        diff, mean = delta.max().item(), delta.mean().item()
    diff, mean = _max_over_ranks(diff), _max_over_ranks(mean)

    mismatched, total, view = [], 0, False
    if rt.rank() == 0:  # a quantised source is written back in bf16: compared with its bf16 view
        src, out = quant.open_quantized(HFCheckpoint(bridge.source)), HFCheckpoint(hf_out)
        view = isinstance(src, (quant.FP8Checkpoint, quant.MXFP4Checkpoint))
        total = len(src.names())
        if set(src.names()) != set(out.names()):
            mismatched = sorted(set(src.names()) ^ set(out.names()))
        else:
            mismatched = [n for n in src.names() if not torch.equal(src.read(n), out.read(n))]
    return {"name": name, "tensors": total, "mismatched": mismatched, "max_diff": diff, "mean_diff": mean,
            "seconds": time.time() - t0, "view": view}


def layout_for(name: str, layout: ParallelLayout) -> ParallelLayout:
    """``layout`` for a dense model; with experts whole on their rank (expert-TP 1) for a MoE model,
    which every MoE family takes (gpt-oss's expert biases need it)."""
    import dataclasses
    import json

    from .families import family_for

    config = json.loads((zoo.materialize(name) / "config.json").read_text())
    if family_for(config).num_experts and layout.tp > 1:
        return dataclasses.replace(layout, etp=1)
    return layout


def run_demo(layout: ParallelLayout, names=None, device: str = "auto") -> int:
    """The demo's own process: models whose layout differs (expert-TP for MoE models) get the
    parallel state re-created for them (``setup(reinit=True)``)."""
    names = names or zoo.names()
    failures = 0
    current = layout_for(names[0], layout)
    rt.setup(current, device)
    with tempfile.TemporaryDirectory(prefix="mcore-bridge-demo-") as tmp:
        holder = [tmp]  # every rank must write into rank 0's directory
        dist.broadcast_object_list(holder, src=0)
        tmp = holder[0]
        for name in names:
            mine = layout_for(name, layout)
            if mine != current:
                rt.setup(mine, device, reinit=True)
                current = mine
            r = roundtrip_one(name, mine, device, Path(tmp))
            ok = not r["mismatched"] and 0 <= r["max_diff"] <= MAX_TOLERANCE and 0 <= r["mean_diff"] <= MEAN_TOLERANCE
            failures += not ok
            if rt.rank() == 0:
                exact = (("byte-exact" + (" to its bf16 view" if r["view"] else "")) if not r["mismatched"] else f"{len(r['mismatched'])} tensors differ: "
                         f"{r['mismatched'][:3]}")
                print(f"{name:<11} HF -> megatron {mine.short():<10} -> HF: {exact} ({r['tensors']} tensors), "
                      f"logits mean|diff| {r['mean_diff']:.1e} max {r['max_diff']:.1e} "
                      f"(tol {MEAN_TOLERANCE:.0e} / {MAX_TOLERANCE:.0e})  "
                      f"{'PASS' if ok else 'FAIL'}  [{r['seconds']:.1f}s]", flush=True)
    return 1 if failures else 0
