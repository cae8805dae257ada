"""Verification reports: canonical JSON on disk, Markdown next to it, HTML pages and an index.

Entry points::

    write_report(report: dict, report_dir) -> Path       # REPORT_DIR/<model>/<layout_id>-<dtype>.json (+ .md)
    load_reports(report_dir) -> list[dict]               # every REPORT_DIR/*/*.json, schema-checked

HTML pages and the index are rendered by ``verify.report_html`` (``render_all(report_dir)``).

One report is one (model, layout, dtype) case, a dict in the ``mcore-bridge-verify/1`` schema written
by the verification runner (keys: schema, model, source, family, layout, layout_id, dtype, device,
world_size, versions, timing, inputs, metrics, per_input, thresholds, layers, first_diverging,
calibration, failures, verdict, created). The verdict and the failures are the runner's; this module
only presents them (per-metric pass/fail marks are recomputed from ``thresholds`` for display).

A report with a ``control`` key (a negative control: a deliberate error injected on the Megatron
side, see verify/controls.py) is its own case, ``<layout_id>-<dtype>-control-<spec>.json``, so it
never replaces the real one; pages mark it "caught" when it fails, and the index counts controls
apart from the pass/fail counts.

Errors: :class:`ReportError` (a ``mcore_bridge.errors.VerificationError``, so a ``ValueError``), its message starting with the offending file.

Files: the model's name and the case's ``<layout_id>-<dtype>`` become file names with every
character outside ``[A-Za-z0-9._-]`` replaced by ``_`` (so ``Qwen/Qwen3-8B`` lives in
``REPORT_DIR/Qwen_Qwen3-8B/``). JSON files under REPORT_DIR/*/ whose ``schema`` names another
kind of document (not ``mcore-bridge-verify/...``) are skipped; any other unreadable or malformed
file is an error naming the file.

Pages are self-contained: CSS inline, plots embedded as base64 PNG (matplotlib, Agg canvas, no
pyplot state); every text taken from a report is HTML-escaped. HTML rendering: ``verify.report_html``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable

from mcore_bridge.errors import VerificationError

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


class ReportError(VerificationError):
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
    if metric and (metric.startswith(("top1", "cosine", "router_agreement"))):
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
    """Legend of the calibration: HF's own run at the verified dtype against its more precise run
    (fp32 for bf16; fp64 for a calibrated fp32 check)."""
    against = (report.get("calibration") or {}).get("against", "fp32")
    return f"HF {report['dtype']} vs {against}"


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
    from .detection import line as detection_line

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
                                 f"{i.get('loss_tokens', '?')} loss tokens"
                                 f"{', images ' + str(i['images']) if i.get('images') else ''})"
                                 for i in r.get("inputs") or []) or "—")),
        ("created", _md(r.get("created", "—"))),
    ] + ([("control", _md(control))] if control else []) + (
        [("detection", _md(detection_line(r["detection"]).removeprefix("detection: ")))] if r.get("detection") else []) + (
        [("gate", "loss tokens only: image and prompt logits are reported, not gated")]
        if r.get("gate") == "with_loss" else [])
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
        if first.get("cause") == "routing":
            out += [f"Cause: **routing** — only {fmt(first.get('router_agreement'), 'router_agreement')} of the tokens reach the "
                    f"same experts on both sides: look at the router weight, its bias and the router "
                    f"settings before the expert weights.", ""]
        elif first.get("cause") == "weights" and any("router_agreement" in x for x in r["layers"]):
            out += ["Cause: **weights** — routing agrees, the layer's own weights (or their layout) differ.", ""]
        for side, key in (("HF parameters", "hf_params"), ("Megatron parameters", "mcore_params")):
            params = first.get(key) or []
            out += [f"{side}:", ""] + ([f"- {_code(p)}" for p in params] or ["- (none recorded)"]) + [""]

    from .isolate import markdown as isolation_markdown

    out += isolation_markdown(r)
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
        routed = any("router_agreement" in x for x in r["layers"])
        header = ["probe", "layer", "rel_mean_diff", "max_diff", "threshold", "ok"]
        header += ["router agreement"] if routed else []
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
            if routed:
                row.append(fmt(layer.get("router_agreement"), "router_agreement") if "router_agreement" in layer else "")
            if cal:
                row.append(fmt(cal.get(layer["probe"])))
            rows.append(row)
        out += _table(header, rows) + [""]
    mtp = r.get("mtp")
    if mtp:  # multi-token-prediction heads, against our reference (transformers runs no MTP)
        out += ["## Multi-token prediction heads", "", f"Reference: {_md(mtp['reference'])}", ""]
        cols = ["rel_mean_diff", "max_diff", "mean_diff", "top1_agreement", "kl_hf_mg"]
        cols += ["router_agreement"] if any("router_agreement" in d for d in mtp["depths"]) else []  # MoE MTP layers
        rows = [[_md(d["probe"])] + [fmt(d.get(m), m) for m in cols] + ["yes" if d.get("ok") else "**NO**"]
                for d in mtp["depths"]]
        out += _table(["depth"] + cols + ["ok"], rows) + [""]
    return "\n".join(out)
