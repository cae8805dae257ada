"""The committed report sets under reports/ are shared documents: they must not carry the machine
that made them (its home directory, its cache) in any field."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def committed_reports() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "reports"], cwd=REPO, capture_output=True, text=True, check=True)
    return [REPO / f for f in out.stdout.split() if f.endswith((".json", ".md", ".html"))]


def machine_paths(text: str) -> list[str]:
    """The machine-specific fragments found in ``text``."""
    home = str(Path.home()).rstrip("/") + "/"
    return [frag for frag in {"/root/", "/home/", home, ".cache/"} if frag in text]


def test_the_check_finds_a_cache_path():  # negative control of the check below
    assert machine_paths('"source": "/root/.cache/mcore_bridge/zoo/llama-v3"')
    assert machine_paths(f"source {Path.home() / 'models' / 'x'} ·")
    assert not machine_paths('"source": "builtin:llama"')


def test_no_committed_report_names_a_home_or_cache_directory():
    files = committed_reports()
    assert len(files) > 50  # the zoo's reports and the GPU ones are all looked at
    bad = {str(f.relative_to(REPO)): machine_paths(f.read_text()) for f in files}
    assert {f: frags for f, frags in bad.items() if frags} == {}


def test_zoo_reports_name_the_builtin_model():
    for f in committed_reports():
        if f.suffix != ".json" or f.parent.parent != REPO / "reports":
            continue
        report = json.loads(f.read_text())
        if report.get("schema", "").startswith("mcore-bridge-verify/") and report["model"].endswith("-tiny"):
            assert report["source"] == "builtin:" + report["model"].removesuffix("-tiny"), f
