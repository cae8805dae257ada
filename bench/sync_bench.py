"""RL weight-sync throughput on GPUs, against the floor and a per-parameter baseline, in one run.

    torchrun --nproc-per-node 2 bench/sync_bench.py --config qwen3-8b --layers 36 --tp 2 --out r.json
    torchrun --nproc-per-node 2 bench/sync_bench.py --config qwen3-30b-a3b --layers 48 --ep 2 --out r.json

The model is built at the published shapes with uninitialised bf16 weights (values do not matter
for moving them). Measured in the same process group:
  * floor: NCCL all-gather bus bandwidth (bytes each rank receives per second, (n-1)/n x algbw);
  * ``export_weights`` (every rank receives every HF tensor) over bucket sizes; its wire
    bandwidth = bytes each rank had to receive from others / time, comparable with the floor;
    "delivered" = HF bytes per rank / time;
  * ``export_buckets``, one receiving rank (``receivers="rank"``), delivery to host memory;
  * LoRA merged on the fly (fp32 merge, r=16 on every linear);
  * baseline: what the other bridges do per parameter (DESIGN.md section 3, point 2) -- an
    all-reduce read on the host (who holds it), a metadata ``broadcast_object_list``, then the
    parameter's own all-gather in its TP group and broadcasts over EP / PP, one at a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from make_checkpoint import make_config, tensor_shapes  # noqa: E402

from mcore_bridge import Bridge, ParallelLayout  # noqa: E402
from mcore_bridge.export import nbytes  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dist.barrier()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (NCCL channels, allocator)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def allgather_busbw(per_rank_bytes: int, repeats: int) -> float:
    world = dist.get_world_size()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    src = torch.empty(per_rank_bytes, dtype=torch.uint8, device=device)
    dst = [torch.empty(per_rank_bytes, dtype=torch.uint8, device=device) for _ in range(world)]
    t = timed(lambda: dist.all_gather(dst, src), repeats)
    return per_rank_bytes * (world - 1) / t


def wire_bytes(exporter) -> int:
    """Bytes this rank receives from others when every rank gets every tensor."""
    g, total = exporter.g, 0
    for u in exporter.units:
        _, size, _ = g.split(u.unit.rule)
        if g.holds(u.unit.owner):
            if u.unit.rule.transform.tp_split and size > 1:
                total += u.nbytes * (size - 1) // size
        else:
            total += u.nbytes
    return total


def drain(stream):
    for _ in stream:
        pass


def per_parameter_baseline(bridge, models):
    """Per parameter: an all-reduce, a metadata broadcast, a gather, broadcasts (the others' loop)."""
    exporter, g = bridge.writer.exporter(models, None)
    world = dist.get_world_size()
    with torch.no_grad():
        for u in exporter.units:
            stage, ep_owner = u.unit.owner
            src = (bridge.layout.stage_rank(world, stage) if ep_owner is None
                   else bridge.layout.expert_rank(world, stage, ep=ep_owner))
            owned = torch.tensor([1.0 if g.holds(u.unit.owner) else 0.0], device=exporter.device)
            dist.all_reduce(owned)  # which ranks hold it, read on the host
            assert owned.item() > 0
            meta = [list(u.unit.hf_names), [list(s) for s in u.hf_shapes], str(u.out_dtypes[0])]
            dist.broadcast_object_list(meta, src=src)
            tensors = exporter.gather([u]) if g.holds(u.unit.owner) else None
            if ep_owner is not None and g.ep > 1 and stage == g.pp_rank:
                for i, (shape, dtype) in enumerate(zip(u.hf_shapes, u.out_dtypes)):
                    t = tensors[i][1].contiguous() if tensors else torch.empty(shape, dtype=dtype, device=exporter.device)
                    dist.broadcast(t, src=g.ep_ranks[ep_owner], group=g.ep_group)
            if len(g.pp_ranks) > 1:
                for i, (shape, dtype) in enumerate(zip(u.hf_shapes, u.out_dtypes)):
                    t = tensors[i][1].contiguous() if tensors else torch.empty(shape, dtype=dtype, device=exporter.device)
                    dist.broadcast(t, src=g.pp_ranks[stage], group=g.pp_group)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="qwen3-8b", choices=("qwen3-8b", "qwen3-30b-a3b"))
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--etp", type=int, default=None)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--buckets-mb", default="32,128,256,512,1024")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a gloo dry run")
    args = p.parse_args(argv)

    cfg = make_config(args.config, args.layers)
    hf_tensors = {n: (s, torch.bfloat16) for n, s in tensor_shapes(cfg)}
    layout = ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, sp=args.tp > 1)
    bridge = Bridge(None, layout, hf_config=cfg.to_dict(), hf_tensors=hf_tensors)
    bridge.setup(args.device)
    models = bridge.build_model(torch.bfloat16)
    rank, world = dist.get_rank(), dist.get_world_size()
    model_bytes = sum(nbytes(s, d) for s, d in hf_tensors.values())
    exporter, _ = bridge.writer.exporter(models, None)
    wire = wire_bytes(exporter)
    r = args.repeats
    res = {"config": args.config, "layers": args.layers, "layout": layout.short(), "world": world,
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "model_gb": model_bytes / 1e9, "wire_gb_per_rank": wire / 1e9,
           "params": len(exporter.units)}
    res["allgather_busbw_gbs"] = max(allgather_busbw(b << 20, r) for b in (256, 1024)) / 1e9
    if rank == 0:
        print(f"model {model_bytes / 1e9:.2f} GB, all-gather bus {res['allgather_busbw_gbs']:.1f} GB/s", flush=True)
    sweep = {}
    for mb in [int(x) for x in args.buckets_mb.split(",")]:
        t = timed(lambda: drain(bridge.export_weights(models, bucket_bytes=mb << 20)), r)
        sweep[mb] = {"s": t, "wire_gbs": wire / t / 1e9, "delivered_gbs": model_bytes / t / 1e9}
    res["export_weights"] = sweep
    best = min(sweep, key=lambda k: sweep[k]["s"])
    drain(bridge.export_weights(models, bucket_bytes=best << 20))  # plan for the best size (cached)
    sync()  # where the time goes at the best size: the host loop alone vs until the GPUs finish
    t0 = time.perf_counter()
    drain(bridge.export_weights(models, bucket_bytes=best << 20))
    host = time.perf_counter() - t0
    sync()
    res["best_host_loop_s"], res["best_total_s"] = host, time.perf_counter() - t0
    res["best_bucket_mb"] = best
    res["ratio_to_allgather_busbw"] = sweep[best]["wire_gbs"] / res["allgather_busbw_gbs"]
    B = best << 20
    res["export_buckets_s"] = timed(lambda: drain(bridge.export_buckets(models, bucket_bytes=B)), r)
    res["one_receiver_s"] = timed(lambda: drain(bridge.export_weights(models, bucket_bytes=B, receivers="rank")), r)
    res["to_host_s"] = timed(lambda: drain(bridge.export_weights(models, bucket_bytes=B, device="cpu")), 1)
    t_base = timed(lambda: per_parameter_baseline(bridge, models), 1)
    res["baseline_per_param_s"] = t_base
    res["speedup_vs_baseline"] = t_base / sweep[best]["s"]
    from mcore_bridge.lora import LoraSpec

    bridge.apply_lora(models, LoraSpec(r=16, alpha=32, targets="all-linear"))
    res["lora_merged_s"] = timed(lambda: drain(bridge.export_weights(models, bucket_bytes=B)), r)
    res["lora_adapter_only_s"] = timed(lambda: drain(bridge.export_weights(models, bucket_bytes=B, peft_format=True)), r)
    res["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9 if args.device == "cuda" else None
    if rank == 0:
        print(json.dumps(res, indent=1), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
