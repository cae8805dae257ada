"""Regression mode: compare a directory of verification reports against a baseline directory.

Entry points (the CLI's ``mcore-bridge report --baseline OLD --current NEW`` calls ``main``)::

    compare(baseline_dir, current_dir, rel_tol=0.5, abs_tol=None, drop_tol=None) -> Comparison
    main(argv: list[str] | None = None) -> int
        # argv excludes the program name: main(["--baseline", OLD, "--current", NEW])
        # options: --rel-tol R, --abs-tol A (one noise floor for every dtype), --json OUT,
        #          --only-changes; prints the table; returns 0 (no regression), 1 (regression or
        #          missing case), 2 (unreadable directory or malformed report, named on stderr)

Both directories are report directories as written by :func:`verify.report.write_report`
(``DIR/<model>/<layout_id>-<dtype>.json``); cases are matched by (model, layout_id, dtype) (and
the negative-control spec, for control runs).

What is compared is derived from the gate's own definition (verify/metrics.py), so a metric the
gate starts to limit is compared without a change here: every metric in ``metrics.LOWER_IS_BETTER``
/ ``metrics.HIGHER_IS_BETTER`` (logit diffs, KL, top-1 and cosine agreement, their loss-token
variants, router agreement), every metric a report's ``thresholds`` bound (``metrics.gated``:
``<m>_min`` from below, others from above), and per probe (matched by name) the hidden-state drift
``rel_mean_diff`` and, for MoE layers, ``router_agreement``.

Stated tolerance (the defaults; chosen to sit above rounding noise, not measured across machines):

* Lower-is-better metrics (and per-probe drift) regress when
  ``current > baseline * (1 + rel_tol) + floor[dtype]``, with ``rel_tol = 0.5`` and the noise floor
  ``floor = 1e-6`` for fp32 (fp32 runs agree to ~1e-7, so anything under 1e-6 is rounding) and
  ``1e-3`` for bf16 / fp16 (bf16 rounds a logit of magnitude ~1 by up to 3.9e-3, so a change
  under 1e-3 is below one rounding step). The floor is absolute, so
  it is loose for the small ``kl_hf_mg``; ``mean_diff`` / ``max_diff`` carry the signal there.
  They improve when ``baseline > current * (1 + rel_tol) + floor``.
* Higher-is-better metrics regress when ``current < baseline - drop``: agreements (top-1, top-1
  over loss tokens, routing) with ``drop = 1e-3`` for fp32 (one flipped token in ~1000) and
  ``1e-2`` for bf16 / fp16; cosines (mean and min) with ``1e-6`` for fp32 and ``1e-4`` for
  bf16 / fp16.
* A dtype other than fp32 / bf16 / fp16 gets the bf16 (loosest) tolerances.
* Verdict ``pass`` -> ``fail`` is a regression, ``fail`` -> ``pass`` an improvement.
* Negative controls (reports with a ``control`` key: a deliberate error injected on the Megatron
  side) are matched separately and only their verdict is compared, the other way round: a control
  that failed in the baseline (caught) and passes now (missed) is a regression.
* A case of the baseline absent from the current directory, or a metric or probe the baseline has
  and the current report lacks, is a failure (MISSING). Cases and metrics only in the current
  directory are listed as ``new``. NaN where the baseline was finite is a regression.

Changed thresholds, devices or library versions between the two reports of a case are listed as
notes (they explain differences, they fail nothing). Per-input metrics are not compared: the
aggregates take the worst input.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mcore_bridge.errors import UsageError
from verify import metrics as gate
from verify.report import ReportError, case_key, case_sort_key, canonical_json, fmt, load_reports

# What is compared comes from the gate's definition (verify/metrics.py): every metric it reports,
# every metric a report's thresholds bound (metrics.gated), and per probe the drift and routing it
# limits (metrics.PER_LAYER, router_agreement_min).
LOWER_IS_BETTER = gate.LOWER_IS_BETTER
HIGHER_IS_BETTER = gate.HIGHER_IS_BETTER
LAYER_DRIFT, LAYER_ROUTING = "rel_mean_diff", "router_agreement"
NOISE_FLOOR = {"fp32": 1e-6, "bf16": 1e-3, "fp16": 1e-3}
# Higher-is-better drops by kind: agreements (fractions of tokens: top-1, routing) and cosines.
DROP_TOL = {"fp32": {"agreement": 1e-3, "cosine": 1e-6},
            "bf16": {"agreement": 1e-2, "cosine": 1e-4},
            "fp16": {"agreement": 1e-2, "cosine": 1e-4}}
_LOOSEST = "bf16"


def drop_kind(metric: str) -> str:
    return "cosine" if metric.split(".")[-1].startswith("cosine") else "agreement"


def compared_metrics(*reports: dict) -> dict[str, str]:
    """``{metric: "lower" | "higher"}`` compared for a case: the gate's reported metrics and every
    metric the reports' thresholds bound (so a newly gated metric is compared without a change here)."""
    out = {m: "lower" for m in LOWER_IS_BETTER} | {m: "higher" for m in HIGHER_IS_BETTER}
    for r in reports:
        out.update(gate.gated(r.get("thresholds") or {}))
    return out

# Row statuses. FAILING ones make the comparison fail.
OK, IMPROVED, REGRESSION, MISSING, NEW = "ok", "improved", "REGRESSION", "MISSING", "new"
FAILING = (REGRESSION, MISSING)


def _num(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


@dataclass
class Comparison:
    """The outcome of :func:`compare`. ``rows`` are plain dicts (one per case x metric, plus one
    "verdict" row per case and one "case" row per missing or new case) with the keys ``model``,
    ``layout_id``, ``dtype``, ``control`` ("" for real runs), ``metric``, ``baseline``, ``current``, ``limit`` (text), ``change``
    (text) and ``status`` (ok / improved / REGRESSION / MISSING / new): ready for
    ``pandas.DataFrame(comparison.rows)`` or :meth:`format_table`."""

    baseline_dir: str
    current_dir: str
    rel_tol: float
    abs_tol: dict
    drop_tol: dict
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def regressions(self) -> list[dict]:
        """Rows that fail the comparison: regressions and missing cases or metrics."""
        return [r for r in self.rows if r["status"] in FAILING]

    @property
    def improvements(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == IMPROVED]

    @property
    def ok(self) -> bool:
        return not self.regressions

    def cases(self, status: str | None = None) -> list[tuple]:
        """Sorted (model, layout_id, dtype, control) of the cases with a row of ``status``."""
        return sorted({_key(r) for r in self.rows if status is None or r["status"] == status})

    def tolerance_text(self) -> str:
        """The stated tolerance, as printed above the table."""
        floors = ", ".join(f"{k} {v:.0e}" for k, v in self.abs_tol.items())
        drops = "; ".join(f"{k}s: " + ", ".join(f"{d} {self.drop_tol[d][k]:.0e}" for d in self.drop_tol)
                          for k in ("agreement", "cosine"))
        return "\n".join([
            "stated tolerance:",
            f"  lower is better ({', '.join(LOWER_IS_BETTER)}, per probe {LAYER_DRIFT}, any other metric the"
            f" gate bounds from above):",
            f"    regression if current > baseline x (1 + {self.rel_tol:g}) + noise floor; floor {floors}"
            f" (other dtypes: as {_LOOSEST})",
            f"  higher is better ({', '.join(HIGHER_IS_BETTER)}, per probe {LAYER_ROUTING}, any other metric"
            f" the gate bounds from below):",
            f"    regression if current < baseline - drop; {drops}",
            "  verdict pass -> fail is a regression (negative controls: fail -> pass); a case or metric of",
            "  the baseline missing from the current reports is a failure",
        ])

    def summary(self) -> dict:
        return {
            "cases_compared": len({_key(r) for r in self.rows if r["metric"] == "verdict"}),
            "regressions": sum(r["status"] == REGRESSION for r in self.rows),
            "missing": sum(r["status"] == MISSING for r in self.rows),
            "improvements": sum(r["status"] == IMPROVED for r in self.rows),
            "new": sum(r["status"] == NEW for r in self.rows),
            "ok": self.ok,
        }

    def format_table(self, only_changes: bool = False) -> str:
        """Aligned text: the stated tolerance, one line per row (``only_changes``: rows whose
        status is not ok), the notes, and a summary line."""
        header = ("case", "metric", "baseline", "current", "limit", "change", "status")
        rows = [r for r in self.rows if not only_changes or r["status"] != OK]
        cells = [header] + [(_label(r), r["metric"],
                             _show(r["baseline"], r["metric"]), _show(r["current"], r["metric"]),
                             r["limit"], r["change"], r["status"]) for r in rows]
        widths = [max(len(str(c[i])) for c in cells) for i in range(len(header))]
        lines = [self.tolerance_text(), "",
                 f"baseline: {self.baseline_dir}", f"current:  {self.current_dir}", ""]
        for j, c in enumerate(cells):
            lines.append("  ".join(str(v).ljust(w) for v, w in zip(c, widths)).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        if not rows:
            lines.append("(no differences)" if only_changes else "(nothing to compare)")
        if self.notes:
            lines += ["", "notes:"] + [f"  - {n}" for n in self.notes]
        s = self.summary()
        lines += ["", f"{s['cases_compared']} cases compared: {s['regressions']} regressions, "
                      f"{s['missing']} missing, {s['improvements']} improvements, {s['new']} new -> "
                      + ("OK" if self.ok else "REGRESSION")]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"schema": "mcore-bridge-verify-regression/1", "baseline": self.baseline_dir,
                "current": self.current_dir, "rel_tol": self.rel_tol, "abs_tol": self.abs_tol,
                "drop_tol": self.drop_tol, "tolerance": self.tolerance_text(),
                "summary": self.summary(), "notes": self.notes, "rows": self.rows}

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["model", "layout_id", "dtype", "control", "metric",
                                                "baseline", "current", "limit", "change", "status"])


def _key(row: dict) -> tuple:
    return row["model"], row["layout_id"], row["dtype"], row["control"]


def _label(row: dict) -> str:
    label = f"{row['model']} {row['layout_id']} {row['dtype']}"
    return label + (f" control={row['control']}" if row["control"] else "")


def _show(value, metric) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return fmt(value, metric)


def _ratio(r: float) -> str:
    return f"x{r:.2f}" if r < 1000 else f"x{r:.1e}"


def _delta(d: float) -> str:
    return "+0" if d == 0 else f"{d:+.4f}" if abs(d) >= 1e-3 else f"{d:+.1e}"


def _row(key, metric, baseline, current, limit, change, status) -> dict:
    model, layout_id, dtype, control = key
    return {"model": model, "layout_id": layout_id, "dtype": dtype, "control": control, "metric": metric,
            "baseline": baseline, "current": current, "limit": limit, "change": change, "status": status}


def _compare_lower(key, metric, b, c, rel_tol, floor) -> dict:
    limit = b * (1 + rel_tol) + floor
    change = _ratio(c / b) if b > 0 and math.isfinite(b) and math.isfinite(c) else "—"
    if math.isnan(c) and not math.isnan(b):
        status = REGRESSION
    elif math.isnan(b) and not math.isnan(c):
        status = IMPROVED
    elif c > limit:
        status = REGRESSION
    elif b > c * (1 + rel_tol) + floor:
        status = IMPROVED
    else:
        status = OK
    return _row(key, metric, b, c, f"<= {fmt(limit, metric)}", change, status)


def _compare_higher(key, metric, b, c, drop) -> dict:
    limit = b - drop
    change = _delta(c - b) if math.isfinite(b) and math.isfinite(c) else "—"
    if math.isnan(c) and not math.isnan(b):
        status = REGRESSION
    elif math.isnan(b) and not math.isnan(c):
        status = IMPROVED
    elif c < limit:
        status = REGRESSION
    elif c > b + drop:
        status = IMPROVED
    else:
        status = OK
    return _row(key, metric, b, c, f">= {fmt(limit, metric)}", change, status)


def _notes(key, base: dict, cur: dict) -> list[str]:
    name = " ".join(k for k in key if k)
    out = []
    if base.get("thresholds") != cur.get("thresholds"):
        bt, ct = base["thresholds"], cur["thresholds"]
        changed = sorted(k for k in set(bt) | set(ct) if bt.get(k) != ct.get(k))
        out.append(f"{name}: thresholds changed ("
                   + ", ".join(f"{k} {bt.get(k)} -> {ct.get(k)}" for k in changed) + ")")
    if base.get("device") != cur.get("device"):
        out.append(f"{name}: device changed ({base.get('device')} -> {cur.get('device')})")
    bv, cv = base.get("versions") or {}, cur.get("versions") or {}
    changed = sorted(k for k in set(bv) | set(cv) if bv.get(k) != cv.get(k))
    if changed:
        out.append(f"{name}: versions changed ("
                   + ", ".join(f"{k} {bv.get(k)} -> {cv.get(k)}" for k in changed) + ")")
    return out


def _tolerances(abs_tol, drop_tol, dtypes) -> tuple[dict, dict]:
    if abs_tol is None:
        floors = dict(NOISE_FLOOR)
    elif isinstance(abs_tol, dict):
        floors = {**NOISE_FLOOR, **abs_tol}
    else:
        floors = {d: float(abs_tol) for d in NOISE_FLOOR}
    drops = {d: dict(v) for d, v in DROP_TOL.items()}
    for dtype, values in (drop_tol or {}).items():  # {dtype: {kind or metric: drop}}
        drops.setdefault(dtype, dict(DROP_TOL[_LOOSEST])).update(values)
    for dtype in dtypes:  # unknown dtypes: the loosest known tolerances, stated in the output
        if dtype not in floors:
            floors[dtype] = float(abs_tol) if isinstance(abs_tol, (int, float)) else floors[_LOOSEST]
        drops.setdefault(dtype, dict(drops[_LOOSEST]))
    return floors, drops


def _compare_metric(key, metric, better, b, c, rel_tol, floor, drops) -> dict | None:
    bm, cm = _num(b), _num(c)
    if bm is None and cm is None:
        return None
    if cm is None:
        return _row(key, metric, bm, None, "present", "—", MISSING)
    if bm is None:
        return _row(key, metric, None, cm, "—", "—", NEW)
    if better == "lower":
        return _compare_lower(key, metric, bm, cm, rel_tol, floor)
    return _compare_higher(key, metric, bm, cm, drops.get(metric, drops[drop_kind(metric)]))


def _compare_layers(key, base: dict, cur: dict, rel_tol, floor, drops) -> list[dict]:
    """Per probe (matched by name): the drift the gate limits (``layer_rel_drift``) and, for MoE
    layers, the routing agreement. A probe of the baseline missing now is a failure."""
    rows = []
    current = {entry.get("probe"): entry for entry in cur.get("layers") or []}
    for entry in base.get("layers") or []:
        probe = entry.get("probe")
        now = current.get(probe)
        for field_, better in ((LAYER_DRIFT, "lower"), (LAYER_ROUTING, "higher")):
            if field_ not in entry:
                continue
            row = _compare_metric(key, f"{probe}.{field_}", better, entry[field_],
                                  None if now is None else now.get(field_), rel_tol, floor, drops)
            if row is not None:
                rows.append(row)
    return rows


def compare(baseline_dir, current_dir, rel_tol: float = 0.5, abs_tol=None, drop_tol=None) -> Comparison:
    """Compare every case of ``baseline_dir`` with the same (model, layout_id, dtype) in
    ``current_dir``. ``abs_tol``: the noise floor added to lower-is-better limits, ``None`` for the
    per-dtype defaults (:data:`NOISE_FLOOR`), one number for every dtype, or ``{dtype: floor}``.
    ``drop_tol``: ``{dtype: {metric: drop}}`` overriding :data:`DROP_TOL` for higher-is-better
    metrics. Raises :class:`verify.report.ReportError` for a missing directory or a malformed
    report."""
    if rel_tol < 0:
        raise UsageError(f"rel_tol must be >= 0, got {rel_tol}")
    base = {case_key(r): r for r in load_reports(baseline_dir)}
    cur = {case_key(r): r for r in load_reports(current_dir)}
    floors, drops = _tolerances(abs_tol, drop_tol, {k[2] for k in base} | {k[2] for k in cur})
    comp = Comparison(str(baseline_dir), str(current_dir), rel_tol, floors, drops)
    if not base:
        comp.notes.append(f"the baseline {baseline_dir} holds no reports: nothing to compare against")

    def order(key):
        report = base.get(key) or cur[key]
        return (key[0], case_sort_key(report))

    for key in sorted(set(base) | set(cur), key=order):
        b, c = base.get(key), cur.get(key)
        if c is None:
            comp.rows.append(_row(key, "case", b["verdict"], None, "present", "—", MISSING))
            continue
        if b is None:
            comp.rows.append(_row(key, "case", None, c["verdict"], "—", "—", NEW))
            continue
        bv, cv = b["verdict"], c["verdict"]
        good = "fail" if key[3] else "pass"  # a negative control is supposed to fail
        status = REGRESSION if bv == good != cv else IMPROVED if cv == good != bv else OK
        comp.rows.append(_row(key, "verdict", bv, cv, good if bv == good else "—",
                              "—" if bv == cv else f"{bv} -> {cv}", status))
        comp.notes += _notes(key, b, c)
        if key[3]:
            continue  # a control's metrics measure the injected error, not the bridge
        dtype = key[2]
        for metric, better in compared_metrics(b, c).items():
            row = _compare_metric(key, metric, better, b["metrics"].get(metric), c["metrics"].get(metric),
                                  rel_tol, floors[dtype], drops[dtype])
            if row is not None:
                comp.rows.append(row)
        comp.rows += _compare_layers(key, b, c, rel_tol, floors[dtype], drops[dtype])
    return comp


def main(argv: list[str] | None = None) -> int:
    """Compare ``--current`` against ``--baseline``, print the table; 0 = no regression,
    1 = a regression or a missing case, 2 = bad input (missing directory, malformed report)."""
    parser = argparse.ArgumentParser(
        prog="mcore-bridge report",
        description="Compare verification reports against a baseline; exit 1 on any regression.")
    parser.add_argument("--baseline", required=True, help="report directory of the previous run")
    parser.add_argument("--current", required=True, help="report directory of this run")
    parser.add_argument("--rel-tol", type=float, default=0.5,
                        help="relative growth allowed for lower-is-better metrics (default 0.5)")
    parser.add_argument("--abs-tol", type=float, default=None,
                        help="one absolute noise floor for every dtype (default: fp32 1e-6, bf16/fp16 1e-3)")
    parser.add_argument("--json", metavar="OUT", help="also write the comparison as JSON to OUT")
    parser.add_argument("--only-changes", action="store_true", help="print only rows that are not ok")
    args = parser.parse_args(argv)
    try:
        comp = compare(args.baseline, args.current, rel_tol=args.rel_tol, abs_tol=args.abs_tol)
    except (ReportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(comp.format_table(only_changes=args.only_changes))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(canonical_json(comp.to_dict()), encoding="utf-8")
    return 0 if comp.ok else 1


if __name__ == "__main__":
    sys.exit(main())
