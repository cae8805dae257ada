"""Proof by counting (issue 17): what adding a model family changed outside the family's own files.

For each family, the files and lines a change touched outside the places a family is expected to
live (``mcore_bridge/families/``, ``mcore_bridge/zoo.py``, ``tests/``, ``README.md``, ``reports/``,
``bench/``). Zero means the family was a local change.

  python bench/family_footprint.py NAME=REV_RANGE [NAME=REV_RANGE ...]   # e.g. mtp=main..mtp, gemma=abc123^!
  python bench/family_footprint.py --history                             # each existing family file's adding commit
  options: --repo DIR (default: this checkout), --json

A range is anything ``git diff`` takes (``A..B``, ``C^!``); a root commit is compared with the
empty tree. Renames count as one file (lines changed by the rename only); binary files count as a
file with 0 lines. ``--history`` takes, per ``mcore_bridge/families/*.py`` (not ``__init__``, ``base``,
``vl_model``), the commit that added it (``git log --diff-filter=A``; a renamed file: its earlier
name's); a file added together
with the core itself (the project's first commit) is reported as such, its numbers being the core.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ALLOWED = ("mcore_bridge/families/", "mcore_bridge/zoo.py", "tests/", "README.md", "reports/", "bench/")
NOT_FAMILIES = ("__init__.py", "base.py", "vl_model.py")  # vl_model: the model class qwen_vl builds
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"  # git's well-known empty tree


@dataclass
class Footprint:
    name: str
    rev: str
    files: list = field(default_factory=list)  # [path, added, deleted] outside ALLOWED
    note: str = ""

    @property
    def lines(self) -> int:
        return sum(a + d for _, a, d in self.files)


def allowed(path: str) -> bool:
    return any(path == p or (p.endswith("/") and path.startswith(p)) for p in ALLOWED)


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)}: {done.stderr.strip() or 'failed'}")
    return done.stdout


def parse_numstat_z(out: str) -> list[tuple[str, int, int]]:
    """``git diff --numstat -z`` -> [(path, added, deleted)]; a rename gives its new path."""
    parts = out.split("\0")
    rows, i = [], 0
    while i < len(parts) and parts[i]:
        added, deleted, path = parts[i].split("\t", 2)
        if path == "":  # a rename or copy: the old and the new path follow
            path = parts[i + 2]
            i += 3
        else:
            i += 1
        rows.append((path, 0 if added == "-" else int(added), 0 if deleted == "-" else int(deleted)))
    return rows


def changed(repo: Path, rev: str) -> list[tuple[str, int, int]]:
    """(path, added, deleted) of every file ``rev`` changes; a single commit ``C^!`` at the root
    is compared with the empty tree."""
    if rev.endswith("^!"):
        commit = rev[:-2]
        parents = git(repo, "rev-list", "--parents", "-n", "1", commit).split()[1:]
        if not parents:
            return parse_numstat_z(git(repo, "diff", "--numstat", "-z", "-M", EMPTY_TREE, commit))
    return parse_numstat_z(git(repo, "diff", "--numstat", "-z", "-M", rev))


def footprint(repo: Path, name: str, rev: str) -> Footprint:
    rows = [[p, a, d] for p, a, d in changed(repo, rev) if not allowed(p)]
    return Footprint(name, rev, sorted(rows))


def added_by(repo: Path, rel: str, rev: str = "HEAD") -> str | None:
    """The commit that first added ``rel``, through renames (a commit that only renamed the file
    hands over to its earlier name). Not ``git log --follow``: it guesses by similarity and can
    wander into an unrelated, similar file's history."""
    while True:
        adds = git(repo, "log", "--diff-filter=A", "--format=%H", rev, "--", rel).split()
        if not adds:
            return None
        commit = adds[-1]
        if commit in git(repo, "rev-list", "--max-parents=0", commit).split():
            return commit
        renames = [line.split("\t") for line in git(repo, "diff", "--name-status", "-M", f"{commit}^!").splitlines()
                   if line.startswith("R")]
        old = next((src for _, src, dst in renames if dst == rel), None)
        if old is None:
            return commit
        rel, rev = old, f"{commit}^"


def history(repo: Path) -> list[Footprint]:
    """One footprint per existing family file: the commit that added it."""
    out = []
    families = sorted(p for p in (repo / "mcore_bridge" / "families").glob("*.py") if p.name not in NOT_FAMILIES)
    root = set(git(repo, "rev-list", "--max-parents=0", "HEAD").split())
    for path in families:
        rel = str(path.relative_to(repo))
        commit = added_by(repo, rel)
        if commit is None:
            out.append(Footprint(path.stem, "", note="no commit adds it (not committed yet?)"))
            continue
        fp = footprint(repo, path.stem, f"{commit}^!")
        fp.rev = commit[:12]
        if commit in root:
            fp.note = "added with the core itself (the first commit): its numbers are the core"
        out.append(fp)
    return out


def report(footprints: list[Footprint]) -> str:
    lines = []
    for fp in footprints:
        head = f"{fp.name} ({fp.rev}): {len(fp.files)} file(s), {fp.lines} line(s) outside the family's places"
        lines.append(head + (f"  [{fp.note}]" if fp.note else ""))
        for path, a, d in fp.files:
            lines.append(f"    {path}  +{a} -{d}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pairs", nargs="*", metavar="NAME=REV_RANGE")
    ap.add_argument("--history", action="store_true", help="the commit that added each existing family file")
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not args.pairs and not args.history:
        ap.error("give NAME=REV_RANGE pairs or --history")
    fps = []
    for pair in args.pairs:
        name, sep, rev = pair.partition("=")
        if not sep or not name or not rev:
            ap.error(f"{pair!r}: expected NAME=REV_RANGE, e.g. mtp=main..mtp")
        fps.append(footprint(args.repo, name, rev))
    if args.history:
        fps += history(args.repo)
    if args.json:
        print(json.dumps([{**asdict(fp), "lines": fp.lines} for fp in fps], indent=1))
    else:
        print(report(fps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
