"""MoE and vision-language models on GPUs (NCCL, bf16): round trip and verification of a
real-shaped checkpoint per layout.

    python bench/make_checkpoint.py --config qwen3-30b-a3b --out /tmp/q30 --layers 8
    torchrun --nproc-per-node 2 bench/gpu_moe.py /tmp/q30 --layouts ep=2 tp=2,sp=1,ep=2,etp=1 \\
        --report reports/gpu-moe --out bench/results/gpu_moe_2gpu.json

For each layout (``key=value,...`` with the ParallelLayout fields; ranks beyond the layout's
smallest world size are data-parallel): HF -> megatron bf16 (load timed per rank) -> every
exported tensor compared byte for byte with the source on every rank -> ``save_weights`` and the
written files compared again (rank 0) -> the verification report (``verify.run.verify_loaded``:
bf16 thresholds from HF's own bf16-vs-fp32 drift, loss-masked metrics, per-layer drift, router
agreement) written under ``--report``. One JSON summary on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mcore_bridge import Bridge, ParallelLayout
from mcore_bridge.hf_io import HFCheckpoint
from mcore_bridge.runtime import compat
from mcore_bridge.runtime import dist as rt

FIELDS = {"tp": int, "pp": int, "vpp": int, "ep": int, "etp": int, "sp": lambda v: v in ("1", "true"),
          "first": int, "last": int}
RENAME = {"first": "first_stage_layers", "last": "last_stage_layers"}


def parse_layout(text: str) -> ParallelLayout:
    kw = {}
    for part in text.split(","):
        key, value = part.split("=")
        kw[RENAME.get(key, key)] = FIELDS[key](value)
    return ParallelLayout(**kw)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                        b.reshape(-1).view(torch.uint8))


def run_case(src: Path, layout: ParallelLayout, args) -> dict:
    from verify.report import write_report
    from verify.run import verify_loaded

    device = args.device
    torch.cuda.synchronize() if device == "cuda" else None
    dist.barrier()
    t0 = time.perf_counter()
    bridge = Bridge(src, layout)
    bridge.setup(device)
    models = bridge.build_model(torch.bfloat16)
    dist.barrier()
    t_build = time.perf_counter() - t0
    t1 = time.perf_counter()
    bridge.load_weights(models)
    torch.cuda.synchronize() if device == "cuda" else None
    t_load = time.perf_counter() - t1
    loads = [None] * rt.world_size()
    dist.all_gather_object(loads, t_load)

    source = HFCheckpoint(src)
    t2 = time.perf_counter()
    bad, exported, nbytes = [], 0, 0
    for name, tensor in bridge.export_weights(models):
        exported += 1
        nbytes += tensor.numel() * tensor.element_size()
        if not same_bytes(tensor.cpu(), source.read(name)):
            bad.append(name)
    t_export = time.perf_counter() - t2
    out = Path(args.work) / layout.short()
    t3 = time.perf_counter()
    bridge.save_weights(models, out, overwrite=True)
    t_save = time.perf_counter() - t3
    if rt.rank() == 0:
        saved = HFCheckpoint(out)
        if sorted(saved.names()) != sorted(source.names()):
            bad.append("saved names differ")
        bad += [f"saved:{n}" for n in source.names() if n in saved.tensors and not same_bytes(saved.read(n), source.read(n))]
        shutil.rmtree(out, ignore_errors=True)
    flags = torch.tensor([len(bad), exported != len(source.names())], device=device)
    dist.all_reduce(flags)

    report = verify_loaded(bridge, models, src, dtype="bf16", name=src.name, reference_cache=Path(args.work) / "ref",
                           load_s=t_load)
    summary = None
    if rt.rank() == 0:
        write_report(report, args.report)
        summary = {"layout": layout.short(), "world_size": rt.world_size(), "byte_exact": int(flags.sum()) == 0,
                   "bad": bad[:5], "tensors": exported, "export_gb": nbytes / 1e9, "build_s": t_build,
                   "load_s_per_rank": loads, "export_all_ranks_s": t_export, "save_s": t_save,
                   "verdict": report["verdict"], "failures": report["failures"],
                   "gate": report["gate"],
                   "metrics": {k: report["metrics"].get(k) for k in ("mean_diff", "max_diff", "mean_diff_with_loss",
                                                                  "max_diff_with_loss", "top1_agreement",
                                                                  "top1_agreement_with_loss", "router_agreement",
                                                                  "kl_hf_mg")},
                   "thresholds": report["thresholds"],
                   "hf_bf16_vs_fp32": {k: report["calibration"]["hf_bf16_vs_fp32"].get(k)
                                       for k in ("mean_diff", "max_diff", "top1_agreement", "router_agreement")},
                   "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None}
        print(json.dumps(summary), flush=True)
    del models
    torch.cuda.empty_cache() if device == "cuda" else None
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--layouts", nargs="+", required=True, help="e.g. ep=2 tp=2,sp=1,ep=2,etp=1")
    ap.add_argument("--report", default="reports/gpu-moe")
    ap.add_argument("--out", default="bench/results/gpu_moe.json")
    ap.add_argument("--work", default="/tmp/mcore-bridge-gpu-moe")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    compat.scope(args.device).__enter__()  # for the whole run (this script's own process)
    rt.init_process_group(args.device)
    results = [run_case(Path(args.model), parse_layout(spec), args) for spec in args.layouts]
    if rt.rank() == 0:
        import megatron.core

        out = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "model": Path(args.model).name, "torch": torch.__version__,
               "megatron_core": megatron.core.__version__, "cases": results}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    ok = all(r is None or (r["byte_exact"] and r["verdict"] == "pass") for r in results)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    raise SystemExit(main())
