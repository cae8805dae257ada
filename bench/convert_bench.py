"""Conversion benchmark: HF -> Megatron torch_dist -> HF, throughput and peak host memory per rank.

    python bench/make_checkpoint.py --out /tmp/qwen3-8b-l4 --layers 4
    TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=1 MCORE_BRIDGE_QUIET=1 \\
      torchrun --nproc-per-node 2 bench/convert_bench.py /tmp/qwen3-8b-l4 --tp 2 --device cpu

Phases, each started together on all ranks (barrier) with the peak-RSS counter reset
(``/proc/self/clear_refs``): ``load_hf`` (HF safetensors into the megatron model), ``save_dist``
(torch_dist release checkpoint), ``load_dist`` (a fresh model at ``--read-layout``, default the
same, from that checkpoint), ``save_hf`` (HF safetensors again, checked byte for byte against the
source on rank 0). Per phase and rank: seconds, GB/s of checkpoint bytes (the whole model divided
by the phase time; all ranks work together), peak RSS and its rise over the RSS before the phase,
against the rank's *share* (bytes of its parameters on the host; 0 with ``--device cuda``).
Rank 0 prints a table and writes ``bench/results/convert_<name>_<layout>_<device>.json``.
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

HERE = Path(__file__).resolve().parent


def rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def parse_layout(args, prefix=""):
    from mcore_bridge import ParallelLayout

    get = lambda k: getattr(args, prefix + k)  # noqa: E731
    return ParallelLayout(tp=get("tp"), pp=get("pp"), ep=get("ep"), etp=get("etp"),
                          sp=get("tp") > 1 and get("ep") > 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    for prefix in ("", "read_"):
        flag = "--" + prefix.replace("_", "-")
        ap.add_argument(f"{flag}tp", type=int, default=None if prefix else 1)
        ap.add_argument(f"{flag}pp", type=int, default=None if prefix else 1)
        ap.add_argument(f"{flag}ep", type=int, default=None if prefix else 1)
        ap.add_argument(f"{flag}etp", type=int, default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--work", default="/tmp/mcore-bridge-convert-bench")
    ap.add_argument("--name", default=None)
    ap.add_argument("--results", default=str(HERE / "results"))
    args = ap.parse_args()
    for k in ("tp", "pp", "ep", "etp"):
        if getattr(args, "read_" + k) is None:
            setattr(args, "read_" + k, getattr(args, k))

    from mcore_bridge import Bridge, checkpoint
    from mcore_bridge.hf_io import HFCheckpoint
    from mcore_bridge.runtime import dist as rt

    layout, read_layout = parse_layout(args), parse_layout(args, "read_")
    src = Path(args.model)
    total = sum(i.nbytes for i in HFCheckpoint(src).tensors.values())
    work = Path(args.work)
    bridge = Bridge(src, layout)
    bridge.setup(args.device)
    rank = rt.rank()
    phases = {}

    def phase(name, fn):
        dist.barrier()
        before = rss()["VmRSS"]
        reset_peak()
        t0 = time.perf_counter()
        out = fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        dt = time.perf_counter() - t0
        peak = rss()["VmHWM"]
        phases[name] = {"s": dt, "gb_per_s": total / dt / 1e9, "rss_before_gb": before / 1e9,
                        "peak_rss_gb": peak / 1e9, "rise_gb": (peak - before) / 1e9}
        return out

    def load_hf():
        m = bridge.build_model(args.dtype)
        bridge.load_weights(m)
        return m

    models = phase("load_hf", load_hf)
    share = 0.0 if args.device == "cuda" else sum(
        t.numel() * t.element_size() for t in bridge.state(models).values()) / 1e9
    for ph in phases.values():
        ph["share_gb"] = share
    ckpt = work / "dist"
    phase("save_dist", lambda: checkpoint.save_mcore(bridge, models, ckpt, overwrite=True))
    phases["save_dist"]["share_gb"] = share
    del models
    reader = checkpoint.bridge_from_mcore(ckpt, read_layout)
    reader.setup(args.device)

    def load_dist():
        m = reader.build_model(args.dtype)
        checkpoint.load_mcore(reader, m, ckpt)
        return m

    fresh = phase("load_dist", load_dist)
    out = work / "hf"
    phase("save_hf", lambda: reader.save_weights(fresh, out, overwrite=True))
    read_share = 0.0 if args.device == "cuda" else sum(
        t.numel() * t.element_size() for t in reader.state(fresh).values()) / 1e9
    phases["load_dist"]["share_gb"] = phases["save_hf"]["share_gb"] = read_share
    exact = None
    if rank == 0:
        a, b = HFCheckpoint(src), HFCheckpoint(out)
        exact = sorted(a.names()) == sorted(b.names()) and all(torch.equal(a.read(n), b.read(n)) for n in a.names())
    per_rank = [None] * rt.world_size()
    dist.all_gather_object(per_rank, phases)
    if rank == 0:
        name = args.name or src.name
        tag = f"{layout.short()}" + (f"_to_{read_layout.short()}" if read_layout != layout else "")
        print(f"\n{name}  {tag}  world={rt.world_size()}  device={args.device}  {total / 1e9:.2f} GB  "
              f"round trip byte-exact: {exact}")
        print("phase      rank      s   GB/s  share_gb  rss_before  peak_rss  rise_gb  rise/share")
        for ph in ("load_hf", "save_dist", "load_dist", "save_hf"):
            for r, p in enumerate(per_rank):
                x = p[ph]
                ratio = f"{x['rise_gb'] / x['share_gb']:.2f}" if x.get("share_gb") else "-"
                print(f"{ph:<10} {r:>4} {x['s']:6.2f} {x['gb_per_s']:6.2f} {x['share_gb'] or 0:9.2f} "
                      f"{x['rss_before_gb']:10.2f} {x['peak_rss_gb']:9.2f} {x['rise_gb']:8.2f} {ratio:>10}")
        res = Path(args.results)
        res.mkdir(parents=True, exist_ok=True)
        path = res / f"convert_{name}_{tag}_{args.device}.json"
        path.write_text(json.dumps({"model": name, "layout": layout.to_dict(), "read_layout": read_layout.to_dict(),
                                    "world_size": rt.world_size(), "device": args.device, "checkpoint_gb": total / 1e9,
                                    "byte_exact": exact, "ranks": per_rank,
                                    "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
                                   indent=1) + "\n")
        print(f"wrote {path}")
        shutil.rmtree(work, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    main()
