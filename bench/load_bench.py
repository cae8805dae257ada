"""Load/save benchmark: the bridge's load_weights against the I/O floor, per rank.

    TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=1 MCORE_BRIDGE_QUIET=1 \\
      torchrun --nproc-per-node 2 bench/load_bench.py /tmp/qwen3-8b-l4 --tp 2 --device cpu

Per rank and per round (each round builds a fresh model, as a real job would):
  * floor  -- read exactly the bytes this rank needs with plain ``os.preadv`` calls into one
              preallocated, already-touched buffer. The byte ranges come from the bridge's own plan
              (``Bridge.local.items`` + ``transform.slices``) and the safetensors header offsets: a row
              slice is one range, a column slice one range per row, adjacent ranges coalesced.
              On CPU also ``floor_fresh``: the same reads into a new buffer per item, so the
              first-touch page faults that filling freshly built (untouched) parameters costs are
              included. On CUDA ``floor_h2d`` instead: the reads into a pinned buffer, each item
              then copied to a preallocated device buffer.
  * bridge -- ``Bridge.load_weights(models)``.
  * floor again (the two floors bracket the load; the smaller counts).
  * save   -- ``Bridge.save_weights`` into a scratch directory under /tmp (``--no-save`` skips it).
Before the first round every rank reads its bytes once (warm-up) so all phases see the same page
cache; ``--cold`` instead evicts the checkpoint files from the page cache (posix_fadvise DONTNEED on
our own files only) before every timed read phase. Ranks start each phase together (barrier).

Memory: peak RSS of the load (VmHWM, reset through /proc/self/clear_refs right before
``load_weights``, and ru_maxrss) against a budget of RSS-before-load + host share (bytes of the
rank's local parameters, zero on CUDA where they live on the GPU) + the largest single slice read.
A sampler thread also records peak RssAnon / RssFile (mmap'ed checkpoint pages count as RssFile).

Rank 0 prints a table and writes ``bench/results/load_<name>_<layout>_<device>[_cold].json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


# ------------------------------------------------------------------------------------------------
# Memory probes
# ------------------------------------------------------------------------------------------------

def proc_status() -> dict[str, int]:
    """Selected /proc/self/status fields, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in STATUS_KEYS:
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Sampler:
    """Polls /proc/self/status in a thread and keeps the peak of each field (best effort: it only
    runs while the main thread releases the GIL)."""

    def __init__(self, interval_s: float = 0.002):
        self.interval, self.peak, self._stop = interval_s, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for k, v in proc_status().items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------------------------
# The floor: byte ranges from the bridge's plan, read with plain preadv
# ------------------------------------------------------------------------------------------------

def data_start(path: Path) -> int:
    """Offset of the first tensor byte in a safetensors file (8-byte length + JSON header)."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def region_ranges(shape, itemsize: int, region, base: int) -> list[tuple[int, int]]:
    """(offset, length) byte ranges of ``tensor[region]`` for a row-major tensor at ``base``.

    The innermost dimension that is not taken whole bounds a contiguous block; every combination of
    indices of the dimensions before it gives one block. Adjacent blocks are merged.
    """
    ndim = len(shape)
    region = tuple(region) + (slice(None),) * (ndim - len(region))
    bounds = []
    for s, d in zip(region, shape):
        start, stop, step = s.indices(d)
        if step != 1:
            raise ValueError(f"strided region {region} is not supported")
        bounds.append((start, max(start, stop)))
    strides = [itemsize] * ndim
    for i in range(ndim - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    if ndim == 0 or any(a == b for a, b in bounds):
        return [] if ndim else [(base, itemsize)]
    j = max((i for i, (a, b) in enumerate(bounds) if (a, b) != (0, shape[i])), default=0)
    block = (bounds[j][1] - bounds[j][0]) * strides[j]
    offsets = np.array([base + bounds[j][0] * strides[j]], dtype=np.int64)
    for i in range(j - 1, -1, -1):  # outer dims: all index combinations, row-major order
        idx = np.arange(bounds[i][0], bounds[i][1], dtype=np.int64) * strides[i]
        offsets = (idx[:, None] + offsets[None, :]).reshape(-1)
    return coalesce([(int(o), block) for o in offsets])


def coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for off, n in sorted(ranges):
        if out and out[-1][0] + out[-1][1] == off:
            out[-1][1] += n
        else:
            out.append([off, n])
    return [(o, n) for o, n in out]


class ReadPlan:
    """What one rank reads: per local parameter, per HF source, the file and byte ranges."""

    def __init__(self, bridge, models):
        from mcore_bridge.hf_io import read_header

        ckpt = bridge.hf
        state = bridge.state(models)
        groups = bridge.local.groups()
        starts, headers = {}, {}
        self.items = []  # (param, nbytes, [(path, [(off, len)])])
        self.share = 0  # bytes of this rank's loaded parameters (in the model dtype)
        self.largest_slice = 0
        self.largest_item = 0
        self.n_ranges = 0
        for item in bridge.local.items(models, state):
            target = state[(item.chunk, item.param)]
            names = item.unit.hf_names
            shapes = [ckpt.info(n).shape for n in names]
            _, tp, tp_rank = groups.split(item.unit.rule)
            regions = item.unit.rule.transform.slices(shapes, tuple(target.shape), tp, tp_rank)
            sources, total = [], 0
            read = [names[i] for i in item.unit.rule.transform.region_sources(len(regions))]
            for name, region in zip(read, regions):  # (a fused tensor: several regions of one name)
                info = ckpt.info(name)
                if info.file not in starts:
                    starts[info.file] = data_start(info.file)
                    headers[info.file] = read_header(info.file)
                base = starts[info.file] + headers[info.file][name]["data_offsets"][0]
                itemsize = torch.empty((), dtype=info.dtype).element_size()
                ranges = region_ranges(info.shape, itemsize, region, base)
                size = sum(n for _, n in ranges)
                self.largest_slice = max(self.largest_slice, size)
                self.n_ranges += len(ranges)
                total += size
                sources.append((info.file, ranges))
            self.items.append((item.param, total, sources))
            self.largest_item = max(self.largest_item, total)
            self.share += target.numel() * target.element_size()
        self.files = sorted(starts)
        self.nbytes = sum(t for _, t, _ in self.items)


def pread_into(fd: int, view: memoryview, offset: int):
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise OSError(f"short read at offset {offset}")
        view, offset = view[n:], offset + n


class Floor:
    def __init__(self, plan: ReadPlan, device: str):
        self.plan, self.device = plan, device
        pin = device == "cuda"
        self.host = torch.empty(plan.largest_item, dtype=torch.uint8, pin_memory=pin)
        self.host.fill_(0)  # touch every page now, so the timed reads never fault it in
        self.view = memoryview(self.host.numpy())
        self.dev = torch.zeros(plan.largest_item, dtype=torch.uint8, device="cuda") if pin else None

    def read(self, h2d: bool = False, fresh: bool = False) -> int:
        """Read every item's ranges into the touched buffer (``fresh``: into a new buffer per item,
        so first-touch page faults are paid as they are for freshly built parameters)."""
        fds = {p: os.open(p, os.O_RDONLY) for p in self.plan.files}
        try:
            for _, total, sources in self.plan.items:
                view = memoryview(torch.empty(total, dtype=torch.uint8).numpy()) if fresh else self.view
                pos = 0
                for path, ranges in sources:
                    fd = fds[path]
                    for off, n in ranges:
                        pread_into(fd, view[pos:pos + n], off)
                        pos += n
                if h2d:
                    self.dev[:total].copy_(self.host[:total])  # pinned -> device, synchronous
                del view
        finally:
            for fd in fds.values():
                os.close(fd)
        if h2d:
            torch.cuda.synchronize()
        return self.plan.nbytes


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------

def barrier(device):
    if dist.is_initialized():
        dist.barrier()
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    barrier(device)
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return dt


def evict(files, rank):
    """Drop our checkpoint files from the page cache (--cold); only these files are touched."""
    if rank == 0:
        for p in files:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    if dist.is_initialized():
        dist.barrier()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except Exception:
        return "?"


@contextlib.contextmanager
def profiled(profile_dir, name):
    """cProfile the block into ``profile_dir/name`` (no-op without a directory)."""
    if profile_dir is None:
        yield
        return
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        with open(Path(profile_dir) / name, "w") as f:
            pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats(40)
            pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(25)


FLOORS = {"cpu": ("floor", "floor_fresh"), "cuda": ("floor", "floor_h2d")}


def floors(res: dict, n: int, plan: ReadPlan, device: str, cold):
    """Time each floor variant once; the buffer is freed before the bridge runs."""
    floor = Floor(plan, device)
    for kind in FLOORS[device]:
        cold()
        res[f"{kind}{n}_s"] = timed(lambda: floor.read(h2d=kind == "floor_h2d", fresh=kind == "floor_fresh"),
                                    device)
    del floor
    gc.collect()
    if device == "cuda":  # torch keeps freed pinned blocks cached: release them so RSS-before is honest
        getattr(torch._C, "_host_emptyCache", lambda: None)()


def one_round(args, bridge, device, dtype, files, rank, profile_dir=None) -> dict:
    gc.collect()
    t0 = time.perf_counter()
    models = bridge.build_model(dtype=dtype)
    build_s = time.perf_counter() - t0
    plan = ReadPlan(bridge, models)
    res = dict(read_bytes=plan.nbytes, n_ranges=plan.n_ranges, share_bytes=plan.share,
               largest_slice_bytes=plan.largest_slice, largest_item_bytes=plan.largest_item,
               build_s=build_s)

    cold = (lambda: evict(files, rank)) if args.cold else (lambda: None)
    floors(res, 1, plan, device, cold)

    cold()
    barrier(device)
    before = proc_status()
    res["hwm_reset"] = reset_peak_rss()
    with Sampler() as sampler, profiled(profile_dir, f"load_profile_rank{rank}.txt"):
        t0 = time.perf_counter()
        bridge.load_weights(models)
        if device == "cuda":
            torch.cuda.synchronize()
        res["bridge_s"] = time.perf_counter() - t0
    after = proc_status()
    res.update(rss_before=before["VmRSS"], rss_after=after["VmRSS"], hwm_after=after["VmHWM"],
               ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               peak_anon_sampled=sampler.peak.get("RssAnon", 0), peak_file_sampled=sampler.peak.get("RssFile", 0),
               anon_before=before["RssAnon"], file_before=before["RssFile"])

    floors(res, 2, plan, device, cold)

    if not args.no_save:
        save_dir = Path(args.save_dir) / "out"
        with profiled(profile_dir, f"save_profile_rank{rank}.txt"):
            res["save_s"] = timed(lambda: bridge.save_weights(models, save_dir, overwrite=True), device)
        barrier(device)
        if rank == 0:
            res["saved_bytes"] = sum(p.stat().st_size for p in save_dir.iterdir())
            shutil.rmtree(save_dir, ignore_errors=True)
    del models
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def summarize(rounds: list[dict], device: str) -> dict:
    """Per rank: best time of each phase over rounds, ratios, memory against the budget."""
    def best(kind):
        vals = [r[k] for r in rounds for k in (f"{kind}1_s", f"{kind}2_s", f"{kind}_s") if k in r]
        return min(vals) if vals else None

    r0 = rounds[0]
    bridge = best("bridge")
    out = dict(read_gb=r0["read_bytes"] / 1e9, n_ranges=r0["n_ranges"], share_gb=r0["share_bytes"] / 1e9,
               largest_slice_gb=r0["largest_slice_bytes"] / 1e9, bridge_s=bridge,
               bridge_gbps=r0["read_bytes"] / bridge / 1e9)
    for kind in FLOORS[device]:
        t = best(kind)
        out[f"{kind}_s"] = t
        out[f"{kind}_gbps"] = r0["read_bytes"] / t / 1e9
        suffix = kind[len("floor"):]
        out[f"ratio{suffix}"] = bridge / t
        out[f"ratio{suffix}_per_round"] = [r["bridge_s"] / min(r[f"{kind}1_s"], r[f"{kind}2_s"]) for r in rounds]
    out["bridge_per_round_s"] = [r["bridge_s"] for r in rounds]
    if best("save") is not None:
        out["save_s"] = best("save")
    host_share = r0["share_bytes"] if device == "cpu" else 0
    before = max(r["rss_before"] for r in rounds)
    peak = max(r["hwm_after"] if r["hwm_reset"] else r["ru_maxrss"] for r in rounds)
    peak_anon = max(r["peak_anon_sampled"] for r in rounds)
    anon_before = max(r["anon_before"] for r in rounds)
    budget = before + host_share + r0["largest_slice_bytes"]
    out.update(rss_before_gb=before / 1e9, peak_rss_gb=peak / 1e9,
               ru_maxrss_gb=max(r["ru_maxrss"] for r in rounds) / 1e9,
               peak_anon_gb=peak_anon / 1e9, peak_file_gb=max(r["peak_file_sampled"] for r in rounds) / 1e9,
               budget_gb=budget / 1e9, peak_over_budget=peak / budget,
               anon_over_budget=peak_anon / (anon_before + host_share + r0["largest_slice_bytes"]))
    return out


def print_table(summaries: list[dict], device: str):
    extra = "floor_fresh" if device == "cpu" else "floor_h2d"
    suffix = extra[len("floor"):]
    cols = [("rank", "{}"), ("read_gb", "{:.2f}"), ("floor_s", "{:.2f}"), (f"{extra}_s", "{:.2f}"),
            ("bridge_s", "{:.2f}"), ("ratio", "{:.2f}"), (f"ratio{suffix}", "{:.2f}"), ("save_s", "{:.2f}"),
            ("share_gb", "{:.2f}"), ("largest_slice_gb", "{:.2f}"), ("rss_before_gb", "{:.2f}"),
            ("peak_rss_gb", "{:.2f}"), ("peak_anon_gb", "{:.2f}"), ("peak_file_gb", "{:.2f}"),
            ("budget_gb", "{:.2f}"), ("peak_over_budget", "{:.2f}"), ("anon_over_budget", "{:.2f}")]
    rows = [[fmt.format(s[k]) if s.get(k) is not None else "-" for k, fmt in cols] for s in summaries]
    widths = [max(len(k), *(len(r[i]) for r in rows)) for i, (k, _) in enumerate(cols)]
    print("  ".join(k.rjust(w) for (k, _), w in zip(cols, widths)))
    for r in rows:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="HF checkpoint directory (see make_checkpoint.py)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1, help="expert parallel size (MoE checkpoints)")
    p.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (default: --tp)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--rounds", type=int, default=2, help="fresh model + floor/load/floor (+save) per round")
    p.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache before "
                                                        "each timed read (instead of one warm-up read)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--save-dir", default=None, help="scratch dir for save_weights (default: under /tmp)")
    p.add_argument("--name", default=None, help="config name in the result file (default: model dir name)")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="cProfile load_weights and save_weights of the first round into "
                        "DIR/{load,save}_profile_rank{r}.txt")
    args = p.parse_args(argv)

    from mcore_bridge import Bridge, ParallelLayout
    from mcore_bridge.bridge import DTYPES

    layout = ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, sp=args.tp > 1 and args.ep > 1)
    bridge = Bridge(args.model, layout)
    device = bridge.setup(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[args.dtype]
    files = sorted({info.file for info in bridge.hf.tensors.values()})

    if args.save_dir is None:
        box = [f"/tmp/mcore_bridge_bench_{socket.gethostname()}_{os.getpid()}" if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        args.save_dir = box[0]
    if rank == 0:
        Path(args.save_dir).mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()

    if not args.cold:  # warm-up: every rank reads its bytes once, untimed
        models = bridge.build_model(dtype=dtype)
        Floor(ReadPlan(bridge, models), "cpu").read()
        del models
    rounds = []
    for i in range(args.rounds):
        rounds.append(one_round(args, bridge, device, dtype, files, rank,
                                profile_dir=args.profile if i == 0 else None))
    summary = summarize(rounds, device)
    summary["rank"] = rank
    gathered = [None] * world
    dist.all_gather_object(gathered, dict(summary=summary, rounds=rounds))

    if rank == 0:
        shutil.rmtree(args.save_dir, ignore_errors=True)
        name = args.name or Path(args.model).resolve().name
        dp = world // layout.model_parallel_size
        lay = layout.short() + (f"-dp{dp}" if dp > 1 else "")
        summaries = [g["summary"] for g in gathered]
        print(f"\n{name}  layout={lay}  world={world}  device={device}  dtype={args.dtype}  rounds={args.rounds}"
              f"  {'cold' if args.cold else 'warm'} page cache  loadavg {load_before[0]:.2f}->{os.getloadavg()[0]:.2f}")
        print_table(summaries, device)
        worst = max(s["ratio"] for s in summaries)
        extra = "_fresh" if device == "cpu" else "_h2d"
        worst_extra = max(s[f"ratio{extra}"] for s in summaries)
        print(f"bridge/floor (max over ranks, best round): {worst:.2f}; bridge/floor{extra}: {worst_extra:.2f}"
              f"  (target < 1.25)")
        print(f"peak RSS / (RSS before + host share + largest slice) (max over ranks): "
              f"{max(s['peak_over_budget'] for s in summaries):.2f}; anonymous memory only: "
              f"{max(s['anon_over_budget'] for s in summaries):.2f}  (target <= 1.0)")
        total_save = [s.get("save_s") for s in summaries if s.get("save_s") is not None]
        if total_save:
            print(f"save (slowest rank): {max(total_save):.2f} s")
        record = dict(
            name=name, layout=layout.to_dict(), layout_id=lay, world_size=world, device=device, dtype=args.dtype,
            cache="cold" if args.cold else "warm", rounds=args.rounds,
            date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), host=socket.gethostname(),
            cpus=os.cpu_count(), loadavg_before=load_before, loadavg_after=os.getloadavg(),
            python=platform.python_version(), torch=torch.__version__, commit=git_commit(),
            gpu=torch.cuda.get_device_name() if device == "cuda" else None,
            summary=dict(max_ratio=worst, **{f"max_ratio{extra}": worst_extra},
                         max_peak_over_budget=max(s["peak_over_budget"] for s in summaries),
                         max_anon_over_budget=max(s["anon_over_budget"] for s in summaries),
                         slowest_save_s=max(total_save) if total_save else None),
            ranks=[dict(g["summary"], rounds=g["rounds"]) for g in gathered],
        )
        out = Path(args.results)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"load_{name}_{lay}_{device}{'_cold' if args.cold else ''}.json"
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {path}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
