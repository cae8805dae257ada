"""Verification reports: canonical JSON on disk, Markdown next to it, HTML pages and an index.

Entry points (the CLI's ``mcore-bridge report --render DIR`` calls the last one)::

    write_report(report: dict, report_dir) -> Path       # REPORT_DIR/<model>/<layout_id>-<dtype>.json (+ .md)
    load_reports(report_dir) -> list[dict]               # every REPORT_DIR/*/*.json, schema-checked
    render_model_page(report_dir, model: str) -> Path    # REPORT_DIR/<model>/index.html
    render_index(report_dir) -> list[Path]               # REPORT_DIR/index.html and REPORT_DIR/index.md
    render_all(report_dir) -> list[Path]                 # every model page, then the index

One report is one (model, layout, dtype) case, a dict in the ``mcore-bridge-verify/1`` schema written
by the verification runner (keys: schema, model, source, family, layout, layout_id, dtype, device,
world_size, versions, timing, inputs, metrics, per_input, thresholds, layers, first_diverging,
calibration, failures, verdict, created). The verdict and the failures are the runner's; this module
only presents them (per-metric pass/fail marks are recomputed from ``thresholds`` for display).

A report with a ``control`` key (a negative control: a deliberate error injected on the Megatron
side, see verify/controls.py) is its own case, ``<layout_id>-<dtype>-control-<spec>.json``, so it
never replaces the real one; pages mark it "caught" when it fails, and the index counts controls
apart from the pass/fail counts.

Errors: :class:`ReportError` (a ``ValueError``), its message starting with the offending file.

Files: the model's name and the case's ``<layout_id>-<dtype>`` become file names with every
character outside ``[A-Za-z0-9._-]`` replaced by ``_`` (so ``Qwen/Qwen3-8B`` lives in
``REPORT_DIR/Qwen_Qwen3-8B/``). JSON files under REPORT_DIR/*/ whose ``schema`` names another
kind of document (not ``mcore-bridge-verify/...``) are skipped; any other unreadable or malformed
file is an error naming the file.

Pages are self-contained: CSS inline, plots embedded as base64 PNG (matplotlib, Agg canvas, no
pyplot state); every text taken from a report is HTML-escaped. Also runnable as
``python -m verify.report DIR`` (renders everything).
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
import os
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Iterable

SCHEMA = "mcore-bridge-verify/1"
SCHEMA_FAMILY = "mcore-bridge-verify/"

# Display order of the metrics (others a runner adds are shown after these, sorted).
METRIC_ORDER = (
    "token_mean_diff_mean", "token_mean_diff_max", "mean_diff", "max_diff",
    "mean_diff_with_loss", "max_diff_with_loss", "top1_agreement", "kl_hf_mg",
    "cosine_mean", "cosine_min", "loss_hf", "loss_mg",
)
# Columns of the per-model case table and of the per-input table.
KEY_METRICS = ("mean_diff", "max_diff", "mean_diff_with_loss", "max_diff_with_loss",
               "top1_agreement", "kl_hf_mg")
_REQUIRED = {
    "schema": str, "model": str, "layout_id": str, "dtype": str, "layout": dict,
    "metrics": dict, "thresholds": dict, "layers": list, "failures": list, "verdict": str,
}
_REQUIRED_METRICS = ("mean_diff", "max_diff")
_VERDICTS = ("pass", "fail")


class ReportError(ValueError):
    """A report file or dict that cannot be used; the message names the file."""


# ----------------------------------------------------------------------------------------- paths

def safe_name(text: str) -> str:
    """``text`` as a single, portable file-name component."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", str(text))
    if not name or name.startswith("."):
        name = "_" + name
    return name


def model_dir(report_dir, model: str) -> Path:
    return Path(report_dir) / safe_name(model)


def case_key(report: dict) -> tuple[str, str, str, str]:
    """Identity of a case: (model, layout_id, dtype, control); control is "" for a real run."""
    return report["model"], report["layout_id"], report["dtype"], report.get("control") or ""


def report_path(report_dir, report: dict) -> Path:
    """Where ``report``'s JSON lives: ``REPORT_DIR/<model>/<layout_id>-<dtype>.json``
    (``...-<dtype>-control-<spec>.json`` for a negative-control run, so that it never replaces
    the real case)."""
    stem = f"{report['layout_id']}-{report['dtype']}"
    if report.get("control"):
        stem += f"-control-{report['control']}"
    return model_dir(report_dir, report["model"]) / (safe_name(stem) + ".json")


def case_name(report: dict) -> str:
    name = f"{report['layout_id']} {report['dtype']}"
    return name + (f" control={report['control']}" if report.get("control") else "")


# ---------------------------------------------------------------------------------- validation

def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_report(report, where: str = "report") -> dict:
    """Check the parts of the schema the renderers and the comparison rely on; raise
    :class:`ReportError` naming ``where`` (a file path, usually) and the offending key."""
    def bad(what):
        raise ReportError(f"{where}: {what}")

    if not isinstance(report, dict):
        bad(f"expected a JSON object, found {type(report).__name__}")
    schema = report.get("schema")
    if schema != SCHEMA:
        if isinstance(schema, str) and schema.startswith(SCHEMA_FAMILY):
            bad(f"unsupported schema version {schema!r} (this code reads {SCHEMA!r})")
        bad(f"'schema' is {schema!r}, expected {SCHEMA!r}")
    for key, kind in _REQUIRED.items():
        if key not in report:
            bad(f"missing key {key!r}")
        if not isinstance(report[key], kind):
            bad(f"{key!r} should be a {kind.__name__}, found {type(report[key]).__name__}")
    for key in ("model", "layout_id", "dtype"):
        if not report[key].strip():
            bad(f"{key!r} is empty")
    if report["verdict"] not in _VERDICTS:
        bad(f"'verdict' is {report['verdict']!r}, expected one of {_VERDICTS}")
    for key in _REQUIRED_METRICS:
        if key not in report["metrics"]:
            bad(f"metrics lack {key!r}")
    for section in ("metrics", "thresholds"):
        for key, value in report[section].items():
            if value is not None and not _is_number(value):
                bad(f"{section}.{key} should be a number or null, found {value!r}")
    for i, layer in enumerate(report["layers"]):
        if not isinstance(layer, dict) or "probe" not in layer or "rel_mean_diff" not in layer:
            bad(f"layers[{i}] should be an object with 'probe' and 'rel_mean_diff'")
        if layer["rel_mean_diff"] is not None and not _is_number(layer["rel_mean_diff"]):
            bad(f"layers[{i}].rel_mean_diff should be a number, found {layer['rel_mean_diff']!r}")
    if not all(isinstance(f, str) for f in report["failures"]):
        bad("'failures' should be a list of strings")
    if report.get("control") is not None and not isinstance(report["control"], str):
        bad(f"'control' should be a string or null, found {type(report['control']).__name__}")
    for key in ("first_diverging", "calibration", "per_input", "versions", "timing"):
        if report.get(key) is not None and not isinstance(report[key], dict):
            bad(f"{key!r} should be an object or null, found {type(report[key]).__name__}")
    if report.get("first_diverging") is not None and "probe" not in report["first_diverging"]:
        bad("'first_diverging' lacks 'probe'")
    return report


# ----------------------------------------------------------------------------------- load/write

def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide reports from other users of a shared dir
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def canonical_json(report: dict) -> str:
    return json.dumps(report, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def write_report(report: dict, report_dir) -> Path:
    """Validate ``report`` and write ``REPORT_DIR/<model>/<layout_id>-<dtype>.json`` (sorted keys,
    indented) and its Markdown rendering (same name, ``.md``). Returns the JSON path."""
    validate_report(report)
    path = report_path(report_dir, report)
    _atomic_write(path, canonical_json(report))
    _atomic_write(path.with_suffix(".md"), render_markdown(report))
    return path


def _read_one(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot read: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if isinstance(schema, str) and not schema.startswith(SCHEMA_FAMILY):
        return None  # another kind of document (a benchmark, ...) shares the directory
    return validate_report(data, str(path))


def _load_pairs(paths: Iterable[Path]) -> list[tuple[Path, dict]]:
    pairs, seen = [], {}
    for path in sorted(paths):
        report = _read_one(path)
        if report is None:
            continue
        key = case_key(report)
        if key in seen:
            raise ReportError(f"{path}: case {key} also reported by {seen[key]}")
        seen[key] = path
        pairs.append((path, report))
    pairs.sort(key=lambda pr: (pr[1]["model"], case_sort_key(pr[1])))
    return pairs


def load_reports_with_paths(report_dir) -> list[tuple[Path, dict]]:
    """Like :func:`load_reports`, with the file each report came from."""
    root = Path(report_dir)
    if not root.is_dir():
        raise ReportError(f"{root}: no such report directory")
    return _load_pairs(root.glob("*/*.json"))


def load_reports(report_dir) -> list[dict]:
    """Every report under ``REPORT_DIR/*/*.json``, schema-checked, sorted by model then case.
    Raises :class:`ReportError` naming the file for unreadable JSON, a malformed report, or two
    files reporting the same (model, layout_id, dtype)."""
    return [report for _, report in load_reports_with_paths(report_dir)]


# ------------------------------------------------------------------------------------ formatting

def case_sort_key(report: dict):
    layout = report.get("layout") or {}

    def num(key, default=1):
        value = layout.get(key, default)
        return value if _is_number(value) else default

    dtype_rank = {"fp32": 0, "bf16": 1, "fp16": 2}.get(report["dtype"], 9)
    return (num("tp"), num("pp"), num("vpp"), bool(layout.get("sp")), report["layout_id"],
            dtype_rank, report["dtype"], report.get("control") or "")


def fmt(value, metric: str | None = None) -> str:
    """A metric value for tables: scientific for differences, fixed for ratios and losses."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not _is_number(value):
        return str(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if metric and (metric.startswith(("top1", "cosine"))):
        return f"{value:.6f}"
    if metric and metric.startswith("loss"):
        return f"{value:.4f}"
    return f"{value:.2e}"


def ordered_metrics(metrics: dict) -> list[str]:
    known = [m for m in METRIC_ORDER if m in metrics]
    return known + sorted(m for m in metrics if m not in METRIC_ORDER)


def metric_limit(thresholds: dict, metric: str):
    """``(bound, kind)`` for ``metric`` from a report's thresholds: ``thresholds[metric]`` or
    ``thresholds[metric + '_max']`` is an upper bound ("max"), ``thresholds[metric + '_min']`` a
    lower bound ("min"); ``(None, None)`` when the metric has no threshold."""
    for key, kind in ((metric, "max"), (metric + "_max", "max"), (metric + "_min", "min")):
        if _is_number(thresholds.get(key)):
            return thresholds[key], kind
    return None, None


def metric_status(value, bound, kind) -> str | None:
    """``"pass"`` / ``"fail"`` of ``value`` against a bound, ``None`` without a bound, "nan" for a NaN or
    missing value (e.g. the *_with_loss metrics of inputs without loss tokens)."""
    if bound is None:
        return None
    if not _is_number(value) or math.isnan(value):
        return "nan"
    return "pass" if (value <= bound if kind == "max" else value >= bound) else "fail"


def layout_text(layout: dict) -> str:
    parts = [f"{k}={layout[k]}" for k in ("tp", "pp", "vpp", "ep", "etp", "cp") if k in layout]
    if "sp" in layout:
        parts.append(f"sp={'on' if layout['sp'] else 'off'}")
    for key in ("first_stage_layers", "last_stage_layers"):
        if layout.get(key) is not None:
            parts.append(f"{key}={layout[key]}")
    return " ".join(parts)


def calibration_by_probe(report: dict) -> dict[str, float]:
    """The HF bf16-vs-fp32 per-probe drift of a bf16 report, keyed by probe name. The runner may
    write ``calibration.layers`` as numbers aligned with ``layers`` or as objects with ``probe``."""
    calib = report.get("calibration") or {}
    values = calib.get("layers") or []
    out = {}
    for i, entry in enumerate(values):
        if isinstance(entry, dict):
            if "probe" in entry and _is_number(entry.get("rel_mean_diff")):
                out[entry["probe"]] = entry["rel_mean_diff"]
        elif _is_number(entry) and i < len(report["layers"]):
            out[report["layers"][i]["probe"]] = entry
    return out


def _calib_label(report: dict) -> str:
    """Legend of the calibration: HF's own low-precision run against its fp32 run."""
    return f"HF {report['dtype']} vs fp32"


def _first_probe(report: dict) -> str | None:
    first = report.get("first_diverging")
    return first.get("probe") if first else None


# -------------------------------------------------------------------------------------- Markdown

def _md(text) -> str:
    """Text for a Markdown table cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _code(text) -> str:
    text = str(text).replace("\n", " ")
    fence = "``" if "`" in text else "`"
    return f"{fence}{text}{fence}" if fence == "`" else f"{fence} {text} {fence}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]  # cells are escaped by the callers
    return lines


def render_markdown(report: dict) -> str:
    """The Markdown page of one report: header, metrics vs thresholds, failures, first diverging
    layer with its parameters, per-input metrics, per-layer drift."""
    r = report
    verdict = r["verdict"].upper()
    control = r.get("control")
    out = [f"# {r['model']} · {r['layout_id']} · {r['dtype']}" + (f" · control {control}" if control else "")
           + f" — {verdict}", ""]
    if control:
        out += [f"Negative control: a deliberate error ({_code(control)}) injected on the Megatron side; "
                f"the harness is expected to FAIL this case ({'caught' if r['verdict'] == 'fail' else 'MISSED'}).", ""]
    versions = r.get("versions") or {}
    timing = r.get("timing") or {}
    info = [
        ("verdict", f"**{verdict}**"),
        ("model", _md(r["model"])),
        ("source", _md(r.get("source", "—"))),
        ("family", _md(r.get("family", "—"))),
        ("layout", _md(f"{r['layout_id']} ({layout_text(r['layout'])})")),
        ("dtype", _md(r["dtype"])),
        ("device", _md(f"{r.get('device', '—')}, world size {r.get('world_size', '—')}")),
        ("versions", _md(", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or "—")),
        ("timing", _md(", ".join(f"{k} {v:.2f}" if _is_number(v) else f"{k} {v}"
                                 for k, v in timing.items()) or "—")),
        ("inputs", _md(", ".join(f"{i.get('name')} ({i.get('tokens', '?')} tokens, "
                                 f"{i.get('loss_tokens', '?')} loss tokens)"
                                 for i in r.get("inputs") or []) or "—")),
        ("created", _md(r.get("created", "—"))),
    ] + ([("control", _md(control))] if control else [])
    out += _table(["", ""], [[k, v] for k, v in info]) + [""]

    calib = (r.get("calibration") or {}).get("hf_bf16_vs_fp32") or {}
    out += ["## Metrics (Megatron vs HF reference)", ""]
    header = ["metric", "value", "threshold", "result"] + ([_calib_label(r)] if calib else [])
    rows = []
    for m in ordered_metrics(r["metrics"]):
        value = r["metrics"][m]
        bound, kind = metric_limit(r["thresholds"], m)
        status = metric_status(value, bound, kind)
        row = [m, fmt(value, m),
               "" if bound is None else ("≤ " if kind == "max" else "≥ ") + fmt(bound, m),
               {"pass": "pass", "fail": "**FAIL**", "nan": "NaN", None: ""}[status]]
        if calib:
            row.append(fmt(calib.get(m), m))
        rows.append([_md(c) if i != 3 else c for i, c in enumerate(row)])
    out += _table(header, rows) + [""]

    out += ["## Failures", ""]
    out += [f"- {_code(f)}" for f in r["failures"]] or ["none"]
    out += [""]

    out += ["## First diverging layer", ""]
    first = r.get("first_diverging")
    if not first:
        out += ["none: every probe stays within its drift threshold", ""]
    else:
        layer = first.get("layer")
        out += [f"**{_md(first['probe'])}**" + (f" (layer {layer})" if layer is not None else "")
                + f", relative mean drift {fmt(first.get('rel_mean_diff'))}", ""]
        for side, key in (("HF parameters", "hf_params"), ("Megatron parameters", "mcore_params")):
            params = first.get(key) or []
            out += [f"{side}:", ""] + ([f"- {_code(p)}" for p in params] or ["- (none recorded)"]) + [""]

    per_input = r.get("per_input") or {}
    if per_input:
        out += ["## Per input", ""]
        cols = [m for m in KEY_METRICS if any(m in v for v in per_input.values() if isinstance(v, dict))]
        rows = [[_md(name)] + [fmt((vals or {}).get(m), m) for m in cols] for name, vals in per_input.items()]
        out += _table(["input"] + cols, rows) + [""]

    out += ["## Per-layer drift (relative mean |Δ| of hidden states)", ""]
    if not r["layers"]:
        out += ["no per-layer probes recorded", ""]
    else:
        cal = calibration_by_probe(r)
        first_probe = _first_probe(r)
        header = ["probe", "layer", "rel_mean_diff", "max_diff", "threshold", "ok"]
        header += [_calib_label(r)] if cal else []
        rows = []
        for layer in r["layers"]:
            ok = layer.get("ok")
            mark = "yes" if ok else ("**NO**" if ok is False else "—")
            if layer["probe"] == first_probe:
                mark += " ← first diverging"
            row = [_md(layer["probe"]), _md("" if layer.get("layer") is None else layer["layer"]),
                   fmt(layer.get("rel_mean_diff")), fmt(layer.get("max_diff")),
                   fmt(layer.get("threshold")), mark]
            if cal:
                row.append(fmt(cal.get(layer["probe"])))
            rows.append(row)
        out += _table(header, rows) + [""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ plot

def drift_plot_png(report: dict) -> bytes | None:
    """PNG of the per-layer drift of one report (log y): Megatron drift per probe, the threshold,
    the HF bf16-vs-fp32 calibration curve when present, failing probes and the first diverging
    probe marked. ``None`` when the report has no probes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullLocator

    layers = report["layers"]
    if not layers:
        return None
    probes = [str(layer["probe"]) for layer in layers]
    x = list(range(len(probes)))

    def series(values):
        return [v if _is_number(v) else math.nan for v in values]

    drift = series(layer.get("rel_mean_diff") for layer in layers)
    thresh = series(layer.get("threshold") for layer in layers)
    if all(math.isnan(t) for t in thresh) and _is_number(report["thresholds"].get("layer_rel_drift")):
        thresh = [report["thresholds"]["layer_rel_drift"]] * len(layers)
    cal_map = calibration_by_probe(report)
    calib = [cal_map.get(p, math.nan) for p in probes] if cal_map else None

    finite_pos = [v for v in drift + thresh + (calib or []) if math.isfinite(v) and v > 0]
    floor = min(finite_pos) / 10 if finite_pos else 1e-12
    top = max(finite_pos) * 10 if finite_pos else 1.0

    def plotted(values):  # log axis: 0 drawn at the floor, non-finite drawn apart
        return [max(v, floor) if math.isfinite(v) else math.nan for v in values]

    legend_in = 2.0  # the legend sits right of the axes, never over the data
    width, height = max(7.0, min(18.0, 0.32 * len(probes) + 3.0 + legend_in)), 3.8
    longest = max(len(p) for p in probes)
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    # fixed margins in inches (tight_layout would double the rendering time)
    fig.subplots_adjust(left=0.8 / width, right=1 - (legend_in + 0.1) / width, top=1 - 0.35 / height,
                        bottom=min(0.45, (0.25 + 0.055 * longest) / height))
    ax = fig.add_subplot(1, 1, 1)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}"))  # no mathtext: 3x faster
    ax.yaxis.set_minor_locator(NullLocator())  # a log axis' minor ticks are most of the drawing time
    ax.plot(x, plotted(drift), "o-", color="tab:blue", ms=4, lw=1.5, label="Megatron vs HF")
    if any(math.isfinite(t) for t in thresh):
        ax.plot(x, plotted(thresh), "--", color="tab:orange", lw=1.2, drawstyle="steps-mid",
                label="threshold")
    if calib:
        ax.plot(x, plotted(calib), "s:", color="tab:gray", ms=3, lw=1.2, label=_calib_label(report))
    bad = [i for i, layer in enumerate(layers) if layer.get("ok") is False and math.isfinite(drift[i])]
    if bad:
        ax.plot(bad, [max(drift[i], floor) for i in bad], "x", color="tab:red", ms=8, mew=2,
                label="over threshold")
    nonfinite = [i for i, v in enumerate(drift) if not math.isfinite(v) and _is_number(layers[i].get("rel_mean_diff"))]
    if nonfinite:
        ax.plot(nonfinite, [top] * len(nonfinite), "^", color="tab:red", ms=9, label="NaN / inf")
    first = _first_probe(report)
    if first in probes:
        i = probes.index(first)
        ax.axvline(i, color="tab:red", ls=":", lw=1.2)
        right = i > (len(probes) - 1) / 2
        ax.annotate(f"first diverging: {first}", xy=(i, 1.0), xycoords=ax.get_xaxis_transform(),
                    xytext=(-4 if right else 4, -4), textcoords="offset points", color="tab:red",
                    fontsize=8, va="top", ha="right" if right else "left",
                    bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8})
    zeros = [i for i, v in enumerate(drift) if math.isfinite(v) and v <= 0]
    if zeros:
        ax.plot(zeros, [floor] * len(zeros), "o", color="tab:blue", mfc="white", ms=5,
                label=f"exactly 0 (drawn at {floor:.0e})")
    ax.set_ylim(floor / 2, top * 2)
    step = max(1, math.ceil(len(probes) / 40))
    ax.set_xticks(x[::step])
    ax.set_xticklabels(probes[::step], rotation=60, ha="right", fontsize=7)
    ax.set_xlim(-0.5, len(probes) - 0.5)
    ax.set_ylabel("relative mean |Δ|")
    ax.set_title(f"{report['model']} · {report['layout_id']} · {report['dtype']} — "
                 f"{report['verdict'].upper()}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ HTML

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
code { font-size: 0.9em; }
.pass { color: #176c2a; font-weight: bold; }
.fail { color: #b00020; font-weight: bold; }
.nan { color: #8a5a00; font-weight: bold; }
.case { border-top: 1px solid #ddd; margin-top: 2em; }
.meta { color: #555; font-size: 0.9em; }
img { max-width: 100%; }
"""


def _page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _e(text) -> str:
    return html.escape(str(text))


def _verdict_html(report: dict) -> str:
    verdict = report["verdict"]
    cls = "pass" if verdict == "pass" else "fail"
    text = _e(verdict.upper())
    if report.get("control"):  # a negative control must fail
        text += " (caught)" if verdict == "fail" else " (control missed!)"
    return f'<span class="{cls}">{text}</span>'


def _anchor(report: dict) -> str:
    return "case-" + report_path(".", report).stem


def _case_frame(reports: list[dict]):
    """pandas DataFrame of a model's cases (already HTML-safe strings, one row per case)."""
    import pandas as pd

    rows = []
    for r in reports:
        row = {
            "case": f'<a href="#{_anchor(r)}">{_e(r["layout_id"])}</a>',
            "dtype": _e(r["dtype"]),
            "device": _e(r.get("device", "—")),
            "world": _e(r.get("world_size", "—")),
        }
        for m in KEY_METRICS:
            row[m] = _e(fmt(r["metrics"].get(m), m))
        row["first diverging"] = _e(_first_probe(r) or "—")
        row["failures"] = _e(len(r["failures"]))
        row["verdict"] = _verdict_html(r)
        if any(x.get("control") for x in reports):
            row["control"] = _e(r.get("control") or "")
        rows.append(row)
    return pd.DataFrame(rows)


def _case_section(path_name: str, r: dict) -> list[str]:
    out = [f'<section class="case" id="{_anchor(r)}">',
           f"<h2>{_e(r['layout_id'])} · {_e(r['dtype'])}"
           + (f" · control <code>{_e(r['control'])}</code>" if r.get("control") else "")
           + f" {_verdict_html(r)}</h2>"]
    versions = ", ".join(f"{k} {v}" for k, v in sorted((r.get("versions") or {}).items()))
    timing = r.get("timing") or {}
    total = timing.get("total_s")
    out.append(f'<p class="meta">layout {_e(layout_text(r["layout"]))} · device {_e(r.get("device", "—"))}'
               f" · world size {_e(r.get('world_size', '—'))}"
               + (f" · {total:.1f} s" if _is_number(total) else "")
               + (f" · {_e(versions)}" if versions else "")
               + (f" · {_e(r['created'])}" if r.get("created") else "") + "</p>")
    if r["failures"]:
        out.append("<p><b>Failures</b></p><ul>" + "".join(f"<li><code>{_e(f)}</code></li>" for f in r["failures"])
                   + "</ul>")
    first = r.get("first_diverging")
    if first:
        hf = first.get("hf_params") or []
        mc = first.get("mcore_params") or []
        out.append(f"<p><b>First diverging probe:</b> <code>{_e(first['probe'])}</code>, relative mean drift "
                   f"{_e(fmt(first.get('rel_mean_diff')))}</p>")
        out.append("<table><tr><th>HF parameters</th><th>Megatron parameters</th></tr><tr><td>"
                   + "<br>".join(f"<code>{_e(p)}</code>" for p in hf) + "</td><td>"
                   + "<br>".join(f"<code>{_e(p)}</code>" for p in mc) + "</td></tr></table>")
    png = drift_plot_png(r)
    if png:
        out.append(f'<img alt="per-layer drift of {_e(case_name(r))}" '
                   f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')
    else:
        out.append("<p>no per-layer probes recorded</p>")
    # metrics vs thresholds (and the HF bf16 calibration, when measured)
    calib = (r.get("calibration") or {}).get("hf_bf16_vs_fp32") or {}
    head = "<tr><th>metric</th><th>value</th><th>threshold</th><th>result</th>" + (
        f"<th>{_e(_calib_label(r))}</th>" if calib else "") + "</tr>"
    body = []
    for m in ordered_metrics(r["metrics"]):
        value = r["metrics"][m]
        bound, kind = metric_limit(r["thresholds"], m)
        status = metric_status(value, bound, kind)
        cells = [_e(m), _e(fmt(value, m)),
                 "" if bound is None else ("&le; " if kind == "max" else "&ge; ") + _e(fmt(bound, m)),
                 "" if status is None else f'<span class="{status}">{status.upper() if status == "nan" else status}</span>']
        if calib:
            cells.append(_e(fmt(calib.get(m), m)))
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("<details><summary>metrics and thresholds</summary><table>" + head + "".join(body)
               + "</table></details>")
    stem = Path(path_name).stem
    out.append(f'<p class="meta">files: <a href="{_e(stem)}.json">{_e(stem)}.json</a> · '
               f'<a href="{_e(stem)}.md">{_e(stem)}.md</a></p>')
    out.append("</section>")
    return out


def render_model_page(report_dir, model: str) -> Path:
    """Write ``REPORT_DIR/<model>/index.html``: a table of every (layout, dtype) case of ``model``
    and, per case, its failures, first diverging probe and an embedded per-layer drift plot."""
    directory = model_dir(report_dir, model)
    pairs = [(p, r) for p, r in _load_pairs(directory.glob("*.json")) if r["model"] == model]
    if not pairs:
        raise ReportError(f"{directory}: no reports for model {model!r}")
    reports = [r for _, r in pairs]
    s = _summary(model, reports)
    first = reports[0]
    body = ['<p><a href="../index.html">&larr; all models</a></p>',
            f"<h1>{_e(model)}</h1>",
            f'<p class="meta">source {_e(first.get("source", "—"))} · family {_e(first.get("family", "—"))} · '
            f"{s['cases']} cases: <span class=\"pass\">{s['pass']} pass</span>, "
            f"<span class=\"fail\">{s['fail']} fail</span>"
            + (f" · negative controls caught: {s['controls_caught']} of {s['controls']}" if s["controls"] else "")
            + "</p>",
            _case_frame(reports).to_html(index=False, escape=False, border=0, classes="cases")]
    for path, r in pairs:
        body += _case_section(path.name, r)
    out = directory / "index.html"
    _atomic_write(out, _page(f"mcore-bridge verification: {model}", body))
    return out


def _badness(value: float) -> float:
    """Sort key of a lower-is-better value: NaN is the worst of all."""
    return math.inf if math.isnan(value) else value


def _summary(model: str, rs: list[dict]) -> dict:
    """Counts of one model. Negative controls are counted apart: they are meant to fail."""
    real = [r for r in rs if not r.get("control")]
    controls = [r for r in rs if r.get("control")]
    measured = [r for r in real if _is_number(r["metrics"].get("max_diff"))]
    worst = max(measured, key=lambda r: _badness(r["metrics"]["max_diff"]), default=None)
    return {
        "model": model, "family": rs[0].get("family", "—"), "cases": len(real),
        "pass": sum(r["verdict"] == "pass" for r in real),
        "fail": sum(r["verdict"] != "pass" for r in real),
        "worst_max_diff": worst["metrics"]["max_diff"] if worst else None,
        "worst_case": case_name(worst) if worst else "—",
        "controls": len(controls), "controls_caught": sum(r["verdict"] == "fail" for r in controls),
        "reports": rs,
    }


def _model_summaries(reports: list[dict]) -> list[dict]:
    by_model = defaultdict(list)
    for r in reports:
        by_model[r["model"]].append(r)
    return [_summary(model, by_model[model]) for model in sorted(by_model)]


def render_index(report_dir) -> list[Path]:
    """Write ``REPORT_DIR/index.html`` and ``REPORT_DIR/index.md``: every model with its number of
    passing and failing cases, its worst max_diff and a link to its page (negative controls are
    counted apart, as "caught k of n"), then, in the Markdown, every case with a link to its page."""
    root = Path(report_dir)
    summaries = _model_summaries(load_reports(root))
    total_pass = sum(s["pass"] for s in summaries)
    total_fail = sum(s["fail"] for s in summaries)
    with_controls = any(s["controls"] for s in summaries)
    header = ["model", "family", "cases", "pass", "fail", "worst max_diff", "worst case"]
    header += ["controls caught"] if with_controls else []
    n_models, n_cases = len(summaries), total_pass + total_fail
    totals = (f"{n_models} model{'s' * (n_models != 1)}, {n_cases} case{'s' * (n_cases != 1)}: "
              f"{total_pass} pass, {total_fail} fail")

    rows = []
    for s in summaries:
        link = f"{safe_name(s['model'])}/index.html"
        cells = [f'<a href="{_e(link)}">{_e(s["model"])}</a>', _e(s["family"]), s["cases"],
                 f'<span class="pass">{s["pass"]}</span>' if s["pass"] else "0",
                 f'<span class="fail">{s["fail"]}</span>' if s["fail"] else "0",
                 _e(fmt(s["worst_max_diff"], "max_diff")), _e(s["worst_case"])]
        if with_controls:
            cells.append(f"{s['controls_caught']} of {s['controls']}" if s["controls"] else "—")
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    body = ["<h1>mcore-bridge verification reports</h1>", f'<p class="meta">{_e(totals)}</p>']
    if with_controls:
        body.append('<p class="meta">negative controls (a deliberate error injected on the Megatron side) '
                    "are not in the pass/fail counts; they are caught when they fail</p>")
    if rows:
        body.append("<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"
                    + "".join(rows) + "</table>")
    else:
        body.append("<p>no reports</p>")
    html_path = root / "index.html"
    _atomic_write(html_path, _page("mcore-bridge verification reports", body))

    md = ["# mcore-bridge verification reports", "", totals, ""]
    md_rows = []
    for s in summaries:
        row = [f"[{_md(s['model'])}]({safe_name(s['model'])}/index.html)", _md(s["family"]), str(s["cases"]),
               str(s["pass"]), str(s["fail"]), fmt(s["worst_max_diff"], "max_diff"), _md(s["worst_case"])]
        if with_controls:
            row.append(f"{s['controls_caught']} of {s['controls']}" if s["controls"] else "—")
        md_rows.append(row)
    md += _table(header, md_rows) + ["", "## Cases", ""]
    case_rows = []
    for s in summaries:
        for r in s["reports"]:
            rel = report_path(".", r).with_suffix(".md").as_posix()
            verdict = r["verdict"].upper() + (f" (control {r['control']})" if r.get("control") else "")
            case_rows.append([_md(r["model"]), _md(r["layout_id"]), _md(r["dtype"]), _md(r.get("device", "—")),
                              fmt(r["metrics"].get("max_diff"), "max_diff"),
                              fmt(r["metrics"].get("top1_agreement"), "top1_agreement"),
                              _md(verdict), f"[md]({rel})"])
    md += _table(["model", "layout", "dtype", "device", "max_diff", "top1", "verdict", "report"], case_rows) + [""]
    md_path = root / "index.md"
    _atomic_write(md_path, "\n".join(md))
    return [html_path, md_path]


def render_all(report_dir) -> list[Path]:
    """Render every model page under ``report_dir`` and the index (the CLI's ``report --render``).
    Returns the paths written. Raises :class:`ReportError` for a missing directory or a malformed
    report (naming the file)."""
    root = Path(report_dir)
    reports = load_reports(root)
    dirs = {}
    for r in reports:
        d = safe_name(r["model"])
        if dirs.setdefault(d, r["model"]) != r["model"]:
            raise ReportError(f"models {dirs[d]!r} and {r['model']!r} share the directory {root / d}")
    written = [render_model_page(root, model) for model in sorted(set(dirs.values()))]
    return written + render_index(root)


def main(argv: list[str] | None = None) -> int:
    """``python -m verify.report DIR``: render every page under DIR; 0 on success, 2 on bad input."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m verify.report", description=render_all.__doc__)
    parser.add_argument("report_dir")
    args = parser.parse_args(argv)
    try:
        paths = render_all(args.report_dir)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
