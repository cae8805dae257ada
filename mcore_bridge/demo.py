"""``mcore-bridge demo``: every built-in model through HF -> Megatron -> Megatron checkpoint -> HF."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint, zoo
from .bridge import Bridge
from .hf_io import HFCheckpoint
from .layout import ParallelLayout
from .runtime import dist as rt

TOLERANCE = 1e-5  # fp32 logits, HF vs megatron


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
    if bridge.family.multimodal:  # one sample with an image, 3-D positions
        from verify.inputs import multimodal_samples

        sample = multimodal_samples(bridge.family, bridge.source)[0]
        ids, pos, vision = sample.input_ids[None], sample.position_ids[:, None], sample.vision
    else:
        ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0))
    logits = megatron_logits(fresh, ids, vocab, pos, vision)
    diff = -1.0
    if logits is not None:
        diff = (logits - hf_logits(bridge.source, ids, position_ids=pos, vision=vision)).abs().max().item()
    diff = _max_over_ranks(diff)

    mismatched, total = [], 0
    if rt.rank() == 0:
        src, out = HFCheckpoint(bridge.source), HFCheckpoint(hf_out)
        total = len(src.names())
        if set(src.names()) != set(out.names()):
            mismatched = sorted(set(src.names()) ^ set(out.names()))
        else:
            mismatched = [n for n in src.names() if not torch.equal(src.read(n), out.read(n))]
    return {"name": name, "tensors": total, "mismatched": mismatched, "max_diff": diff,
            "seconds": time.time() - t0}


def run_demo(layout: ParallelLayout, names=None, device: str = "auto") -> int:
    names = names or zoo.names()
    failures = 0
    rt.setup(layout, device)
    with tempfile.TemporaryDirectory(prefix="mcore-bridge-demo-") as tmp:
        holder = [tmp]  # every rank must write into rank 0's directory
        dist.broadcast_object_list(holder, src=0)
        tmp = holder[0]
        for name in names:
            r = roundtrip_one(name, layout, device, Path(tmp))
            ok = not r["mismatched"] and 0 <= r["max_diff"] <= TOLERANCE
            failures += not ok
            if rt.rank() == 0:
                exact = ("byte-exact" if not r["mismatched"] else f"{len(r['mismatched'])} tensors differ: "
                         f"{r['mismatched'][:3]}")
                print(f"{name:<11} HF -> megatron {layout.short():<10} -> HF: {exact} ({r['tensors']} tensors), "
                      f"logits max|diff| {r['max_diff']:.1e} (tol {TOLERANCE:.0e})  "
                      f"{'PASS' if ok else 'FAIL'}  [{r['seconds']:.1f}s]", flush=True)
    return 1 if failures else 0
