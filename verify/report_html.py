"""HTML pages for verification reports: per-model pages (a table across layouts, per-layer drift
plots embedded as PNG) and the index (``index.html`` + ``index.md``). The canonical JSON, its
validation and the Markdown rendering live in ``verify.report``.

    render_model_page(report_dir, model: str) -> Path    # REPORT_DIR/<model>/index.html
    render_index(report_dir) -> list[Path]               # REPORT_DIR/index.html and REPORT_DIR/index.md
    render_all(report_dir) -> list[Path]                 # every model page, then the index

Also runnable as ``python -m verify.report_html DIR`` (renders everything).
"""

from __future__ import annotations

import base64
import html
import io
import math
import sys
from collections import defaultdict
from pathlib import Path

from .report import (KEY_METRICS, ReportError, _atomic_write, _calib_label, _first_probe, _is_number, _load_pairs, _md, _table, calibration_by_probe, case_name, fmt, layout_text, load_reports, metric_limit, metric_status, model_dir, ordered_metrics, report_path, safe_name)


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


def overlay_plot_png(model: str, reports: list[dict]) -> bytes | None:
    """PNG of the per-layer drift of every case of one model on one axis (log y), a line and a
    legend entry per case (``layout · dtype``), each dtype's threshold dashed: which layout drifts,
    at a glance. Negative controls (meant to fail) are left out. ``None`` without probes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullLocator

    cases = [r for r in reports if not r.get("control") and r["layers"]]
    if not cases:
        return None
    probes = list(dict.fromkeys(str(layer["probe"]) for r in cases for layer in r["layers"]))
    where = {p: i for i, p in enumerate(probes)}

    def number(v):
        return v if _is_number(v) else math.nan

    lines = []  # (label, xs, values, style); earlier cases (drawn under) with larger markers: overlaps show
    for k, r in enumerate(cases):
        xs = [where[str(layer["probe"])] for layer in r["layers"]]
        lines.append((f"{r['layout_id']} · {r['dtype']}", xs, [number(l.get("rel_mean_diff")) for l in r["layers"]],
                      dict(marker="osD^v<>ph*"[k % 10], ms=max(3, 8 - k), lw=1.3, color=f"C{k % 10}",
                           ls="-" if k < 10 else "-.")))
    for dtype in dict.fromkeys(r["dtype"] for r in cases):
        first = next(r for r in cases if r["dtype"] == dtype)
        thresh = [number(layer.get("threshold")) for layer in first["layers"]]
        if all(math.isnan(t) for t in thresh):
            thresh = [number(first["thresholds"].get("layer_rel_drift"))] * len(thresh)
        lines.append((f"threshold · {dtype}", [where[str(layer["probe"])] for layer in first["layers"]], thresh,
                      dict(color="0.35" if dtype == "fp32" else "tab:orange", ls="--", lw=1.1,
                           drawstyle="steps-mid")))
    finite_pos = [v for _, _, values, _ in lines for v in values if math.isfinite(v) and v > 0]
    floor = min(finite_pos) / 10 if finite_pos else 1e-12
    top = max(finite_pos) * 10 if finite_pos else 1.0

    legend_in = 2.4
    width, height = max(8.0, min(18.0, 0.32 * len(probes) + 3.0 + legend_in)), 4.4
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.8 / width, right=1 - (legend_in + 0.1) / width, top=1 - 0.35 / height,
                        bottom=min(0.45, (0.25 + 0.055 * max(len(p) for p in probes)) / height))
    ax = fig.add_subplot(1, 1, 1)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}"))
    ax.yaxis.set_minor_locator(NullLocator())
    for label, xs, values, style in lines:  # 0 drawn at the floor (log axis), NaN/inf left as gaps
        ax.plot(xs, [max(v, floor) if math.isfinite(v) else math.nan for v in values], label=label, **style)
    ax.set_ylim(floor / 2, top * 2)
    step = max(1, math.ceil(len(probes) / 40))
    ax.set_xticks(list(range(len(probes)))[::step])
    ax.set_xticklabels(probes[::step], rotation=60, ha="right", fontsize=7)
    ax.set_xlim(-0.5, len(probes) - 0.5)
    ax.set_ylabel("relative mean |Δ|")
    ax.set_title(f"{model} · per-layer drift, every case (0 drawn at {floor:.0e})", fontsize=10)
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
table.cases { display: block; overflow-x: auto; }
table.cases td { white-space: nowrap; }
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


def summary_metrics(reports: list[dict]) -> list[str]:
    """Columns of a model's case table: ``KEY_METRICS`` and every metric the verdicts of these
    cases are gated on (``verify.metrics.gated_metrics`` of each case's dtype, gate and routing:
    router agreement for MoE models, top-1 over loss tokens for vision-language ones)."""
    from .metrics import gated_metrics

    out = list(KEY_METRICS)
    for r in reports:
        moe = "router_agreement" in r["metrics"] or "router_agreement_min" in r["thresholds"]
        out += [m for m in gated_metrics(r["dtype"], r.get("gate", "all"), moe) if m not in out]
    return out


def _case_frame(reports: list[dict]):
    """pandas DataFrame of a model's cases (already HTML-safe strings, one row per case)."""
    import pandas as pd

    columns = summary_metrics(reports)
    rows = []
    for r in reports:
        row = {
            "case": f'<a href="#{_anchor(r)}">{_e(r["layout_id"])}</a>',
            "dtype": _e(r["dtype"]),
            "device": _e(r.get("device", "—")),
            "world": _e(r.get("world_size", "—")),
        }
        for m in columns:
            row[m] = _e(fmt(r["metrics"].get(m), m))
        row["first diverging"] = _e(_first_probe(r) or "—")
        row["failures"] = _e(len(r["failures"]))
        row["verdict"] = _verdict_html(r)
        if any(x.get("control") for x in reports):
            row["control"] = _e(r.get("control") or "")
        rows.append(row)
    frame = pd.DataFrame(rows)
    # long metric names may wrap at their underscores: the table fits the page
    frame.columns = [c.replace("_", "_<wbr>") for c in frame.columns]
    return frame


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
            + "</p>"]
    overlay = overlay_plot_png(model, reports)  # first: which layout drifts, at a glance
    if overlay:
        body.append(f'<img alt="per-layer drift of every case of {_e(model)}" '
                    f'src="data:image/png;base64,{base64.b64encode(overlay).decode("ascii")}">')
    body.append(_case_frame(reports).to_html(index=False, escape=False, border=0, classes="cases"))
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
    """``python -m verify.report_html DIR``: render every page under DIR; 0 on success, 2 on bad input."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m verify.report_html", description=render_all.__doc__)
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
