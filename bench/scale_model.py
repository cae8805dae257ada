"""Conversion at scale, on paper (issue 21 item 4): predicted wall time and peak memory per rank of
an HF <-> Megatron conversion of DeepSeek-V3 (671B) and Qwen3-235B-A22B on 8-256 GPUs.

    python bench/scale_model.py                       # the markdown table (bench/results/scale_model.md)
    python bench/scale_model.py --check               # predict a local CPU export, run it, print the ratio

What each rank holds, reads and writes comes from the layout plan of ``mcore_bridge.sizing`` (the model
built by megatron-core on the meta device, each parameter placed on its pipeline stage and expert rank,
split by TP where its transform splits it) plus, per rank, the HF bytes it reads (FP8 sources at one
byte per quantised weight) and the tensors it gathers. The conversion's own rules decide who writes:
an HF export writes each tensor once (the first data-parallel replica; expert ranks their own experts;
TP ranks take turns), megatron's torch_dist save is taken to write each shard once as well. The time of
a phase is the slowest node's bytes over that node's rate (ranks fill nodes in megatron's order, TP
fastest, then EP, then PP), plus one message cost per gathered tensor, plus the run's fixed cost.

Rates are inputs (``--read-gbps`` ...), per node, with defaults measured on one H200 host
(bench/README.md "Conversion through torch_dist", results/convert_qwen3-30b-a3b-l4_tp1-pp1-ep4_cuda.json,
4 GPUs, page cache warm; whole checkpoint / phase time):

    read HF safetensors into the model   4.6 GB/s  (load_hf 1.34 s for 6.23 GB)
    write torch_dist (megatron's writer) 0.41 GB/s (save_dist 15.1 s)
    read torch_dist                      1.6 GB/s  (load_dist 3.87 s)
    write HF safetensors                 1.8 GB/s  (save_hf 3.47 s)
    per gathered tensor                  36 us     (NCCL, fitted to the export_weights bucket sweep:
                                                    32 MB buckets 57 ms, 1024 MB 39 ms, 16.4 GB per rank)
    fixed cost per run                   10.9 s    (cold imports of megatron.core + transformers, issue 21)

Peak memory per rank (measured shape, same README): loading rises to the rank's share plus the tensor
being copied; writing HF rises by the gather buffers of a bucket (256 MB x tp) plus the output shard
being filled (2 GB). Activations are not involved. Storage slower than the page cache (a cold parallel
file system) lowers the read rates: pass the measured ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PUBLISHED = ROOT / "tests" / "published"
GB = 1e9
BUCKET_BYTES = 256 << 20  # mcore_bridge.bridge.DEFAULT_BUCKET_BYTES
SHARD_BYTES = 2 << 30  # mcore_bridge.bridge.DEFAULT_SHARD_BYTES
FP8_BLOCK = 128 * 128  # one fp32 scale per 128 x 128 block

# (model file, {world size: layout}) -- tp 1 (MLA / 4 KV heads), experts over EP, layers over PP
MODELS = {
    "deepseek-ai__DeepSeek-V3.json": {
        8: dict(ep=8), 16: dict(pp=2, ep=8, first_stage_layers=31), 32: dict(pp=4, ep=8, first_stage_layers=13),
        64: dict(pp=8, ep=8, first_stage_layers=5), 128: dict(pp=16, ep=8, first_stage_layers=1),
        256: dict(pp=16, ep=16, first_stage_layers=1)},
    "Qwen__Qwen3-235B-A22B.json": {
        8: dict(ep=8), 16: dict(pp=2, ep=8), 32: dict(pp=2, ep=16), 64: dict(pp=2, ep=32),
        128: dict(pp=4, ep=32, first_stage_layers=4), 256: dict(pp=4, ep=64, first_stage_layers=4)},
}


@dataclasses.dataclass(frozen=True)
class Rates:
    read_gbps: float = 4.6  # HF safetensors -> model, per node
    write_dist_gbps: float = 0.41  # torch_dist save, per node
    read_dist_gbps: float = 1.6  # torch_dist load, per node
    write_hf_gbps: float = 1.8  # model -> HF safetensors, per node
    msg_s: float = 36e-6  # per gathered tensor
    fixed_s: float = 10.9  # per run
    gpus_per_node: int = 8
    device_gb: float = 141.0  # H200


@dataclasses.dataclass
class RankLoad:
    """One rank's share (the same on every TP rank of its (stage, ep rank) except who writes)."""

    stage: int
    ep_rank: int
    held_bytes: float  # bf16 parameters it holds (sizing.plan)
    read_bytes: float  # HF bytes it reads (its slices, in the source's dtype)
    write_bytes: float  # bytes it writes (one writer per tensor)
    gathers: int  # tensors gathered across its TP / expert-TP group on export
    largest_bytes: float  # its largest parameter slice (bf16)


def loads(family, layout, sizes: dict, fp8: bool) -> list[RankLoad]:
    """Per (stage, ep rank): the plan's held bytes and, from the same inventory, the bytes read and
    written and the tensors gathered. Dense tensors are written by EP rank 0 (the first data-parallel
    replica), experts by their EP rank; within a TP group the writes take turns (1/tp each)."""
    from mcore_bridge.plan import inventory
    from mcore_bridge.sizing import plan

    p = plan(family, layout, sizes)
    extra = {(r.stage, r.ep_rank): dict(read=0.0, dense_w=0.0, exp_w=0.0, gathers=0, largest=0.0)
             for r in p.ranks}
    for u in inventory(family, layout):
        n = sizes[u.hf_names]
        split = 1 if u.rule.transform.parallel_mode == "replicated" else (layout.etp if u.rule.expert else layout.tp)
        quantised = fp8 and all(h.endswith(("_proj.weight", "_proj_with_mqa.weight")) for h in u.hf_names)
        src = n * (1 + 4 / FP8_BLOCK) if quantised else 2 * n
        eps = [u.ep_rank] if u.ep_rank is not None else range(layout.ep)
        for e in eps:
            x = extra[(u.stage, e)]
            x["read"] += src / split
            x["gathers"] += split > 1
            x["largest"] = max(x["largest"], 2 * n / split)
            if u.ep_rank is not None:
                x["exp_w"] += 2 * n * u.rule.export / split
            elif e == 0:
                x["dense_w"] += 2 * n * u.rule.export / split
    return [RankLoad(r.stage, r.ep_rank, 2 * r.params, extra[(r.stage, r.ep_rank)]["read"],
                     extra[(r.stage, r.ep_rank)]["dense_w"] + extra[(r.stage, r.ep_rank)]["exp_w"],
                     extra[(r.stage, r.ep_rank)]["gathers"], extra[(r.stage, r.ep_rank)]["largest"])
            for r in p.ranks]


def world_ranks(layout, per: list[RankLoad]) -> list[RankLoad]:
    """Every rank of the layout's smallest world in megatron's order (TP fastest, then EP / DP,
    then PP); DP replicas beyond EP are the same load."""
    by = {(r.stage, r.ep_rank): r for r in per}
    world = layout.min_world_size
    dp = world // (layout.tp * layout.pp)
    out = []
    for stage in range(layout.pp):
        for d in range(dp):
            out += [by[(stage, d % layout.ep)]] * layout.tp
    return out


def predict(ranks: list[RankLoad], rates: Rates, tp: int = 1) -> dict:
    """Seconds of each phase (slowest node) and peak bytes per rank, for ranks in placement order."""
    g = rates.gpus_per_node
    nodes = [ranks[i:i + g] for i in range(0, len(ranks), g)]

    def slowest(field: str, gbps: float) -> float:
        return max(sum(getattr(r, field) for r in node) for node in nodes) / (gbps * GB)

    msgs = max(r.gathers for r in ranks) * rates.msg_s
    read_hf, write_dist = slowest("read_bytes", rates.read_gbps), slowest("write_bytes", rates.write_dist_gbps)
    read_dist, write_hf = slowest("held_bytes", rates.read_dist_gbps), slowest("write_bytes", rates.write_hf_gbps)
    return dict(
        nodes=len(nodes),
        read_hf_s=read_hf, write_dist_s=write_dist, read_dist_s=read_dist, write_hf_s=write_hf + msgs,
        to_mcore_s=rates.fixed_s + read_hf + write_dist,
        to_hf_s=rates.fixed_s + read_dist + write_hf + msgs,
        peak_import_gb=max(r.held_bytes + r.largest_bytes for r in ranks) / GB,
        peak_export_gb=max(r.held_bytes + BUCKET_BYTES * tp + SHARD_BYTES for r in ranks) / GB,
        max_read_gb=max(r.read_bytes for r in ranks) / GB, max_write_gb=max(r.write_bytes for r in ranks) / GB,
    )


def model_sizes(raw: dict):
    """The family and megatron's own parameter sizes (meta device, tp = pp = ep = 1)."""
    from mcore_bridge.families import family_for
    from mcore_bridge.layout import ParallelLayout
    from mcore_bridge.runtime import compat
    from mcore_bridge.runtime import dist as rt
    from mcore_bridge.sizing import parameter_sizes

    family = family_for(raw)
    with compat.scope("cpu"):
        rt.setup(ParallelLayout(), "cpu")
        return family, parameter_sizes(family)


def is_fp8(raw: dict) -> bool:
    return (raw.get("quantization_config") or {}).get("quant_method") == "fp8"


def table(rates: Rates, models: dict = MODELS) -> tuple[str, list[dict]]:
    from mcore_bridge.layout import ParallelLayout

    rows, lines = [], [
        "| model | GPUs | layout | largest rank holds GB (bf16) | reads GB (max rank) | writes GB (max rank) "
        "| HF -> torch_dist s "
        "| torch_dist -> HF s | peak GB import / export | fits "
        f"{rates.device_gb:.0f} GB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, layouts in models.items():
        raw = json.loads((PUBLISHED / name).read_text())
        family, sizes = model_sizes(raw)
        for world, lay in layouts.items():
            layout = ParallelLayout(**lay)
            assert layout.min_world_size == world, (name, lay, layout.min_world_size)
            per = loads(family, layout, sizes, is_fp8(raw))
            pr = predict(world_ranks(layout, per), rates, layout.tp)
            held = max(r.held_bytes for r in per) / GB
            fits = "yes" if max(pr["peak_import_gb"], pr["peak_export_gb"]) <= rates.device_gb else "no"
            short = layout.short()
            rows.append(dict(model=name, gpus=world, layout=short, held_gb=held, **pr))
            lines.append(f"| {Path(name).stem.replace('__', '/')} | {world} | {short} | {held:.1f} | "
                         f"{pr['max_read_gb']:.1f} | {pr['max_write_gb']:.1f} | {pr['to_mcore_s']:.0f} | "
                         f"{pr['to_hf_s']:.0f} | {pr['peak_import_gb']:.1f} / {pr['peak_export_gb']:.1f} | {fits} |")
    return "\n".join(lines), rows


# ---- check: predict a local run, make it, compare -------------------------------------------------

def _floor(paths: list[Path], scratch: Path) -> tuple[float, float]:
    """Local read and write rates (GB/s) over the checkpoint's own bytes: read every file (the second
    pass, page cache warm as in the measured defaults), write the same bytes to one scratch file."""
    total = sum(p.stat().st_size for p in paths)
    os.sync()  # no dirty pages of earlier writes (the checkpoint just made) throttle the timed write
    buf = memoryview(bytearray(os.urandom(1 << 20) * 64))  # one touched 64 MB buffer: no page faults timed
    for attempt in range(2):
        t = time.perf_counter()
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
        read_s = time.perf_counter() - t
    t = time.perf_counter()
    with open(scratch, "wb", buffering=0) as f:
        left = total
        while left > 0:
            left -= f.write(buf[:min(left, len(buf))])
    write_s = time.perf_counter() - t
    scratch.unlink()
    os.sync()
    return total / read_s / GB, total / write_s / GB


def _export(model: str, out: Path, layout: dict) -> float:
    cmd = [sys.executable, "-m", "mcore_bridge.cli", "export", "--model", model, "--to-mcore", "--save", str(out),
           "--ckpt-format", "plain", *[a for k, v in layout.items() for a in (f"--{k}", str(v))]]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    os.sync()
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall


def check(args) -> dict:
    """HF -> plain megatron export of a reduced checkpoint on this machine: the model's prediction,
    with this machine's rates measured in the same run (read / write floor over the same bytes; the
    fixed cost from the same export of a tiny built-in model), against the measured wall time."""
    import shutil
    import tempfile

    from mcore_bridge.layout import ParallelLayout

    work = Path(tempfile.mkdtemp(prefix="scale-check-"))
    try:
        model = Path(args.model) if args.model else work / "hf"
        if not args.model:
            subprocess.run([sys.executable, str(HERE / "make_checkpoint.py"), "--config", "qwen3-30b-a3b",
                            "--layers", str(args.layers), "--out", str(model)], check=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True)
        lay = dict(ep=args.ep) if args.ep > 1 else {}
        read_gbps, write_gbps = _floor(sorted(model.glob("*.safetensors")), work / "floor.bin")
        fixed = _export("builtin:qwen3_moe", work / "tiny", lay)
        measured = _export(str(model), work / "out", lay)
        raw = json.loads((model / "config.json").read_text())
        family, sizes = model_sizes(raw)
        layout = ParallelLayout(**lay)
        rates = Rates(read_gbps=read_gbps, write_dist_gbps=write_gbps, fixed_s=fixed, msg_s=0.0,
                      gpus_per_node=layout.min_world_size)
        pr = predict(world_ranks(layout, loads(family, layout, sizes, is_fp8(raw))), rates, layout.tp)
        out = dict(layout=layout.short(), checkpoint_gb=sum(p.stat().st_size for p in model.glob("*.safetensors")) / GB,
                   read_gbps=read_gbps, write_gbps=write_gbps, fixed_s=fixed, predicted_s=pr["to_mcore_s"],
                   measured_s=measured, ratio=measured / pr["to_mcore_s"])
        print(f"check ({out['layout']}, {out['checkpoint_gb']:.2f} GB, floor read {read_gbps:.2f} GB/s, write "
              f"{write_gbps:.2f} GB/s, fixed {fixed:.1f} s): predicted {pr['to_mcore_s']:.1f} s, measured "
              f"{measured:.1f} s, measured / predicted = {out['ratio']:.2f}")
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Rates):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    ap.add_argument("--out", default=str(HERE / "results" / "scale_model.md"), help="markdown table ('-': stdout only)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--check", action="store_true", help="predict and run a local CPU export, print the ratio")
    ap.add_argument("--model", help="--check: an HF directory (default: Qwen3-30B-A3B shapes, --layers layers)")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1, help="--check: expert-parallel processes")
    args = ap.parse_args(argv)
    if args.check:
        print(json.dumps(check(args)))
        return
    rates = Rates(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Rates)})
    md, rows = table(rates)
    print(md)
    if args.json:
        print("ROWS " + json.dumps(rows))
    if args.out != "-":
        head = (f"Predicted by `python bench/scale_model.py` (rates per node: read HF {rates.read_gbps} GB/s, "
                f"write torch_dist {rates.write_dist_gbps}, read torch_dist {rates.read_dist_gbps}, write HF "
                f"{rates.write_hf_gbps}; {rates.msg_s * 1e6:.0f} us per gathered tensor; fixed {rates.fixed_s} s; "
                f"{rates.gpus_per_node} GPUs per node). Not measured: a model of the measured rates.\n\n")
        Path(args.out).write_text(head + md + "\n")


if __name__ == "__main__":
    main()
