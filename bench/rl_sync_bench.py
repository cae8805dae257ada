"""RL weight sync end to end into a separate engine process on GPUs: export + transfer + load into
a transformers model, per step, against the floors measured in the same run.

    # colocated: the engine shares GPU 0 with trainer rank 0 (CUDA IPC, two bucket buffers)
    torchrun --nproc-per-node 2 bench/rl_sync_bench.py --config qwen3-8b --layers 36 --tp 2 --mode colocated
    # disaggregated: the engine on its own GPU (an NCCL group of trainer rank 0 + the engine)
    torchrun --nproc-per-node 2 bench/rl_sync_bench.py --config qwen3-30b-a3b --layers 48 --ep 2 \\
        --mode disaggregated --engine-gpu 2 --out r.json

Trainer rank 0 spawns the engine process (a transformers model at the published shapes, bf16,
randomly initialised on its GPU). A step is timed from a barrier of the trainer ranks to the
engine's acknowledgement that it loaded every tensor (``Receiver.receive`` returned): export,
transfer and load. Steps: bf16 as the checkpoint; FP8 blockwise (the engine dequantises into its
bf16 model); LoRA-only (r=16 on every linear; the engine keeps the factors, as an engine applying
adapters does). Floors, same run: the trainer's all-gather bus bandwidth, a device-to-device copy
on the trainer's GPU (colocated) or the transport group's own broadcast bandwidth and a peer copy
to the engine GPU (disaggregated), and pinned host-to-device. ``floor_s`` for a step is its bytes
over a floor's bandwidth; ``ratio`` = floor_s / step time (1.0 = at the floor). Medians of
``--repeats`` after a warm-up (which also makes the export plan).
"""

from __future__ import annotations

import argparse
import datetime
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

from mcore_bridge.export import nbytes  # noqa: E402

LORA = dict(r=16, alpha=32.0)


def device_sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def bandwidth(fn, nbytes_: int, repeats: int = 5) -> float:
    fn()
    device_sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        device_sync()
        times.append(time.perf_counter() - t0)
    return nbytes_ / statistics.median(times)


def allgather_busbw(per_rank: int, device) -> float:
    world = dist.get_world_size()
    src = torch.empty(per_rank, dtype=torch.uint8, device=device)
    dst = [torch.empty_like(src) for _ in range(world)]

    def go():
        dist.all_gather(dst, src)
    dist.barrier()
    return bandwidth(go, per_rank * (world - 1))


def await_key(store, key: str, proc, timeout: float) -> bytes:
    """The engine's message ``key``; fails at once when the engine process died."""
    t0 = time.perf_counter()
    while True:
        try:
            store.wait([key], datetime.timedelta(seconds=2))
            return store.get(key)
        except Exception:  # noqa: BLE001 -- a wait timing out
            if not proc.is_alive():
                raise RuntimeError(f"the engine process exited (code {proc.exitcode}) before {key!r}") from None
            if time.perf_counter() - t0 > timeout:
                raise


def model_config(args):
    if args.source:
        import transformers

        from mcore_bridge.zoo import materialize

        src = materialize(args.source[len("builtin:"):]) if args.source.startswith("builtin:") else args.source
        return transformers.AutoConfig.from_pretrained(src)
    return make_config(args.config, args.layers)


def engine_main(args_dict: dict, init: str, ctl: str, device: str, names_by_phase: dict):
    """The engine process: its model, the transport, then one ``receive`` per trainer step."""
    import transformers

    from mcore_bridge.sync_transport import Receiver, connect
    from mcore_bridge.sync_transport.ipc import colocate

    args = argparse.Namespace(**args_dict)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    host, port = ctl.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), 2, False, timeout=datetime.timedelta(seconds=args.timeout))
    cfg = model_config(args)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    channel = colocate(init, 1, 2, device, timeout_s=args.timeout) if args.mode == "colocated" else \
        connect(init, 1, 2, device, timeout_s=args.timeout)
    store.set("engine_ready", "1")
    receivers = {"bf16": Receiver(channel, model), "fp8": Receiver(channel, model)}
    kept = {}

    def keep(named):  # the engine's adapter slots, allocated on first sight
        for n, t in named:
            if n not in kept:
                kept[n] = torch.empty_like(t)
            kept[n].copy_(t)
    if names_by_phase["lora"] is not None:  # --steps without lora: no adapter receiver
        receivers["lora"] = Receiver(channel, load=keep, expected=names_by_phase["lora"], lora=True)
    k = 0
    while True:
        phase = store.get(f"phase/{k}").decode()
        if phase == "stop":
            break
        if phase == "floor":
            buf = torch.empty(args.floor_mb << 20, dtype=torch.uint8, device=device)
            for _ in range(6):
                channel.broadcast(buf)
            device_sync()
        else:
            stats = receivers[phase].receive()
            store.set(f"loaded/{k}", json.dumps(stats))
        k += 1
    del model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="qwen3-8b", choices=("qwen3-8b", "qwen3-30b-a3b"))
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--etp", type=int, default=None)
    p.add_argument("--mode", default="colocated", choices=("colocated", "disaggregated"))
    p.add_argument("--engine-gpu", type=int, default=None, help="disaggregated: the engine's GPU (default: world)")
    p.add_argument("--bucket-mb", type=int, default=512)
    p.add_argument("--floor-mb", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--port", type=int, default=29710, help="the transport's store; the bench's own at +1")
    p.add_argument("--steps", default="bf16,fp8,lora")
    p.add_argument("--timeout", type=int, default=300, help="seconds any side waits for the other")
    p.add_argument("--source", default=None, help="an HF directory or builtin:NAME instead of --config "
                   "(e.g. builtin:qwen3 with --device cpu: a gloo smoke run of the bench itself)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.device == "cpu" and args.mode == "colocated":
        p.error("--mode colocated shares CUDA memory; on CPU use --mode disaggregated (gloo)")

    from mcore_bridge import Bridge, ParallelLayout
    from mcore_bridge.lora import LoraSpec
    from mcore_bridge.sync_transport import Sender, connect, push
    from mcore_bridge.sync_transport.ipc import colocate

    cfg = model_config(args)
    layout = ParallelLayout(tp=args.tp, ep=args.ep, etp=args.etp, sp=args.tp > 1)
    if args.source:
        bridge = Bridge(args.source, layout)
        hf_tensors = bridge.hf_tensors
    else:
        hf_tensors = {n: (s, torch.bfloat16) for n, s in tensor_shapes(cfg)}
        bridge = Bridge(None, layout, hf_config=cfg.to_dict(), hf_tensors=hf_tensors)
    bridge.setup(args.device)
    models = bridge.build_model(torch.bfloat16)
    rank, world = dist.get_rank(), dist.get_world_size()
    model_bytes = sum(nbytes(s, d) for s, d in hf_tensors.values())
    steps = args.steps.split(",")
    res = {"config": args.source or args.config, "layers": cfg.num_hidden_layers, "layout": layout.short(), "mode": args.mode,
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "model_gb": model_bytes / 1e9, "bucket_mb": args.bucket_mb}
    res["allgather_busbw_gbs"] = allgather_busbw(args.floor_mb << 20, args.device) / 1e9
    lora_names = None
    if "lora" in steps:  # the factor names the engine must account for (known before LoRA is applied)
        from mcore_bridge.bridge_parts.adapters import AdapterState

        probe = AdapterState(bridge.family, layout, hf_tensors)
        probe.set(LoraSpec(**LORA))
        lora_names = sorted(probe.hf_tensors)
        res["lora_gb"] = sum(nbytes(s, d) for s, d in probe.hf_tensors.values()) / 1e9
    dev = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    sender = store = None
    if rank == 0:
        n = args.floor_mb << 20
        a, b = torch.empty(n, dtype=torch.uint8, device=dev), torch.empty(n, dtype=torch.uint8, device=dev)
        res["d2d_copy_gbs"] = bandwidth(lambda: b.copy_(a), n) / 1e9
        h = torch.empty(n, dtype=torch.uint8, pin_memory=args.device == "cuda")
        if args.device == "cuda":
            res["h2d_pinned_gbs"] = bandwidth(lambda: a.copy_(h, non_blocking=True), n) / 1e9
        engine_dev = "cpu" if args.device == "cpu" else f"cuda:{dev.index}" if args.mode == "colocated" else \
            f"cuda:{args.engine_gpu if args.engine_gpu is not None else world}"
        if args.mode == "disaggregated" and args.device == "cuda":
            c = torch.empty(n, dtype=torch.uint8, device=engine_dev)
            res["peer_copy_gbs"] = bandwidth(lambda: c.copy_(a), n) / 1e9
            del c
        del a, b, h
        store = dist.TCPStore("127.0.0.1", args.port + 1, 2, True, timeout=datetime.timedelta(seconds=args.timeout),
                              wait_for_workers=False)
        ctx = torch.multiprocessing.get_context("spawn")
        proc = ctx.Process(target=engine_main, args=(vars(args), f"tcp://127.0.0.1:{args.port}",
                                                     f"127.0.0.1:{args.port + 1}", engine_dev, {"lora": lora_names}))
        proc.start()
        init = f"tcp://127.0.0.1:{args.port}"
        channel = colocate(init, 0, 2, dev, timeout_s=args.timeout) if args.mode == "colocated" else \
            connect(init, 0, 2, dev, timeout_s=args.timeout)
        await_key(store, "engine_ready", proc, args.timeout)
        sender = Sender(channel)
        res["engine_device"] = engine_dev
    k = 0

    def phase(name):
        nonlocal k
        if rank == 0:
            store.set(f"phase/{k}", name)
        k += 1
        return k - 1

    if rank == 0 and args.mode == "disaggregated":  # the transport's own broadcast bandwidth
        phase("floor")
        buf = torch.empty(args.floor_mb << 20, dtype=torch.uint8, device=dev)
        res["transport_bcast_gbs"] = bandwidth(lambda: channel.broadcast(buf), buf.numel()) / 1e9
        del buf
    elif args.mode == "disaggregated":
        k += 1
    B = args.bucket_mb << 20

    def one(step: str) -> float:
        kk = phase(step)
        device_sync()
        dist.barrier()
        t0 = time.perf_counter()
        out = push(bridge, models, sender, dtype="fp8" if step == "fp8" else None, lora=step == "lora",
                   bucket_bytes=B)
        if rank == 0:
            loaded = json.loads(await_key(store, f"loaded/{kk}", proc, args.timeout).decode())
            assert loaded["buckets"] == out["buckets"], (loaded, out)
            one.last = {"bytes": out["bytes"], "buckets": out["buckets"], "tensors": loaded["tensors"]}
        dist.barrier()
        return time.perf_counter() - t0

    floors = {"allgather": res["allgather_busbw_gbs"], "d2d_copy": res.get("d2d_copy_gbs"),
              "h2d_pinned": res.get("h2d_pinned_gbs")}
    if args.mode == "disaggregated":
        floors.update(transport_bcast=res.get("transport_bcast_gbs"), peer_copy=res.get("peer_copy_gbs"))
    for step in steps:
        if step == "lora":
            bridge.apply_lora(models, LoraSpec(**LORA), random_b=True)
        times = [one(step) for _ in range(args.repeats + 1)][1:]
        t = statistics.median(times)
        entry = {"s": t, "times": times}
        if rank == 0:
            entry.update(one.last)
            gb = one.last["bytes"] / 1e9
            entry["gbs"] = gb / t
            entry["ratios"] = {f: (gb / bw) / t for f, bw in floors.items() if bw}
            print(f"{step}: {t:.3f} s, {gb:.2f} GB, {gb / t:.1f} GB/s, ratios "
                  + ", ".join(f"{f} {r:.2f}" for f, r in entry["ratios"].items()), flush=True)
        res[step] = entry
    if rank == 0:
        phase("stop")
        proc.join(timeout=300)
        res["peak_gpu_gb_rank0"] = torch.cuda.max_memory_allocated() / 1e9 if args.device == "cuda" else None
        print(json.dumps(res, indent=1), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
