"""Where `mcore-bridge verify` writes: a fresh directory by default, never over a baseline set
(one holding the .mcore-bridge-baseline marker, as the committed reports/ does) unless told."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mcore_bridge.cli import BASELINE_MARKER
from tests.test_cli import CLI, run_cli

REPO = Path(__file__).resolve().parent.parent
ONE_CASE = ("--model", "builtin:qwen2", "--matrix", "tp=1 sp=0 ep=1", "--device", "cpu")


def _snapshot(d: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in d.rglob("*") if p.is_file()}


def test_committed_baselines_are_marked():
    assert (REPO / "reports" / BASELINE_MARKER).is_file()
    assert (REPO / "reports" / "gpu-h200" / BASELINE_MARKER).is_file()


def test_default_is_a_fresh_directory_and_a_baseline_is_refused(tmp_path):
    # default: reports/runs/<time> under the working directory, git-ignored inside this repository
    r = subprocess.run([*CLI, "verify", *ONE_CASE], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((tmp_path / "reports" / "runs").iterdir())
    assert len(runs) == 1 and list(runs[0].glob("qwen2-tiny/*.json"))
    assert f"reports in reports/runs/{runs[0].name}/index.html" in r.stdout
    ignored = subprocess.run(["git", "check-ignore", "-q", "reports/runs/20990101-000000/x.json"], cwd=REPO)
    assert ignored.returncode == 0
    # the run's set, marked as a baseline, is refused untouched; with --overwrite-baseline written
    base = runs[0]
    (base / BASELINE_MARKER).write_text("baseline\n")
    before = _snapshot(base)
    r = run_cli("verify", *ONE_CASE, "--report", base)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"--report {base} is a baseline report set" in r.stderr and "--overwrite-baseline" in r.stderr
    assert _snapshot(base) == before
    r = run_cli("verify", *ONE_CASE, "--report", base, "--overwrite-baseline")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _snapshot(base) != before and (base / BASELINE_MARKER).exists()


def test_committed_reports_refused(tmp_path):
    before = _snapshot(REPO / "reports")
    r = run_cli("verify", *ONE_CASE, "--report", REPO / "reports")
    assert r.returncode == 2 and "is a baseline report set" in r.stderr
    assert _snapshot(REPO / "reports") == before


if __name__ == "__main__":
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", __file__, "-q"]))
