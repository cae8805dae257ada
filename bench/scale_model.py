"""Conversion at scale, on paper (issue 21 item 4): predicted wall time and peak memory per rank of
an HF <-> Megatron conversion of DeepSeek-V3 (671B) and Qwen3-235B-A22B on 8-256 GPUs.

    python bench/scale_model.py                       # the markdown table (bench/results/scale_model.md)
    python bench/scale_model.py --check --work DIR    # predict a local CPU export, run it, print the ratio
    python bench/scale_model.py --io-floor R.json ... # the model against bench/io_floor.py results

What each rank holds, reads and writes comes from the layout plan of ``mcore_bridge.sizing`` (the model
built by megatron-core on the meta device, each parameter placed on its pipeline stage and expert rank,
split by TP where its transform splits it). The conversion's own rules decide who writes and how:
each tensor is written once (the first data-parallel replica; expert ranks their own experts; TP ranks
take turns). HF -> Megatron writes a parameter that is whole rows of the source in its dtype straight
from the source files (``splice``: read by no rank); a quantised (FP8) source or a row-parallel split is
loaded (read at ``read_gbps``, FP8 at one byte per weight plus its scales) and written from memory.
Megatron -> HF of a bf16 checkpoint moves every byte from the checkpoint's files (``unsplice``). A
conversion takes the slowest node's bytes over that node's rates (ranks fill nodes in megatron's
order, TP fastest, then EP, then PP), plus the run's fixed cost.

Rates are inputs, per node, with defaults measured on one H200 host with a full-depth Qwen3-8B (16.4 GB,
``reports/gpu-h200/io21-session35``, session 35):

    copy file to file     1.37 GB/s  (``cp -r`` + sync of the checkpoint: the copy floor, median 11.95 s)
    read what is loaded   4.6 GB/s   (HF safetensors into the model: load_hf 1.34 s for 6.23 GB in
                                      results/convert_qwen3-30b-a3b-l4_tp1-pp1-ep4_cuda.json, page cache warm)
    write it              1.37 GB/s  (assumed the copy rate: the direct writers write from memory in large
                                      sequential writes; not measured apart on that host)
    fixed cost per run    6.1 s      (the CLI export of a 1-layer model there: 8.2 / 4.1 s, bytecode cached)

``--io-floor`` checks the model against measured runs: there a bf16 checkpoint is copied whole, so each
conversion is predicted as its run's fixed cost plus its copy floor. Not modelled: FP8 re-quantisation on
export (``--export-dtype fp8``), LoRA merges and stacked-expert HF layouts (all loaded), and storage other
than one local disk per node (pass its measured rates). Peak memory per rank: loading holds the rank's
share plus the tensor being copied; writing HF adds the gather buffers of a bucket (256 MB x tp) and the
output shard being filled (2 GB): an upper bound now that copied bytes never enter memory.
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
    copy_gbps: float = 1.37  # bytes moved file to file (splice / unsplice), per node: its `cp -r` + sync
    read_gbps: float = 4.6  # HF safetensors -> model (what is loaded: FP8 sources), per node
    write_gbps: float = 1.37  # model memory -> files (what was loaded), per node; assumed the copy rate
    fixed_s: float = 6.1  # per run
    gpus_per_node: int = 8
    device_gb: float = 141.0  # H200


@dataclasses.dataclass
class RankLoad:
    """One rank's share (the same on every TP rank of its (stage, ep rank) except who writes)."""

    stage: int
    ep_rank: int
    held_bytes: float  # bf16 parameters it holds (sizing.plan)
    read_bytes: float  # HF bytes it reads into memory (loaded units only, in the source's dtype)
    write_bytes: float  # bytes it writes (one writer per tensor)
    copy_bytes: float  # of write_bytes: written from the source files' bytes, never loaded (HF -> Megatron)
    largest_bytes: float  # its largest parameter slice (bf16)


def loads(family, layout, sizes: dict, fp8: bool) -> list[RankLoad]:
    """Per (stage, ep rank): the plan's held bytes and, from the same inventory, the bytes read,
    written and copied. Dense tensors are written by EP rank 0 (the first
    data-parallel replica), experts by their EP rank; within a TP group the writes take turns (1/tp
    each). A unit is copied file to file (``splice``) unless its source is quantised (dequantised on
    load) or it is split across TP by rows (row-parallel: loaded); a copied unit is read by no rank."""
    from mcore_bridge.plan import inventory
    from mcore_bridge.sizing import plan

    p = plan(family, layout, sizes)
    extra = {(r.stage, r.ep_rank): dict(read=0.0, write=0.0, copy=0.0, largest=0.0) for r in p.ranks}
    for u in inventory(family, layout):
        n = sizes[u.hf_names]
        mode = u.rule.transform.parallel_mode
        split = 1 if mode == "replicated" else (layout.etp if u.rule.expert else layout.tp)
        quantised = fp8 and all(h.endswith(("_proj.weight", "_proj_with_mqa.weight")) for h in u.hf_names)
        copied = not quantised and (split == 1 or mode == "column")
        src = n * (1 + 4 / FP8_BLOCK) if quantised else 2 * n
        eps = [u.ep_rank] if u.ep_rank is not None else range(layout.ep)
        for e in eps:
            x = extra[(u.stage, e)]
            x["read"] += 0.0 if copied else src / split
            x["largest"] = max(x["largest"], 2 * n / split)
            if u.ep_rank is not None or e == 0:
                w = 2 * n * u.rule.export / split
                x["write"] += w
                x["copy"] += w if copied else 0.0
    return [RankLoad(r.stage, r.ep_rank, 2 * r.params, x["read"], x["write"], x["copy"], x["largest"])
            for r in p.ranks for x in [extra[(r.stage, r.ep_rank)]]]


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
    """Seconds (the slowest node) and peak bytes per rank, for ranks in placement order.
    HF -> torch_dist: the node's copied bytes at the copy rate, plus what it loads (read at
    ``read_gbps``, written at ``write_gbps``). torch_dist -> HF (bf16, as stored): every byte a node
    writes is moved from the checkpoint's files (``unsplice``; row-parallel shards are read from the
    files by the writing rank), at the copy rate."""
    g = rates.gpus_per_node
    nodes = [ranks[i:i + g] for i in range(0, len(ranks), g)]

    def node_s(node, *terms) -> float:
        return sum(sum(f(r) for r in node) / (gbps * GB) for f, gbps in terms)

    import_terms = ((lambda r: r.copy_bytes, rates.copy_gbps), (lambda r: r.read_bytes, rates.read_gbps),
                    (lambda r: r.write_bytes - r.copy_bytes, rates.write_gbps))
    to_mcore = max(node_s(node, *import_terms) for node in nodes)
    to_hf = max(node_s(node, (lambda r: r.write_bytes, rates.copy_gbps)) for node in nodes)
    return dict(
        nodes=len(nodes),
        copy_s=max(node_s(node, import_terms[0]) for node in nodes),
        to_mcore_s=rates.fixed_s + to_mcore,
        to_hf_s=rates.fixed_s + to_hf,
        peak_import_gb=max(r.held_bytes + r.largest_bytes for r in ranks) / GB,
        peak_export_gb=max(r.held_bytes + BUCKET_BYTES * tp + SHARD_BYTES for r in ranks) / GB,
        max_read_gb=max(r.read_bytes for r in ranks) / GB, max_write_gb=max(r.write_bytes for r in ranks) / GB,
        copied=sum(r.copy_bytes for r in ranks) / max(1.0, sum(r.write_bytes for r in ranks)),
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
        "| model | GPUs | layout | largest rank holds GB (bf16) | loads GB (max rank) | writes GB (max rank) "
        "| HF -> torch_dist: copied | HF -> torch_dist s "
        "| torch_dist -> HF s | peak GB import / export | fits "
        f"{rates.device_gb:.0f} GB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
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
                         f"{pr['max_read_gb']:.1f} | {pr['max_write_gb']:.1f} | {pr['copied']:.0%} | {pr['to_mcore_s']:.0f} | "
                         f"{pr['to_hf_s']:.0f} | {pr['peak_import_gb']:.1f} / {pr['peak_export_gb']:.1f} | {fits} |")
    return "\n".join(lines), rows


# ---- check: predict a local run, make it, compare -------------------------------------------------

def _timed(cmd: list, env=None) -> float:
    """Wall seconds of ``cmd`` and the ``sync`` after it (its write-back is part of its cost)."""
    os.sync()
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    os.sync()
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-3000:]}")
    return wall


def _export(model: str, out: Path, layout: dict) -> float:
    return _timed([sys.executable, "-m", "mcore_bridge.cli", "export", "--model", model, "--to-mcore", "--save",
                   str(out), "--ckpt-format", "plain", *[a for k, v in layout.items() for a in (f"--{k}", str(v))]],
                  dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))


def check(args) -> dict:
    """HF -> plain megatron export of a reduced checkpoint on this machine: the model's prediction,
    with this machine's rates measured in the same run (the copy rate: ``cp -r`` of the checkpoint
    + sync; the fixed cost: the same export of a tiny built-in model), against the measured wall time."""
    import shutil
    import tempfile

    from mcore_bridge.layout import ParallelLayout

    work = Path(tempfile.mkdtemp(prefix="scale-check-", dir=args.work))
    try:
        model = Path(args.model) if args.model else work / "hf"
        if not args.model:
            subprocess.run([sys.executable, str(HERE / "make_checkpoint.py"), "--config", "qwen3-30b-a3b",
                            "--layers", str(args.layers), "--out", str(model)], check=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True)
        lay = dict(ep=args.ep) if args.ep > 1 else {}
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        copy_gbps = size / _timed(["cp", "-r", str(model), str(work / "copy")]) / GB
        shutil.rmtree(work / "copy")
        fixed = _export("builtin:qwen3_moe", work / "tiny", lay)
        measured = _export(str(model), work / "out", lay)
        raw = json.loads((model / "config.json").read_text())
        family, sizes = model_sizes(raw)
        layout = ParallelLayout(**lay)
        rates = Rates(copy_gbps=copy_gbps, read_gbps=copy_gbps, write_gbps=copy_gbps, fixed_s=fixed,
                      gpus_per_node=layout.min_world_size)
        pr = predict(world_ranks(layout, loads(family, layout, sizes, is_fp8(raw))), rates, layout.tp)
        out = dict(layout=layout.short(), checkpoint_gb=size / GB, copy_gbps=copy_gbps, fixed_s=fixed,
                   copied=pr["copied"], predicted_s=pr["to_mcore_s"], measured_s=measured,
                   ratio=measured / pr["to_mcore_s"])
        print(f"check ({out['layout']}, {size / GB:.2f} GB, copy {copy_gbps:.2f} GB/s, fixed {fixed:.1f} s, "
              f"{pr['copied']:.0%} copied): predicted {pr['to_mcore_s']:.1f} s, measured {measured:.1f} s, "
              f"measured / predicted = {out['ratio']:.2f}")
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_io_floor(paths: list[str]) -> str:
    """The model against ``bench/io_floor.py`` results (``--results``' JSON: one machine, its copy floor,
    fixed cost and conversions, medians of one run). A bf16 checkpoint converted on one node is copied
    whole, so the model predicts each conversion as its run's fixed cost plus the copy floor."""
    import statistics

    lines = ["| results | checkpoint GB | step | measured s | predicted s (fixed + copy) | measured / predicted |",
             "|---|---|---|---|---|---|"]
    for path in paths:
        res = json.loads(Path(path).read_text())
        med = {k: statistics.median(v) for k, v in res["times"].items()}
        floor = med["copy floor"]
        for key, t in med.items():
            if key == "copy floor" or key.startswith("fixed") or key.endswith("baseline"):
                continue
            n = key.rsplit("(", 1)[-1].split()[0]
            predicted = med[f"fixed ({n} proc)"] + floor
            lines.append(f"| {res.get('label') or Path(path).name} | {res['bytes'] / GB:.2f} | {key} | {t:.2f} | "
                         f"{predicted:.2f} | {t / predicted:.2f} |")
    return "\n".join(lines)


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
    ap.add_argument("--work", default=None, help="--check: scratch directory (on the disk to measure)")
    ap.add_argument("--io-floor", nargs="+", metavar="JSON",
                    help="compare the model with bench/io_floor.py results (its --results JSON files) and stop")
    args = ap.parse_args(argv)
    if args.io_floor:
        print(check_io_floor(args.io_floor))
        return
    if args.check:
        print(json.dumps(check(args)))
        return
    rates = Rates(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Rates)})
    md, rows = table(rates)
    print(md)
    if args.json:
        print("ROWS " + json.dumps(rows))
    if args.out != "-":
        head = (f"Predicted by `python bench/scale_model.py` (rates per node: copy file to file {rates.copy_gbps} "
                f"GB/s, read what is loaded {rates.read_gbps}, write it {rates.write_gbps}; fixed {rates.fixed_s} s; "
                f"{rates.gpus_per_node} GPUs per node). Not measured: a model of the measured rates.\n\n")
        Path(args.out).write_text(head + md + "\n")


if __name__ == "__main__":
    main()
