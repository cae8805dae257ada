"""Regression mode (verify/regression.py): compare report directories, flag what got worse."""

from __future__ import annotations

import json

import pytest

from tests.report_factory import make_report
from verify.regression import IMPROVED, MISSING, NEW, OK, REGRESSION, compare, main
from verify.report import write_report

CASES = [("qwen3-tiny", "tp1-pp1", "fp32"), ("qwen3-tiny", "tp2-pp1-sp", "fp32"),
         ("qwen3-tiny", "tp2-pp1-sp", "bf16"), ("llama-tiny", "tp1-pp2-vpp2", "bf16")]


def write_set(directory, changes=None, drop=()):
    """Write every case of CASES into ``directory``; ``changes[(model, layout, dtype)]`` is a dict
    of overrides (or a function of the report returning it); cases in ``drop`` are left out."""
    changes = changes or {}
    for key in CASES:
        if key in drop:
            continue
        report = make_report(*key)
        change = changes.get(key, {})
        report.update(change(report) if callable(change) else change)
        write_report(report, directory)
    return directory


@pytest.fixture
def baseline(tmp_path):
    return write_set(tmp_path / "baseline")


def worse(metric, factor):
    return lambda r: {"metrics": {**r["metrics"], metric: r["metrics"][metric] * factor}}


def shifted(metric, delta):
    return lambda r: {"metrics": {**r["metrics"], metric: r["metrics"][metric] + delta}}


def statuses(comp, status):
    return [(r["model"], r["layout_id"], r["dtype"], r["metric"]) for r in comp.rows if r["status"] == status]


def test_identical_sets_are_ok(tmp_path, baseline, capsys):
    current = write_set(tmp_path / "current")
    comp = compare(baseline, current)
    assert comp.ok and comp.regressions == [] and comp.improvements == []
    assert {r["status"] for r in comp.rows} == {OK}
    assert len(comp.cases()) == len(CASES)
    assert comp.summary()["cases_compared"] == len(CASES)
    assert main(["--baseline", str(baseline), "--current", str(current)]) == 0
    out = capsys.readouterr().out
    assert "stated tolerance:" in out and "-> OK" in out


def test_max_diff_ten_times_worse_is_a_regression(tmp_path, baseline, capsys):
    key = ("qwen3-tiny", "tp2-pp1-sp", "fp32")
    current = write_set(tmp_path / "current", {key: worse("max_diff", 10)})
    comp = compare(baseline, current)
    assert not comp.ok
    assert statuses(comp, REGRESSION) == [(*key, "max_diff")]
    row = comp.regressions[0]
    assert row["baseline"] == pytest.approx(4e-7) and row["current"] == pytest.approx(4e-6)
    assert row["limit"] == "<= 1.60e-06" and row["change"] == "x10.00"
    out_json = tmp_path / "cmp" / "comparison.json"
    assert main(["--baseline", str(baseline), "--current", str(current), "--json", str(out_json)]) == 1
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "REGRESSION" in ln and "max_diff" in ln)
    assert line.split()[:4] == ["qwen3-tiny", "tp2-pp1-sp", "fp32", "max_diff"]
    assert "stated tolerance:" in out and "1 regressions" in out and out.rstrip().endswith("-> REGRESSION")
    saved = json.loads(out_json.read_text())
    assert saved["summary"]["ok"] is False and saved["summary"]["regressions"] == 1
    assert [r["metric"] for r in saved["rows"] if r["status"] == REGRESSION] == ["max_diff"]
    # the pandas view of the same rows
    frame = comp.to_frame()
    assert list(frame[frame.status == REGRESSION].metric) == ["max_diff"]


def test_verdict_flip_is_a_regression_and_back_an_improvement(tmp_path, baseline):
    key = ("llama-tiny", "tp1-pp2-vpp2", "bf16")
    failing = make_report(*key, fail_at=1)
    current = write_set(tmp_path / "current", {key: {"verdict": "fail", "failures": failing["failures"]}})
    comp = compare(baseline, current)
    assert not comp.ok and statuses(comp, REGRESSION) == [(*key, "verdict")]
    back = compare(current, baseline)  # fail -> pass
    assert back.ok and statuses(back, IMPROVED) == [(*key, "verdict")]


def test_missing_case_is_a_failure_and_new_case_is_listed(tmp_path, baseline, capsys):
    gone = ("qwen3-tiny", "tp2-pp1-sp", "bf16")
    current = write_set(tmp_path / "current", drop=[gone])
    write_report(make_report("qwen3-tiny", "tp4-pp1", "fp32"), current)
    comp = compare(baseline, current)
    assert not comp.ok
    assert statuses(comp, MISSING) == [(*gone, "case")]
    assert statuses(comp, NEW) == [("qwen3-tiny", "tp4-pp1", "fp32", "case")]
    assert main(["--baseline", str(baseline), "--current", str(current), "--only-changes"]) == 1
    out = capsys.readouterr().out
    assert "MISSING" in out and "new" in out and "1 missing" in out
    assert "token_mean_diff_mean" not in out.split("baseline:", 1)[1]  # ok rows left out


def test_missing_metric_is_a_failure(tmp_path, baseline):
    key = ("qwen3-tiny", "tp1-pp1", "fp32")
    current = write_set(tmp_path / "current", {
        key: lambda r: {"metrics": {k: v for k, v in r["metrics"].items() if k != "kl_hf_mg"}}})
    comp = compare(baseline, current)
    assert statuses(comp, MISSING) == [(*key, "kl_hf_mg")] and not comp.ok


def test_improvement_is_ok(tmp_path, baseline):
    key = ("qwen3-tiny", "tp2-pp1-sp", "bf16")
    current = write_set(tmp_path / "current", {key: worse("max_diff", 0.1)})
    comp = compare(baseline, current)
    assert comp.ok and statuses(comp, IMPROVED) == [(*key, "max_diff")]


@pytest.mark.parametrize("key, change", [
    (("qwen3-tiny", "tp2-pp1-sp", "bf16"), worse("max_diff", 1.4)),         # under rel_tol=0.5
    (("qwen3-tiny", "tp1-pp1", "fp32"), shifted("mean_diff", 8e-7)),        # x9, under the 1e-6 floor
    (("qwen3-tiny", "tp2-pp1-sp", "bf16"), shifted("mean_diff", 9e-4)),     # under the bf16 floor 1e-3
    (("qwen3-tiny", "tp2-pp1-sp", "bf16"), shifted("top1_agreement", -0.008)),
    (("qwen3-tiny", "tp1-pp1", "fp32"), shifted("cosine_mean", -5e-7)),
])
def test_noise_below_tolerance_is_ok(tmp_path, baseline, key, change):
    comp = compare(baseline, write_set(tmp_path / "current", {key: change}))
    assert comp.ok, comp.format_table(only_changes=True)


@pytest.mark.parametrize("key, change, metric", [
    (("qwen3-tiny", "tp1-pp1", "fp32"), shifted("mean_diff", 2e-6), "mean_diff"),
    (("qwen3-tiny", "tp2-pp1-sp", "bf16"), worse("max_diff_with_loss", 2), "max_diff_with_loss"),
    (("qwen3-tiny", "tp2-pp1-sp", "bf16"), shifted("top1_agreement", -0.02), "top1_agreement"),
    (("qwen3-tiny", "tp1-pp1", "fp32"), shifted("top1_agreement", -0.002), "top1_agreement"),
    (("qwen3-tiny", "tp1-pp1", "fp32"), shifted("cosine_mean", -1e-5), "cosine_mean"),
    (("qwen3-tiny", "tp1-pp1", "fp32"), lambda r: {"metrics": {**r["metrics"], "max_diff": float("nan")}},
     "max_diff"),
])
def test_beyond_tolerance_is_a_regression(tmp_path, baseline, key, change, metric):
    comp = compare(baseline, write_set(tmp_path / "current", {key: change}))
    assert statuses(comp, REGRESSION) == [(*key, metric)]


def test_tolerances_are_adjustable(tmp_path, baseline):
    bf16, fp32 = ("qwen3-tiny", "tp2-pp1-sp", "bf16"), ("qwen3-tiny", "tp1-pp1", "fp32")
    current = write_set(tmp_path / "current", {bf16: worse("max_diff", 1.4)})  # 1.6e-2 -> 2.24e-2
    assert compare(baseline, current).ok  # limit 1.6e-2 x 1.5 + 1e-3
    assert statuses(compare(baseline, current, rel_tol=0.2), REGRESSION) == [(*bf16, "max_diff")]
    assert main(["--baseline", str(baseline), "--current", str(current), "--rel-tol", "0.2"]) == 1
    current2 = write_set(tmp_path / "current2", {fp32: shifted("mean_diff", 8e-7)})
    assert not compare(baseline, current2, abs_tol=1e-7).ok
    assert main(["--baseline", str(baseline), "--current", str(current2), "--abs-tol", "1e-7"]) == 1
    assert main(["--baseline", str(baseline), "--current", str(current2)]) == 0


def test_negative_control_must_keep_failing(tmp_path):
    key = ("qwen3-tiny", "tp2-pp1", "fp32")
    base, cur = tmp_path / "b", tmp_path / "c"
    write_report(make_report(*key, fail_at=2, control="swap_qk:2"), base)
    write_report(make_report(*key, fail_at=2, control="swap_qk:2", scale=50), cur)
    comp = compare(base, cur)
    assert comp.ok and [r["metric"] for r in comp.rows] == ["verdict"]  # control metrics not compared
    write_report(make_report(*key, control="swap_qk:2"), cur)  # the control now passes: missed
    comp = compare(base, cur)
    assert statuses(comp, REGRESSION) == [(*key, "verdict")]
    assert comp.rows[0]["control"] == "swap_qk:2" and "control=swap_qk:2" in comp.format_table()


def test_notes_explain_changed_environment(tmp_path, baseline):
    key = ("qwen3-tiny", "tp1-pp1", "fp32")
    current = write_set(tmp_path / "current", {key: {"device": "NVIDIA H200",
                                                     "versions": {"megatron_core": "0.19.2"},
                                                     "thresholds": {"max_diff": 2e-3}}})
    comp = compare(baseline, current)
    assert comp.ok
    text = "\n".join(comp.notes)
    assert "device changed (cpu -> NVIDIA H200)" in text
    assert "megatron_core 0.16.1 -> 0.19.2" in text and "max_diff 0.001 -> 0.002" in text


def test_bad_input_exits_2(tmp_path, baseline, capsys):
    assert main(["--baseline", str(tmp_path / "nope"), "--current", str(baseline)]) == 2
    assert "no such report directory" in capsys.readouterr().err
    bad = tmp_path / "cur" / "m" / "x.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{")
    assert main(["--baseline", str(baseline), "--current", str(tmp_path / "cur")]) == 2
    assert str(bad) in capsys.readouterr().err


def test_table_is_aligned(tmp_path, baseline):
    key = ("qwen3-tiny", "tp2-pp1-sp", "fp32")
    comp = compare(baseline, write_set(tmp_path / "current", {key: worse("max_diff", 10)}))
    lines = comp.format_table().splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("case "))
    table = lines[header:header + 2 + len(comp.rows)]
    column = table[0].index("status")
    assert set(table[1].replace(" ", "")) == {"-"}
    assert all(ln[column:].split()[0] in (OK, REGRESSION) for ln in table[2:])
    assert all(ln[column - 2:column] == "  " for ln in table[2:])


# ---- committed reports, edited: every kind of worsening the gate would care about is caught -------
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

from verify import metrics  # noqa: E402
from verify.regression import compared_metrics  # noqa: E402

REPORTS = Path(__file__).resolve().parent.parent / "reports"


def _edited(tmp_path, rel: str, edit) -> Path:
    """A copy of the committed ``reports/`` with ``edit(report)`` applied to ``reports/<rel>``."""
    current = tmp_path / "current"
    shutil.copytree(REPORTS, current)
    path = current / rel
    report = json.loads(path.read_text())
    edit(report)
    path.write_text(json.dumps(report))
    return current


def _set(section, key, value):
    return lambda r: r[section].__setitem__(key, value)


def _layer(probe, key, f):
    def edit(r):
        entry = next(e for e in r["layers"] if e["probe"] == probe)
        entry[key] = f(entry[key])
    return edit


def test_committed_reports_unchanged_pass(capsys):
    comp = compare(REPORTS, REPORTS)
    assert comp.ok and comp.summary()["cases_compared"] > 40
    probes = [r for r in comp.rows if r["metric"].endswith(".rel_mean_diff")]
    assert probes and all(r["status"] == OK for r in probes)


MOE, VL = "qwen3_moe-tiny/tp2-pp1-fp32.json", "qwen2_vl-tiny/tp2-pp1-fp32.json"
WORSENINGS = {  # the four of issue 15, and the per-probe routing and loss-token diff
    "router_agreement 1.0->0.991": (MOE, _set("metrics", "router_agreement", 0.991), "router_agreement"),
    "layer.1 drift x300": (MOE, _layer("layer.1", "rel_mean_diff", lambda v: v * 300), "layer.1.rel_mean_diff"),
    "top1_with_loss 1.0->0.99": (VL, _set("metrics", "top1_agreement_with_loss", 0.99), "top1_agreement_with_loss"),
    "cosine_min->0.5": (VL, _set("metrics", "cosine_min", 0.5), "cosine_min"),
    "layer.2 routing 1.0->0.98": (MOE, _layer("layer.2", "router_agreement", lambda v: 0.98),
                                  "layer.2.router_agreement"),
    "max_diff_with_loss x10": (VL, _set("metrics", "max_diff_with_loss", 3.6e-6), "max_diff_with_loss"),
}


@pytest.mark.parametrize("case", list(WORSENINGS))
def test_each_worsening_of_a_committed_report_is_caught(tmp_path, case, capsys):
    rel, edit, metric = WORSENINGS[case]
    comp = compare(REPORTS, _edited(tmp_path, rel, edit))
    assert [(r["model"], r["metric"]) for r in comp.regressions] == [(rel.split("/")[0], metric)]
    assert main(["--baseline", str(REPORTS), "--current", str(tmp_path / "current")]) == 1
    assert "-> REGRESSION" in capsys.readouterr().out


def test_a_missing_probe_is_a_failure(tmp_path):
    current = _edited(tmp_path, MOE, lambda r: r.__setitem__("layers", r["layers"][:-1]))
    assert [r["status"] for r in compare(REPORTS, current).regressions] == [MISSING]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("gate_kind", ["all", "with_loss"])
def test_every_gated_metric_is_compared_the_right_way(dtype, moe, gate_kind):
    cal = {"mean_diff": 1e-3, "max_diff": 1e-2, "mean_diff_with_loss": 1e-3, "max_diff_with_loss": 1e-2,
           "kl_hf_mg": 1e-4, "top1_agreement": 0.98, "top1_agreement_with_loss": 0.97, "router_agreement": 0.9}
    limits = metrics.thresholds(dtype, cal, moe=moe, gate=gate_kind, tokens=(1000, 500))
    compared = compared_metrics({"thresholds": limits})
    bounded = {k.removesuffix("_min") for k in limits if k not in metrics.PER_LAYER}
    assert bounded <= set(compared)
    for k in limits:  # the direction the gate checks is the direction compared
        if k.endswith("_min"):
            assert compared[k.removesuffix("_min")] == "higher" and k.removesuffix("_min") in metrics.HIGHER_IS_BETTER
        elif k not in metrics.PER_LAYER:
            assert compared[k] == "lower" and k in metrics.LOWER_IS_BETTER


def test_a_newly_gated_metric_is_compared_without_code_change(tmp_path):
    """A threshold the gate did not have before (``novel_score_min``) makes its metric compared."""
    def add(value):
        def edit(r):
            r["thresholds"]["novel_score_min"] = 0.5
            r["metrics"]["novel_score"] = value
        return edit
    base = _edited(tmp_path / "b", MOE, add(0.9))
    assert compare(base, _edited(tmp_path / "c", MOE, add(0.9))).ok
    comp = compare(base, _edited(tmp_path / "d", MOE, add(0.7)))
    assert [r["metric"] for r in comp.regressions] == ["novel_score"]
