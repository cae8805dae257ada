"""Report rendering (verify/report.py, verify/report_html.py): canonical JSON, Markdown, HTML pages, index."""

from __future__ import annotations

import base64
import json
import math
import re

import pytest

from tests.report_factory import make_report
from verify.report import ReportError, load_reports, render_markdown, report_path, write_report
from verify.report_html import render_all, render_index, render_model_page

PNG = "data:image/png;base64,"


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    """Two models, rendered once (read-only for the tests): qwen3-tiny with 3 layouts x 2 dtypes
    (one bf16 case fails at layer 2) and llama-tiny with one passing and one failing case.
    Yields ``(directory, paths written by render_all)``."""
    d = tmp_path_factory.mktemp("reports")
    for layout_id in ("tp1-pp1", "tp2-pp1-sp", "tp1-pp2-vpp2"):
        for dtype in ("fp32", "bf16"):
            fail = layout_id == "tp1-pp2-vpp2" and dtype == "bf16"
            write_report(make_report("qwen3-tiny", layout_id, dtype, fail_at=2 if fail else None), d)
    write_report(make_report("llama-tiny", "tp2-pp2", "fp32"), d)
    write_report(make_report("llama-tiny", "tp1-pp4", "fp32", fail_at=0), d)
    return d, render_all(d)


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(re.escape(PNG) + r"([A-Za-z0-9+/=]+)", page)]


def _index_row(page: str, model_dir: str) -> list[str]:
    row = re.search(rf'<tr><td><a href="{re.escape(model_dir)}/index.html">.*?</tr>', page).group(0)
    return [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td>(.*?)</td>", row)]


# ---------------------------------------------------------------------------- JSON and Markdown

def test_write_report_canonical_json_and_markdown(tmp_path):
    report = make_report("qwen3-tiny", "tp2-pp1-sp", "fp32")
    path = write_report(report, tmp_path)
    assert path == tmp_path / "qwen3-tiny" / "tp2-pp1-sp-fp32.json"
    text = path.read_text()
    assert json.loads(text) == report
    assert text == json.dumps(report, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    md = path.with_suffix(".md").read_text()
    assert md.startswith("# qwen3-tiny · tp2-pp1-sp · fp32 — PASS")
    for text in ("| device | cpu, world size 2 |", "torch 2.13.0", "megatron_core 0.16.1", "tp=2 pp=1 vpp=1 sp=on",
                 "| max_diff | 4.00e-07 | ≤ 1.00e-03 | pass |", "| top1_agreement | 1.000000 | ≥ 0.990000 | pass |",
                 "## Failures", "none: every probe stays within", "| layer.3 | 3 |", "| final_norm |"):
        assert text in md, text
    # rewriting the same case replaces it (one file per case)
    write_report(make_report("qwen3-tiny", "tp2-pp1-sp", "fp32", fail_at=1), tmp_path)
    assert len(list((tmp_path / "qwen3-tiny").glob("*.json"))) == 1
    assert load_reports(tmp_path)[0]["verdict"] == "fail"


def test_markdown_names_first_diverging_layer_and_its_parameters():
    md = render_markdown(make_report("qwen3-tiny", "tp1-pp2-vpp2", "bf16", fail_at=2))
    assert md.startswith("# qwen3-tiny · tp1-pp2-vpp2 · bf16 — FAIL")
    first = md.split("## First diverging layer", 1)[1].split("##", 1)[0]
    assert "**layer.2** (layer 2)" in first
    assert "`model.layers.2.self_attn.q_proj.weight`" in first
    assert "`decoder.layers.2.self_attention.linear_qkv.weight`" in first
    assert "- `max_diff 1.0e+00 > 2.0e-01`" in md
    assert "| max_diff | 1.00e+00 | ≤ 2.00e-01 | **FAIL** |" in md
    assert "← first diverging" in md.split("## Per-layer drift", 1)[1]
    assert "HF bf16 vs fp32" in md  # calibration column of a bf16 report
    assert "| random-384 |" in md  # per-input table


def test_markdown_table_cells_escape_pipes():
    report = make_report("odd|name", failures=["a | b"], verdict="fail")
    md = render_markdown(report)
    assert "| model | odd\\|name |" in md
    assert "`a | b`" in md  # code span in a list, not a table cell


# ------------------------------------------------------------------------------------ HTML pages

def test_model_page_table_plots_and_verdicts(report_dir):
    report_dir, written = report_dir
    page_path = report_dir / "qwen3-tiny" / "index.html"
    assert page_path in written
    page = page_path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert not re.search(r'(src|href)="https?://', page)  # self-contained
    pngs = _pngs(page)
    assert len(pngs) == 7 and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)  # overlay + 6 cases
    table = page.split("<tbody>", 1)[1].split("</tbody>", 1)[0]  # DataFrame.to_html's body
    rows = re.findall(r"<tr>.*?</tr>", table, flags=re.S)
    assert len(rows) == 6
    cases = [(re.search(r'href="#case-[^"]+">([^<]+)</a>', r).group(1),
              re.findall(r"<td>(fp32|bf16)</td>", r)[0],
              "PASS" if ">PASS<" in r else "FAIL") for r in rows]
    assert cases == [("tp1-pp1", "fp32", "PASS"), ("tp1-pp1", "bf16", "PASS"),
                     ("tp1-pp2-vpp2", "fp32", "PASS"), ("tp1-pp2-vpp2", "bf16", "FAIL"),
                     ("tp2-pp1-sp", "fp32", "PASS"), ("tp2-pp1-sp", "bf16", "PASS")]
    assert "5 pass</span>, <span class=\"fail\">1 fail" in page
    # every case has a section the table links to, with its files
    for row in rows:
        anchor = re.search(r'href="#(case-[^"]+)"', row).group(1)
        assert f'id="{anchor}"' in page
    assert 'href="tp1-pp2-vpp2-bf16.json"' in page and 'href="tp1-pp2-vpp2-bf16.md"' in page
    failing = page.split('id="case-tp1-pp2-vpp2-bf16"', 1)[1].split("</section>", 1)[0]
    assert "<code>layer.2</code>" in failing
    assert "model.layers.2.self_attn.q_proj.weight" in failing
    assert "max_diff 1.0e+00 &gt; 2.0e-01" in failing  # failure text escaped


def test_html_escapes_names_and_failures(tmp_path):
    evil = 'evil<script>alert("x")</script>&co'
    write_report(make_report(evil, failures=["<img src=x onerror=alert(1)>"], verdict="fail"), tmp_path)
    render_all(tmp_path)
    dirs = [p.name for p in tmp_path.iterdir() if p.is_dir()]
    assert dirs == ["evil_script_alert__x____script__co"]  # a safe directory name
    for page in ((tmp_path / dirs[0] / "index.html").read_text(), (tmp_path / "index.html").read_text()):
        assert "<script>" not in page and "<img src=x" not in page
        assert "evil&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;co" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in (tmp_path / dirs[0] / "index.html").read_text()


def test_bf16_plot_and_edge_cases_render(tmp_path):
    """NaN metrics and drift, zero drift, no probes, no calibration: all render."""
    nan_layers = make_report("m", "tp1-pp1", "bf16")["layers"]
    nan_layers[3]["rel_mean_diff"] = float("nan")
    nan_layers[3]["ok"] = False
    write_report(make_report("m", "tp1-pp1", "bf16", layers=nan_layers,
                             metrics={"mean_diff_with_loss": float("nan")}), tmp_path)
    write_report(make_report("m", "tp2-pp1", "bf16", calibration=None), tmp_path)
    write_report(make_report("m", "tp4-pp1", "fp32", layers=[], first_diverging=None), tmp_path)
    page = render_model_page(tmp_path, "m").read_text()
    assert len(_pngs(page)) == 3  # the overlay of both cases with probes, and each one
    assert "no per-layer probes recorded" in page
    assert '<span class="nan">NAN</span>' in page
    assert "| mean_diff_with_loss | nan | ≤ 2.00e-02 | NaN |" in (tmp_path / "m" / "tp1-pp1-bf16.md").read_text()


# ------------------------------------------------------------------------------------------ index

def test_index_lists_models_with_pass_fail_counts(report_dir):
    report_dir, written = report_dir
    assert report_dir / "index.html" in written and report_dir / "index.md" in written
    page = (report_dir / "index.html").read_text()
    assert _index_row(page, "qwen3-tiny") == ["qwen3-tiny", "qwen3", "6", "5", "1", "1.00e+00", "tp1-pp2-vpp2 bf16"]
    assert _index_row(page, "llama-tiny") == ["llama-tiny", "llama", "2", "1", "1", "5.00e-03", "tp1-pp4 fp32"]
    assert "2 models, 8 cases: 6 pass, 2 fail" in page
    md = (report_dir / "index.md").read_text()
    assert "| [qwen3-tiny](qwen3-tiny/index.html) | qwen3 | 6 | 5 | 1 | 1.00e+00 | tp1-pp2-vpp2 bf16 |" in md
    assert "| [llama-tiny](llama-tiny/index.html) | llama | 2 | 1 | 1 |" in md
    assert md.count("[md](") == 8
    assert "| qwen3-tiny | tp1-pp2-vpp2 | bf16 | cpu | 1.00e+00 | 0.620000 | FAIL | " \
           "[md](qwen3-tiny/tp1-pp2-vpp2-bf16.md) |" in md


def test_negative_control_is_a_separate_case_counted_apart(tmp_path):
    write_report(make_report("qwen3-tiny", "tp2-pp1", "fp32"), tmp_path)
    path = write_report(make_report("qwen3-tiny", "tp2-pp1", "fp32", fail_at=2, control="swap_qk:2"), tmp_path)
    assert path.name == "tp2-pp1-fp32-control-swap_qk_2.json"
    assert len(load_reports(tmp_path)) == 2  # the control did not replace the real case
    render_all(tmp_path)
    page = (tmp_path / "index.html").read_text()
    assert _index_row(page, "qwen3-tiny") == ["qwen3-tiny", "qwen3", "1", "1", "0", "4.00e-07", "tp2-pp1 fp32",
                                              "1 of 1"]
    model_page = (tmp_path / "qwen3-tiny" / "index.html").read_text()
    assert "FAIL (caught)" in model_page and "negative controls caught: 1 of 1" in model_page
    assert "Negative control" in path.with_suffix(".md").read_text()


def test_empty_report_dir_renders_an_empty_index(tmp_path):
    assert render_all(tmp_path) == [tmp_path / "index.html", tmp_path / "index.md"]
    assert "no reports" in (tmp_path / "index.html").read_text()


# ------------------------------------------------------------------------------ malformed input

@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"model": "x"}', "'schema' is None"),
    ("MISSING_KEY", "missing key 'metrics'"),
    ("BAD_VERDICT", "'verdict' is 'maybe'"),
    ("BAD_METRIC", "metrics.max_diff should be a number"),
    ("NEW_SCHEMA", "unsupported schema version 'mcore-bridge-verify/2'"),
])
def test_malformed_report_names_the_file(tmp_path, content, message):
    write_report(make_report("good"), tmp_path)
    good = make_report("bad")
    variants = {
        "MISSING_KEY": {k: v for k, v in good.items() if k != "metrics"},
        "BAD_VERDICT": {**good, "verdict": "maybe"},
        "BAD_METRIC": {**good, "metrics": {**good["metrics"], "max_diff": "small"}},
        "NEW_SCHEMA": {**good, "schema": "mcore-bridge-verify/2"},
    }
    bad = tmp_path / "bad" / "tp1-pp1-fp32.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps(variants[content]) if content in variants else content)
    for call in (load_reports, render_all, render_index):
        with pytest.raises(ReportError, match=re.escape(str(bad)) + ".*" + re.escape(message)):
            call(tmp_path)


def test_write_report_refuses_a_malformed_report(tmp_path):
    with pytest.raises(ReportError, match="missing key 'layers'"):
        write_report({k: v for k, v in make_report().items() if k != "layers"}, tmp_path)
    assert not any(tmp_path.iterdir())


def test_other_documents_are_skipped_and_duplicates_refused(tmp_path):
    write_report(make_report("m", "tp1-pp1"), tmp_path)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "load.json").write_text(json.dumps({"schema": "mcore-bridge-bench/1", "x": 1}))
    (tmp_path / "top.json").write_text("not even json")  # not under */, not read
    assert [r["model"] for r in load_reports(tmp_path)] == ["m"]
    copy = tmp_path / "m" / "copy.json"
    copy.write_text(report_path(tmp_path, make_report("m", "tp1-pp1")).read_text())
    with pytest.raises(ReportError, match="also reported by"):
        load_reports(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(ReportError, match="no such report directory"):
        load_reports(tmp_path / "nope")


def test_factory_is_consistent():
    """The factory's failing reports carry what the runner writes for a failure."""
    r = make_report(fail_at=1)
    assert r["verdict"] == "fail" and r["first_diverging"]["probe"] == "layer.1"
    assert [x["ok"] for x in r["layers"]] == [True, True, False, False, False, False]
    assert not math.isnan(r["metrics"]["max_diff"])
