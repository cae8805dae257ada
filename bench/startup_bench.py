"""The CLI's fixed cost: wall time of ``mcore-bridge --help``, of an argument error, and of
``export --model builtin:llama --to-mcore --save X`` minus the conversion work itself.

    PYTHONPATH=$PWD .venv/bin/python bench/startup_bench.py [--repeat 3] [--json out.json] [--root DIR] [--verify]

Also ``plan --model`` of the same tiny model (meta-device build, no weights: all fixed cost) and,
with ``--verify``, one single-process ``verify`` case (tp1, fp32; its total, work included).

``--root`` measures another checkout of the project (e.g. ``git archive`` of an older commit) with
this same script, so that before/after numbers come from one machine state.

Wall times on a shared machine swing with its load; the CPU time (user + sys) of each command is
recorded too and is the steadier comparison. "Work" is measured in one warm process that has already imported everything: Bridge(...),
setup, build_model, load_weights and save_mcore on the same tiny model, in a fresh output
directory (the median of ``--repeat`` runs). The fixed overhead is the export command's wall time
minus that work: interpreter start, imports, process-group setup, argument handling. Warm means the
files are in the page cache (the first, cold run is reported separately and not counted).
No timing is asserted anywhere; the numbers go into reports.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # --root replaces it


def _env() -> dict:
    # the measured checkout first; then whatever the caller's path adds (a megatron-core --target site)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, MCORE_BRIDGE_QUIET="1", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    for var in ("TORCHDYNAMO_DISABLE", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)  # measure what a user's shell gets, not what a test run sets
    return env


CPU: dict[str, list] = {}  # what each command cost in CPU seconds (user + sys, children included)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wall(cmd: list[str], ok_codes=(0,), key: str | None = None) -> float:
    t, c = time.perf_counter(), _children_cpu()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=ROOT)
    took = time.perf_counter() - t
    if key:
        CPU.setdefault(key, []).append(_children_cpu() - c)
    if proc.returncode not in ok_codes:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return took


WORK = r"""
import json, sys, tempfile, time
from pathlib import Path
from mcore_bridge import Bridge, checkpoint
from mcore_bridge.runtime import compat
import mcore_bridge.model, megatron.core.models.gpt, transformers  # noqa: F401 (import cost is not work)
times, cpu = [], []
for i in range(int(sys.argv[1])):
    out = Path(tempfile.mkdtemp()) / "out"
    t, c = time.perf_counter(), time.process_time()
    if not hasattr(compat, "scope"):  # a checkout from before compat.scope
        compat.apply("cpu")
    with getattr(compat, "scope", lambda d: __import__("contextlib").nullcontext())("cpu"):
        b = Bridge("builtin:llama")
        b.setup("cpu")
        models = b.build_model(next(iter({d for _, d in b.hf_tensors.values() if d.is_floating_point})))
        b.load_weights(models)
        checkpoint.save_mcore(b, models, out)
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
print(json.dumps([times, cpu]))
"""


def work_times(repeat: int) -> tuple[list[float], list[float]]:
    proc = subprocess.run([sys.executable, "-c", WORK, str(repeat)], env=_env(), capture_output=True,
                          text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--root", default=None, help="the checkout to measure (default: this one)")
    ap.add_argument("--verify", action="store_true", help="also time one single-process verify case")
    args = ap.parse_args(argv)
    global ROOT
    ROOT = Path(args.root).resolve() if args.root else ROOT
    cli = [sys.executable, "-m", "mcore_bridge.cli"]
    wall(cli + ["zoo"])  # builds nothing; warms the page cache for the imports
    src = subprocess.run([sys.executable, "-c", "from mcore_bridge import zoo; print(zoo.materialize('llama'))"],
                         env=_env(), check=True, cwd=ROOT, capture_output=True, text=True).stdout.split()[-1]
    res = {"python": sys.version.split()[0], "root": str(ROOT), "load_average": os.getloadavg()}
    res["help_s"] = [wall(cli + ["--help"], key="help_s") for _ in range(args.repeat)]
    res["bad_argument_s"] = [wall(cli + ["export", "--tp", "x"], ok_codes=(2,), key="bad_argument_s")
                             for _ in range(args.repeat)]
    exports = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as d:
            exports.append(wall(cli + ["export", "--model", "builtin:llama", "--to-mcore", "--device", "cpu",
                                       "--save", str(Path(d) / "out")], key="export_s"))
    res["export_s"] = exports
    res["plan_s"] = [wall(cli + ["plan", "--model", src], key="plan_s") for _ in range(args.repeat)]
    if args.verify:
        with tempfile.TemporaryDirectory() as d:
            res["verify_tp1_s"] = [wall(cli + ["verify", "--model", "builtin:llama", "--matrix", "tp=1",
                                               "--dtype", "fp32", "--device", "cpu", "--report", str(Path(d) / "r")],
                                        key="verify_tp1_s")]
    res["work_s"], CPU["work_s"] = work_times(args.repeat)
    med = {k: statistics.median(v) for k, v in res.items() if isinstance(v, list) and k != "load_average"}
    res["median"], res["cpu"] = med, CPU
    cpu_med = {k: statistics.median(v) for k, v in CPU.items()}
    res["cpu_median"] = cpu_med
    res["export_fixed_overhead_s"] = med["export_s"] - med["work_s"]
    res["export_fixed_overhead_cpu_s"] = cpu_med["export_s"] - cpu_med["work_s"]
    print(f"load average at start {res['load_average'][0]:.1f}; wall (CPU = user+sys) medians:")
    for k, v in med.items():
        print(f"{k:<16} {v:6.2f} s wall, {cpu_med[k]:6.2f} s CPU  (wall runs: {', '.join(f'{x:.2f}' for x in res[k])})")
    print(f"export fixed overhead (export - work): {res['export_fixed_overhead_s']:.2f} s wall, "
          f"{res['export_fixed_overhead_cpu_s']:.2f} s CPU")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
