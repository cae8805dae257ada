"""verify --isolate (issue 20, item 2): every megatron layer fed the HF layer's input; the report
(JSON + Markdown + summary line) shows isolated and end-to-end drift per layer and names the first
layer, and in MoE layers the expert, whose own error fails. The fault catalogue
(tests/test_fault_catalogue.py) runs it over faults and layouts; this file checks the report."""

from __future__ import annotations

import json

import pytest

from tests import fault_cases


@pytest.fixture(scope="module")
def expert_report(pools, zoo_model):
    out = pools.get(1).run(fault_cases.verify, timeout=600, source=str(zoo_model("qwen3_moe")), layout={},
                           control="scale_expert:2:3:fc1:1.05")
    return [r for r in out if r is not None][0]


@pytest.mark.world(1)
def test_expert_fault_is_named_in_every_form_of_the_report(expert_report, tmp_path):
    from verify.report import write_report
    from verify.run import summary_line

    r = expert_report
    iso = r["isolation"]
    assert r["verdict"] == "fail"
    first = iso["first_failing"]
    assert first["probe"] == "layer.2" and first["expert"] == 3 and first["failing_experts"] == [3]
    assert first["hf_params"] == [f"model.layers.2.mlp.experts.3.{p}_proj.weight" for p in ("gate", "up", "down")]
    assert any(f.startswith("isolated layer.2: expert 3 drift") for f in r["failures"])
    by_probe = {e["probe"]: e for e in iso["layers"]}
    assert list(by_probe) == ["embedding", "layer.0", "layer.1", "layer.2", "layer.3", "final_norm", "output_layer"]
    for probe, e in by_probe.items():  # every other layer clean; its experts match to fp32 round-off
        assert e["ok"] == (probe != "layer.2"), e
        if probe.startswith("layer."):
            assert set(e["experts"]) == {str(i) for i in range(8)}
            assert all(v < 1e-6 for k, v in e["experts"].items() if (probe, k) != ("layer.2", "3"))
    assert by_probe["layer.2"]["experts"]["3"] > 1e-2
    # the end-to-end drift of the layers after it carries the fault on; the isolated one does not
    assert by_probe["layer.3"]["end_to_end_rel_mean_diff"] > 10 * by_probe["layer.3"]["isolated_rel_mean_diff"]
    js = write_report(r, tmp_path)
    md = js.with_suffix(".md").read_text()
    assert "## Layer-isolated drift" in md and "isolated: first failing layer.2 expert 3" in md
    assert "| layer.2 |" in md and "← first failing" in md
    assert json.loads(js.read_text())["isolation"]["first_failing"]["expert"] == 3
    assert "isolated: first failing layer.2 expert 3" in summary_line(r)


def test_cli_passes_isolate_to_each_case(monkeypatch, tmp_path, bridge_cache):
    """``mcore-bridge verify --isolate`` hands --isolate to each case's verify.run job."""
    import subprocess

    from mcore_bridge import cli

    seen = []

    def fake_run(cmd, **_kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="qwen3-tiny tp1-pp1 fp32 PASS\n", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    for flag, want in ((["--isolate"], True), ([], False)):
        seen.clear()
        cli.main(["verify", "--model", "builtin:qwen3", "--matrix", "tp=1", "--report", str(tmp_path / str(want)),
                  "--no-detection", *flag])
        cases = [c for c in seen if "verify.run" in c]
        assert cases and all(("--isolate" in c) == want for c in cases), seen
