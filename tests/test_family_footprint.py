"""bench/family_footprint.py counts, per family, the files and lines changed outside the family's
places -- checked on a tiny git repository built here, where the expected numbers are known by
construction."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "family_footprint.py"
_spec = importlib.util.spec_from_file_location("family_footprint", SCRIPT)
ff = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("family_footprint", ff)  # dataclasses look their module up there
_spec.loader.exec_module(ff)


def git(repo: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "HOME": str(repo), "PATH": "/usr/bin:/bin"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def write(repo: Path, rel: str, lines: int, tag: str = "x"):
    p = repo / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(f"{tag}{i}\n" for i in range(lines)))


def commit(repo: Path, msg: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", msg)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """core (root) -> family a (local: 0 outside) -> family b (touches model.py, a new core file,
    a binary file, renames a core file) -> family c (edits an allowed README and bench only) -> its
    file renamed."""
    r = tmp_path_factory.mktemp("repo")
    git(r, "init", "-q", "-b", "main")
    write(r, "mcore_bridge/model.py", 10)
    write(r, "mcore_bridge/plan.py", 20)
    write(r, "mcore_bridge/families/base.py", 5)
    write(r, "mcore_bridge/families/__init__.py", 1)
    write(r, "mcore_bridge/families/llama.py", 7)
    commits = {"core": commit(r, "core")}
    write(r, "mcore_bridge/families/alpha.py", 30)
    write(r, "mcore_bridge/zoo.py", 4)
    write(r, "tests/test_alpha.py", 12)
    write(r, "reports/alpha.json", 3)
    commits["a"] = commit(r, "family alpha")
    write(r, "mcore_bridge/families/beta.py", 25)
    model = (r / "mcore_bridge/model.py").read_text().splitlines(keepends=True)
    model[2] = "changed\n"
    (r / "mcore_bridge/model.py").write_text("".join(model + ["new1\n", "new2\n"]))  # +3 -1
    write(r, "mcore_bridge/newcore.py", 6)  # +6
    (r / "mcore_bridge/blob.bin").write_bytes(bytes(range(256)) * 4)  # binary: a file, 0 lines
    git(r, "mv", "mcore_bridge/plan.py", "mcore_bridge/planner.py")  # a pure rename: 0 lines
    write(r, "mcore_bridge/families/README.md", 9)
    commits["b"] = commit(r, "family beta")
    write(r, "mcore_bridge/families/gamma.py", 8)
    write(r, "README.md", 5)
    write(r, "bench/gamma.py", 5)
    commits["c"] = commit(r, "family gamma")
    git(r, "mv", "mcore_bridge/families/gamma.py", "mcore_bridge/families/delta.py")
    commits["d"] = commit(r, "rename gamma to delta")
    return r, commits


def test_a_local_family_counts_zero(repo):
    r, c = repo
    fp = ff.footprint(r, "alpha", f"{c['core']}..{c['a']}")
    assert fp.files == [] and fp.lines == 0


def test_core_edits_are_counted_by_file_and_line(repo):
    r, c = repo
    fp = ff.footprint(r, "beta", f"{c['b']}^!")
    assert fp.files == [["mcore_bridge/blob.bin", 0, 0], ["mcore_bridge/model.py", 3, 1],
                        ["mcore_bridge/newcore.py", 6, 0], ["mcore_bridge/planner.py", 0, 0]]
    assert fp.lines == 10


def test_a_range_sums_its_commits(repo):
    r, c = repo
    fp = ff.footprint(r, "ab", f"{c['core']}..{c['c']}")
    assert [f[0] for f in fp.files] == ["mcore_bridge/blob.bin", "mcore_bridge/model.py",
                                        "mcore_bridge/newcore.py", "mcore_bridge/planner.py"]
    assert fp.lines == 10


def test_readme_bench_tests_reports_zoo_and_families_are_the_allowed_places(repo):
    r, c = repo
    assert ff.footprint(r, "gamma", f"{c['c']}^!").files == []
    assert ff.allowed("README.md") and not ff.allowed("docs/README.md")
    assert ff.allowed("mcore_bridge/zoo.py") and not ff.allowed("mcore_bridge/zoo.py.bak")
    assert not ff.allowed("mcore_bridge/families.py") and ff.allowed("mcore_bridge/families/x.py")


def test_history_finds_each_family_files_adding_commit(repo):
    r, c = repo
    got = {fp.name: fp for fp in ff.history(r)}
    assert sorted(got) == ["alpha", "beta", "delta", "llama"]  # not __init__ / base
    assert got["alpha"].lines == 0 and got["alpha"].rev == c["a"][:12]
    assert got["beta"].lines == 10 and len(got["beta"].files) == 4
    assert got["delta"].files == [] and got["delta"].rev == c["c"][:12]  # added as gamma, renamed later
    # the root commit: compared with the empty tree, flagged as the core itself
    assert got["llama"].rev == c["core"][:12] and "core itself" in got["llama"].note
    assert [f[0] for f in got["llama"].files] == ["mcore_bridge/model.py", "mcore_bridge/plan.py"]
    assert got["llama"].lines == 30


def test_cli_prints_json_and_refuses_a_malformed_pair(repo):
    r, c = repo
    out = subprocess.run([sys.executable, str(SCRIPT), "--repo", str(r), "--json", f"beta={c['b']}^!"],
                         capture_output=True, text=True, check=True).stdout
    (row,) = json.loads(out)
    assert row["name"] == "beta" and row["lines"] == 10
    bad = subprocess.run([sys.executable, str(SCRIPT), "--repo", str(r), "beta"], capture_output=True, text=True)
    assert bad.returncode == 2 and "NAME=REV_RANGE" in bad.stderr
    unknown = subprocess.run([sys.executable, str(SCRIPT), "--repo", str(r), "x=nosuchrev..HEAD"],
                             capture_output=True, text=True)
    assert unknown.returncode != 0 and "nosuchrev" in unknown.stderr
