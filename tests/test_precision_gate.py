"""``--test-convert-precision`` gates in fp32: a bf16 export is upcast exactly and compared in fp32;
the bf16 comparison is printed as info (kernel drift, not the gate). With a writer that scales
one tensor by 1.01 the fp32 gate fails the bf16 export; without the fault it passes."""

from __future__ import annotations

import contextlib
import io

import pytest

from tests import writer_fault_cases as wfc

HF_NAME = "model.layers.1.mlp.down_proj.weight"


def export_capturing(argv: list[str], fault: str | None) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = wfc.export_with_writer_fault(argv, fault, HF_NAME)
    return {**result, "stdout": out.getvalue()}


@pytest.mark.world(1)
def test_bf16_export_is_gated_in_fp32(pools, zoo_model, tmp_path):
    argv = ["export", "--model", str(zoo_model("llama")), "--to-hf", "--device", "cpu", "--dtype", "bf16",
            "--test-convert-precision"]
    pool = pools.get(1)
    clean = pool.run(export_capturing, argv=argv + ["--save", str(tmp_path / "clean")], fault=None)[0]
    assert clean["code"] == 0, clean["stdout"]
    lines = clean["stdout"].splitlines()
    info = [l for l in lines if l.startswith("info (kernel drift, not the gate)")]
    gate = [l for l in lines if l.startswith("gate (fp32")]
    assert len(info) == 1 and " bf16 " in info[0], clean["stdout"]
    assert len(gate) == 1 and " fp32 " in gate[0] and "PASS" in gate[0], clean["stdout"]
    faulty = pool.run(export_capturing, argv=argv + ["--save", str(tmp_path / "faulty")], fault="hf")[0]
    assert faulty["faulted"] == [HF_NAME] and faulty["code"] == 1, faulty
    gate = [l for l in faulty["stdout"].splitlines() if l.startswith("gate (fp32")]
    assert len(gate) == 1 and "FAIL" in gate[0] and "first diverging: layer.1" in gate[0], faulty["stdout"]
