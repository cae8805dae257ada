"""Every CLI conversion against the copy floor, measured in the same run (issue 21 item 1).

    python bench/io_floor.py --layers 4 --reps 3                # CPU, 1 and 2 processes
    python bench/io_floor.py --layers 4 --reps 3 --device cuda  # the GPU host

Makes a Qwen3-8B-shaped HF checkpoint (``make_checkpoint.py --layers N``, reused when present), then,
per repetition, in this order: the **copy floor** (``cp -r`` of the checkpoint directory + ``sync``:
read and write the same bytes on the same disk, into a new directory), the **fixed cost** of a run (the same CLI export of
a 1-layer tiny model, ``builtin:qwen3``: launch, imports, process groups) and each conversion through
the CLI, each into a new directory (the last output is deleted and synced before the clock starts, as
the floor's copy is) and followed by ``sync`` inside its timing (the floor pays its write-back, so do they):

* ``hf->torch_dist``  ``export --model SRC --to-mcore --save D``
* ``hf->plain``       ``export --model SRC --to-mcore --ckpt-format plain --save P``
* ``torch_dist->hf``  ``export --model SRC --load D --to-hf --save H`` (``H`` byte-compared with ``SRC`` once)

at 1 process (TP1) and 2 processes (TP2). Printed and written (``--results``): the median wall time
of each step, its ratio to the median copy floor, and the same after subtracting the fixed cost.
The machine may be shared: compare ratios of one run, not seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sh(cmd, env=None, check=True, cwd=None) -> float:
    """Run ``cmd`` (in ``cwd``) then ``sync``; wall seconds of both."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
    os.sync()
    dt = time.perf_counter() - t0
    if check and proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-6000:]}")
    return dt


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def same_tensors(a: Path, b: Path) -> int:
    """Number of tensors compared; raises if any differs (names, dtype, shape or bytes)."""
    from safetensors import safe_open

    def table(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    out[k] = f
        return out

    ta, tb = table(a), table(b)
    if set(ta) != set(tb):
        raise SystemExit(f"tensor names differ: {sorted(set(ta) ^ set(tb))[:8]}")
    for k in sorted(ta):
        with safe_open(str(ta[k]), "pt") as fa, safe_open(str(tb[k]), "pt") as fb:
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            if x.dtype != y.dtype or x.shape != y.shape or not x.view(-1).view(dtype=__import__("torch").uint8).equal(
                    y.view(-1).view(dtype=__import__("torch").uint8)):
                raise SystemExit(f"{k}: not byte-exact after the round trip")
    return len(ta)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/io_floor", help="scratch directory (same disk for everything)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--source", default=None, help="an existing HF checkpoint to use instead of making one")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--procs", default="1,2", help="process counts (TP = processes)")
    p.add_argument("--steps", default="hf->torch_dist,hf->plain,torch_dist->hf")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "io_floor.md"))
    p.add_argument("--label", default="", help="a line for the results file (e.g. the commit measured)")
    p.add_argument("--lean", action="store_true",
                   help="delete each output once no later step reads it (at most the source, one torch_dist "
                        "output and one other on the disk: a full-depth Qwen3-8B, 16 GB, in 64 GB)")
    p.add_argument("--baseline", default=None, metavar="CHECKOUT",
                   help="another checkout of mcore-bridge (e.g. a git worktree at the commit before): every "
                        "step also runs with its code, interleaved with this one's, rows marked 'baseline'")
    args = p.parse_args(argv)

    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    def env_for(root):
        return dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                    MCORE_BRIDGE_QUIET="1", PYTHONWARNINGS="ignore")

    env = env_for(ROOT)
    # the baseline first in even repetitions, so that what is byte-compared after the first (and read by
    # its torch_dist->hf) is this checkout's output
    # each side runs in its own checkout: ``python -m`` puts the working directory first on sys.path,
    # ahead of PYTHONPATH (run from this checkout, a baseline would import this checkout's code)
    codes = ([(" baseline", Path(args.baseline).resolve())] if args.baseline else []) + [("", ROOT)]
    for _, root in codes:  # each side must import its own code
        where = subprocess.run([sys.executable, "-c", "import mcore_bridge; print(mcore_bridge.__file__)"],
                               env=env_for(root), cwd=root, capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(root) + os.sep):
            raise SystemExit(f"{root}: python imports mcore_bridge from {where or '(nowhere)'}, not from it")
    src = Path(args.source).absolute() if args.source else work / f"qwen3-8b-l{args.layers}"
    if not (src / "config.json").exists():
        sh([sys.executable, str(ROOT / "bench" / "make_checkpoint.py"), "--out", str(src), "--layers",
            str(args.layers), "--overwrite", "--device", args.device], env)
    size = dir_bytes(src)
    cli = [sys.executable, "-m", "mcore_bridge.cli", "export"]
    procs = [int(n) for n in args.procs.split(",")]
    steps = args.steps.split(",")

    def conv(step, n, tag):
        rt = ["--nproc-per-node", str(n), "--tp", str(n), "--device", args.device, "--overwrite"]
        d, pl, h = work / f"dist{n}", work / f"plain{n}", work / f"hf{n}"
        if step == "hf->torch_dist":
            return cli + ["--model", str(src), "--to-mcore", "--save", str(d)] + rt
        if step == "hf->plain":
            return cli + ["--model", str(src), "--to-mcore", "--ckpt-format", "plain", "--save", str(pl)] + rt
        if step == "torch_dist->hf":
            return cli + ["--model", str(src), "--load", str(d), "--to-hf", "--save", str(h)] + rt
        if step == "fixed":
            return cli + ["--model", "builtin:qwen3", "--to-mcore", "--save", str(work / f"tiny{n}")] + rt
        raise SystemExit(f"unknown step {step!r}")

    times: dict[str, list[float]] = {}
    for rep in range(args.reps):
        copy = work / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        os.sync()
        times.setdefault("copy floor", []).append(sh(["cp", "-r", str(src), str(copy)]))
        shutil.rmtree(copy)
        print(f"rep {rep}: copy floor {times['copy floor'][-1]:.2f} s (measured first in each repetition)", flush=True)
        for n in procs:
            for step in ["fixed"] + steps:
                if step == "torch_dist->hf" and "hf->torch_dist" not in steps and not (work / f"dist{n}").exists():
                    continue
                # A/B: the order alternates per repetition (whichever runs second finds the source in the page cache)
                for mark, code_root in (codes if rep % 2 == 0 else codes[::-1]):
                    key = f"{step} ({n} proc){mark}"
                    # the output goes into a fresh directory, as the floor's copy does: deleting the last
                    # one's 4 GB (2 s here) is not the conversion's cost
                    out = Path(conv(step, n, rep)[conv(step, n, rep).index("--save") + 1])
                    shutil.rmtree(out, ignore_errors=True)
                    os.sync()
                    times.setdefault(key, []).append(sh(conv(step, n, rep), env_for(code_root), cwd=code_root))
                    print(f"rep {rep}: {key:<35} {times[key][-1]:7.2f} s", flush=True)
                if rep == 0 and step == "torch_dist->hf":
                    print(f"  byte-exact round trip ({n} proc): {same_tensors(src, work / f'hf{n}')} tensors",
                          flush=True)
                if args.lean and step in ("hf->plain", "torch_dist->hf", "fixed"):
                    shutil.rmtree(Path(conv(step, n, rep)[conv(step, n, rep).index("--save") + 1]), ignore_errors=True)
            if args.lean:
                shutil.rmtree(work / f"dist{n}", ignore_errors=True)
        partial = Path(args.results).with_suffix(".partial.json")  # what a run cut short still leaves
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"source": str(src), "bytes": size, "times": times, "reps_done": rep + 1,
                                       "label": args.label}, indent=1))

    floor = statistics.median(times["copy floor"])
    load = os.getloadavg()
    rows = ["| step | median s | runs s | / copy floor | (median - fixed) / copy floor |", "|---|---|---|---|---|"]
    for key, ts in times.items():
        med = statistics.median(ts)
        n = key.rsplit("(", 1)[-1].split()[0] if "(" in key else None
        mark = " baseline" if key.endswith(" baseline") else ""
        fixed = statistics.median(times[f"fixed ({n} proc){mark}"]) if n and not key.startswith("fixed") else None
        net = f"{(med - fixed) / floor:.2f}" if fixed is not None else ""
        rows.append(f"| {key} | {med:.2f} | {' / '.join(f'{t:.1f}' for t in ts)} | {med / floor:.2f} | {net} |")
    head = (f"{src.name}: {size / 1e9:.2f} GB, device {args.device}, {args.reps} repetitions, "
            f"copy floor {size / 1e9 / floor:.2f} GB/s; load average after {load[0]:.1f} {args.label}")
    text = head + "\n\n" + "\n".join(rows) + "\n"
    print("\n" + text)
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n{text}")
    (out.with_suffix(".json")).write_text(json.dumps({"source": str(src), "bytes": size, "times": times,
                                                      "label": args.label}, indent=1))
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
