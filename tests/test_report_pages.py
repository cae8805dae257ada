"""Model pages: the case table shows every gated metric of the model's kind, and one overlay plot
of every case's per-layer drift comes first."""

from __future__ import annotations

import base64
import math
import re
import struct

import pytest

from tests.report_factory import make_report, metrics_for
from verify import metrics as M
from verify.report import write_report
from verify.report_html import overlay_plot_png, render_model_page

PNG = "data:image/png;base64,"


def case_table(page: str) -> tuple[list[str], list[list[str]]]:
    table = re.search(r'<table[^>]*class="dataframe cases">(.*?)</table>', page, re.S).group(1)
    header = [re.sub(r"<[^>]+>", "", h) for h in re.findall(r"<th>(.*?)</th>", table)]
    rows = [[re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>", 1)[1], re.S)]
    return header, rows


KINDS = {  # model kind -> (report overrides, the columns its gate adds to the base table)
    "dense": ({}, []),
    "moe": ({"metrics": {"router_agreement": 0.9975}, "thresholds": {"router_agreement_min": 0.99}},
            ["router_agreement"]),
    "vl": ({"gate": "with_loss", "metrics": {"top1_agreement_with_loss": 0.9875},
            "thresholds": {"top1_agreement_with_loss_min": 0.99}}, ["top1_agreement_with_loss"]),
    "vl_moe": ({"gate": "with_loss", "metrics": {"top1_agreement_with_loss": 0.9875, "router_agreement": 0.9975},
                "thresholds": {"top1_agreement_with_loss_min": 0.99, "router_agreement_min": 0.99}},
               ["router_agreement", "top1_agreement_with_loss"]),
}
BASE = ["mean_diff", "max_diff", "mean_diff_with_loss", "max_diff_with_loss", "top1_agreement", "kl_hf_mg"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_case_table_shows_the_gated_metrics_of_the_kind(kind, tmp_path):
    overrides, extra = KINDS[kind]
    for layout_id in ("tp1-pp1", "tp2-pp1"):
        write_report(make_report(f"{kind}-tiny", layout_id, "fp32", **overrides), tmp_path)
    header, rows = case_table(render_model_page(tmp_path, f"{kind}-tiny").read_text())
    metrics = header[header.index("world") + 1:header.index("first diverging")]
    assert metrics == BASE + extra
    for row in rows:
        cells = dict(zip(header, row))
        if "router_agreement" in extra:
            assert cells["router_agreement"] == "0.997500"
        if "top1_agreement_with_loss" in extra:
            assert cells["top1_agreement_with_loss"] == "0.987500"


def good_metrics() -> dict:
    return {**metrics_for(1e-8), "top1_agreement_with_loss": 1.0, "router_agreement": 1.0}


WORSE = {"top1_agreement": 0.5, "top1_agreement_with_loss": 0.5, "router_agreement": 0.5}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("gate,moe", [("all", False), ("all", True), ("with_loss", False), ("with_loss", True)])
def test_gated_metrics_are_what_the_verdict_checks(dtype, gate, moe):
    """Each metric gated_metrics names fails a verdict when it alone goes bad; each other one does
    not: the table's columns follow the gate, whatever the thresholds module changes."""
    calibration = {**metrics_for(1e-3, top1=0.99), "top1_agreement_with_loss": 0.99, "router_agreement": 1.0}
    limits = M.thresholds(dtype, calibration if dtype == "bf16" else None, moe=moe, gate=gate)
    gated = M.gated_metrics(dtype, gate, moe)
    expected = {"mean_diff_with_loss", "max_diff_with_loss"}
    expected |= {"top1_agreement_with_loss"} if gate == "with_loss" else {"mean_diff", "max_diff", "kl_hf_mg",
                                                                         "top1_agreement"}
    expected |= {"router_agreement"} if moe else set()
    assert set(gated) == expected and len(gated) == len(expected)
    assert M.failures(good_metrics(), limits, gate) == []
    for metric in sorted(set(good_metrics()) | {"router_agreement"}):
        bad = {**good_metrics(), metric: WORSE.get(metric, 10.0)}
        failed = M.failures(bad, limits, gate)
        assert bool(failed) == (metric in gated), (metric, failed)


def png_size(png: bytes) -> tuple[int, int]:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return struct.unpack(">II", png[16:24])


def test_overlay_plot_comes_first_and_leaves_out_controls(tmp_path):
    a = make_report("m-tiny", "tp1-pp1", "fp32")
    b = make_report("m-tiny", "tp2-pp1-sp", "fp32", scale=30.0)
    control = make_report("m-tiny", "tp2-pp1-sp", "fp32", fail_at=1, control="scale:x:1.01")
    for r in (a, b, control):
        write_report(r, tmp_path)
    page = render_model_page(tmp_path, "m-tiny").read_text()
    first_img = page.index('<img alt="per-layer drift of every case of m-tiny"')
    assert first_img < page.index('class="dataframe cases"') < page.index('<section class="case"')
    pngs = [base64.b64decode(x) for x in re.findall(re.escape(PNG) + r"([A-Za-z0-9+/=]+)", page)]
    assert len(pngs) == 4  # the overlay, then one per case (the control's too)
    overlay = overlay_plot_png("m-tiny", [a, b, control])
    assert pngs[0] == overlay
    assert overlay == overlay_plot_png("m-tiny", [a, b])  # the control is not drawn
    assert overlay != overlay_plot_png("m-tiny", [a])  # each case is
    width, height = png_size(overlay)
    assert width >= 800 and height >= 400


def test_overlay_of_mixed_dtypes_nan_and_no_probes(tmp_path):
    bf16 = make_report("m-tiny", "tp1-pp1", "bf16")
    bf16["layers"][2]["rel_mean_diff"] = math.nan
    empty = make_report("m-tiny", "tp2-pp1", "fp32", layers=[], first_diverging=None)
    assert overlay_plot_png("m-tiny", [empty]) is None
    png = overlay_plot_png("m-tiny", [make_report("m-tiny", "tp1-pp1", "fp32"), bf16, empty])
    assert png_size(png)[0] >= 800
