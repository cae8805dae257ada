"""Round-trip matrix on GPUs (NCCL) in bf16: every built-in family x every layout the world allows.

    torchrun --nproc-per-node 2 bench/gpu_matrix.py --out reports/gpu_matrix_2gpu.json

For each (family, layout): HF (bf16 copy of the built-in model) -> megatron bf16 on the GPUs ->
``export_weights`` compared byte for byte with the source on every rank -> ``save_weights`` and the
saved files compared again -> logits against transformers (bf16 and fp32 references, on rank 0's
GPU). Prints one line per case and writes a JSON summary on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mcore_bridge import Bridge, ParallelLayout, zoo
from mcore_bridge.hf_io import HFCheckpoint
from mcore_bridge.runtime import compat
from mcore_bridge.runtime import dist as rt

LAYOUTS = {
    1: [dict(tp=1)],
    2: [dict(tp=2), dict(tp=2, sp=True), dict(pp=2), dict(pp=2, vpp=2), dict(tp=1)],
    4: [dict(tp=4, sp=True), dict(tp=2, pp=2), dict(tp=2, pp=2, sp=True), dict(pp=2, first_stage_layers=1),
        dict(pp=4), dict(tp=2), dict(pp=2, vpp=2)],
}


def bf16_copy(name: str) -> Path:
    """The built-in model with every tensor in bf16 (made by rank 0, shared through the filesystem)."""
    from safetensors.torch import load_file, save_file

    src = zoo.materialize(name)
    dest = zoo.cache_root() / "zoo-bf16" / name
    if rt.rank() == 0 and not (dest / "config.json").exists():
        dest.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.suffix == ".safetensors":
                save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, dest / f.name,
                          metadata={"format": "pt"})
            elif f.name == "config.json":
                cfg = json.loads(f.read_text())
                cfg["dtype"] = "bfloat16"
                (dest / f.name).write_text(json.dumps(cfg))
            else:
                (dest / f.name).write_bytes(f.read_bytes())
    dist.barrier()
    return dest


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8),
                                                                        b.view(-1).view(torch.uint8))


def run_case(name: str, layout: ParallelLayout, out_root: Path, device: str) -> dict:
    from verify.forward import hf_logits, megatron_logits

    src = bf16_copy(name)
    t0 = time.time()
    bridge = Bridge(src, layout)
    bridge.setup(device)
    models = bridge.build_model(torch.bfloat16)
    bridge.load_weights(models)
    t_load = time.time() - t0
    source = HFCheckpoint(src)
    bad = [n for n, t in bridge.export_weights(models) if not same_bytes(t.cpu(), source.read(n))]
    out = out_root / f"{name}-{layout.short()}"
    bridge.save_weights(models, out, overwrite=True)
    if rt.rank() == 0:
        saved = HFCheckpoint(out)
        if set(saved.names()) != set(source.names()):
            bad.append("saved names differ")
        bad += [f"saved:{n}" for n in source.names() if n in saved.tensors
                and not same_bytes(saved.read(n), source.read(n))]
    vocab = int(bridge.family.cfg.require("vocab_size"))  # nested text_config for vision-language
    pos = vision = None
    if bridge.family.multimodal:  # one sample with an image, 3-D positions (as the demo does)
        from verify.inputs import multimodal_samples

        sample = multimodal_samples(bridge.family, bridge.source)[0]
        ids, vision = sample.input_ids[None], sample.vision
        pos = None if sample.position_ids is None else sample.position_ids[:, None]  # Gemma 3: 1-D
    else:
        ids = torch.randint(0, vocab, (2, 128), generator=torch.Generator().manual_seed(0))
    got = megatron_logits(models, ids, vocab, pos, vision)
    diffs = torch.zeros(4, dtype=torch.float64, device=device)
    if got is not None:
        ref16 = hf_logits(src, ids, torch.bfloat16, device=device, position_ids=pos, vision=vision).cpu()
        ref32 = hf_logits(src, ids, torch.float32, device=device, position_ids=pos, vision=vision).cpu()
        diffs = torch.tensor([(got - ref16).abs().max(), (got - ref16).abs().mean(),
                              (got - ref32).abs().max(), (ref16 - ref32).abs().max()],
                             dtype=torch.float64, device=device)
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    flags = torch.tensor([len(bad)], device=device)
    dist.all_reduce(flags)
    return {"model": name, "layout": layout.short(), "byte_exact": int(flags.item()) == 0, "bad": bad[:5],
            "max_diff_vs_hf_bf16": diffs[0].item(), "mean_diff_vs_hf_bf16": diffs[1].item(),
            "max_diff_vs_hf_fp32": diffs[2].item(), "hf_bf16_vs_fp32_max_diff": diffs[3].item(),
            "load_s": t_load}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="reports/gpu_matrix.json")
    ap.add_argument("--models", default=",".join(zoo.names()))
    ap.add_argument("--work", default="/tmp/mcore-bridge-gpu-matrix")
    ap.add_argument("--device", default="cuda", help="cuda (NCCL); cpu (gloo) to try the script here")
    args = ap.parse_args()
    compat.scope(args.device).__enter__()  # for the whole run (this script's own process)
    rt.init_process_group(args.device)
    world = dist.get_world_size()
    results = []
    for name in args.models.split(","):
        for spec in LAYOUTS[world]:
            layout = ParallelLayout(**spec)
            r = run_case(name, layout, Path(args.work), args.device)
            results.append(r)
            if rt.rank() == 0:
                print(f"{name:<8} {layout.short():<16} byte-exact={r['byte_exact']} "
                      f"logits max|d| vs HF bf16 {r['max_diff_vs_hf_bf16']:.3e} (mean {r['mean_diff_vs_hf_bf16']:.2e}), "
                      f"vs HF fp32 {r['max_diff_vs_hf_fp32']:.3e}; HF's own bf16-vs-fp32 {r['hf_bf16_vs_fp32_max_diff']:.3e}"
                      f"  load {r['load_s']:.2f}s {'' if r['byte_exact'] else r['bad']}", flush=True)
    if rt.rank() == 0:
        import megatron.core

        summary = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "world_size": world, "torch": torch.__version__,
                   "megatron_core": megatron.core.__version__, "cases": results,
                   "all_byte_exact": all(r["byte_exact"] for r in results)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
        print(f"{len(results)} cases, all byte-exact: {summary['all_byte_exact']} -> {args.out}")
    dist.destroy_process_group()
    return 0 if all(r["byte_exact"] for r in results) else 1


if __name__ == "__main__":
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    raise SystemExit(main())
