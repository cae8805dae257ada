"""Alignment checks for other projects' test suites: parametrise a model over parallel layouts and
assert that the megatron model converted into each layout matches the HF model.

    # conftest.py (optional: gives the ``mcore_bridge_assert_aligned`` fixture)
    pytest_plugins = ["verify.pytest_plugin"]

    # test_alignment.py
    from verify.pytest_plugin import assert_aligned, mcore_bridge_matrix

    @mcore_bridge_matrix(["/models/my-llama"], "tp=1,2 pp=1,2")
    def test_my_model_is_aligned(model, layout, tmp_path):
        assert_aligned(model, layout, dtype="fp32", report_dir=tmp_path)

Each case runs ``verify.run`` under ``torch.distributed.run`` in a subprocess with the processes
its layout needs (one (model, layout, dtype) case; the report, detection power included, is
written to ``report_dir``). A failing case raises ``AssertionError`` naming the first diverging
layer, its parameters and the failed thresholds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mcore_bridge.layout import ParallelLayout

from .matrix import case_id, expand


def mcore_bridge_matrix(models, matrix: str, argnames: str = "model,layout", check_model: bool = True):
    """``pytest.mark.parametrize`` over each model (``builtin:NAME`` or an HF directory) and each
    layout of ``matrix`` (``"tp=1,2 pp=1,2 sp=0,1"``, the ``--matrix`` syntax) that applies to
    that model; ids like ``my-llama[tp2-pp1]``. ``check_model=False``: keep every valid layout
    without reading the model at collection time (a ``builtin:`` model is built on first read)."""
    from mcore_bridge.bridge import Bridge

    from .run import model_name

    cases = []
    for model in models:
        dims = Bridge(model).family.layout_dims() if check_model else None
        for layout in expand(matrix, dims)[0]:
            cases.append(pytest.param(str(model), layout, id=case_id(model_name(model), layout)))
    if not cases:
        raise ValueError(f"mcore_bridge_matrix: no layout of {matrix!r} applies to {list(models)}")
    return pytest.mark.parametrize(argnames, cases)


def _first_diverging(report: dict) -> str:
    first = report.get("first_diverging")
    if not first:
        return "no first diverging layer named"
    return (f"first diverging layer: {first['probe']} (cause {first.get('cause')}; HF parameters "
            f"{', '.join(first.get('hf_params', [])[:6])})")


def assert_aligned(model, layout, dtype: str = "fp32", *, control: str | None = None, device: str = "cpu",
                   report_dir=None, reference_cache=None, timeout: float = 600, detection: bool = True) -> dict:
    """Run one verify case and return its report; ``AssertionError`` when it fails, with the first
    diverging layer. ``layout``: a ``ParallelLayout`` or its fields as a dict. ``control``: a
    deliberate fault (``verify.controls`` spec, e.g. ``scale:decoder.layers.1.mlp.linear_fc2.weight:1.01``)
    to check that the assertion fires. ``device``: cpu (gloo), cuda or auto."""
    from .run import model_name

    layout = layout if isinstance(layout, ParallelLayout) else ParallelLayout(**layout)
    with tempfile.TemporaryDirectory(prefix="mcore-bridge-verify-") as tmp:
        out = Path(report_dir) if report_dir is not None else Path(tmp)
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={layout.min_world_size}",
               "--standalone", "-m", "verify.run", "--model", str(model), "--layout", json.dumps(layout.to_dict()),
               "--dtype", dtype, "--device", device, "--report", str(out)]
        cmd += ["--reference-cache", str(reference_cache)] if reference_cache else []
        cmd += ["--control", control] if control else []
        cmd += [] if detection else ["--no-detection"]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   MCORE_BRIDGE_QUIET="1", PYTHONWARNINGS="ignore")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        reports = [json.loads(p.read_text()) for p in sorted(out.rglob("*.json"))]
        reports = [r for r in reports if r.get("model") == model_name(model) and r.get("layout_id") == layout.short()
                   and r.get("dtype") == dtype and r.get("control") == control]
        if not reports:
            raise RuntimeError(f"verify {model} {layout.short()} {dtype}: no report (exit {proc.returncode}); "
                               f"stderr tail:\n{proc.stderr[-3000:]}")
        report = max(reports, key=lambda r: r.get("created", ""))
    if report["verdict"] != "pass" or proc.returncode != 0:
        raise AssertionError(f"{report['model']} {report['layout_id']} {dtype} not aligned: {_first_diverging(report)}; "
                             f"failures: {'; '.join(report['failures'])}")
    return report


@pytest.fixture
def mcore_bridge_assert_aligned(tmp_path):
    """``assert_aligned`` with the report written under the test's ``tmp_path``."""
    def check(model, layout, dtype: str = "fp32", **kw):
        kw.setdefault("report_dir", tmp_path / "mcore-bridge-reports")
        return assert_aligned(model, layout, dtype, **kw)

    return check
