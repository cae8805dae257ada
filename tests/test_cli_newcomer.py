"""What a new user meets first, through the real command line: ``--version`` and the version line
at the top of verify/export output, a ``--matrix`` none of whose layouts fits the model, and the
source a report names."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli import run_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_kv_head(tmp_path_factory) -> Path:
    """A tiny Llama with a single key/value head (4 query heads, 2 layers): no tp > 1 fits it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("kv1") / "llama-kv1"
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def expected_version_line() -> str:
    import megatron.core
    import torch
    import transformers

    import mcore_bridge

    # the line reads package metadata (nothing imported): PyPI's CUDA wheel of torch declares 2.13.0 there
    # while torch.__version__ says 2.13.0+cu130; a local CPU wheel declares 2.13.0+cpu in both
    from importlib.metadata import version

    torch_version = torch.__version__ if version("torch") == torch.__version__ else torch.__version__.split("+")[0]
    return (f"mcore-bridge {mcore_bridge.__version__} (megatron-core {megatron.core.__version__}, "
            f"torch {torch_version}, transformers {transformers.__version__})")


def test_version_names_every_package():
    r = run_cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected_version_line() + "\n"


def test_version_imports_neither_megatron_nor_transformers():
    code = ("import sys\nfrom mcore_bridge.cli import main\ntry:\n    main(['--version'])\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print(sorted(m for m in ('megatron', 'megatron.core', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "[]"


def test_verify_without_an_applicable_layout_says_so_and_suggests(one_kv_head, tmp_path):
    report = tmp_path / "reports"
    r = run_cli("verify", "--model", one_kv_head, "--matrix", "tp=2,4", "--report", report, "--device", "cpu")
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "1 query groups (num_key_value_heads) cannot be split over tp=2" in r.stdout  # the skip reasons
    assert f'no layout of --matrix "tp=2,4" applies to {one_kv_head}' in r.stderr
    # tp must divide the one key/value head; the 2 layers split over pp 1 or 2
    assert 'layouts that do: --matrix "tp=1 pp=1,2"' in r.stderr
    assert "no such report directory" not in out and "Traceback" not in out
    assert not report.exists()  # nothing ran, nothing written


def test_verify_header_and_source_as_given(one_kv_head, tmp_path):
    """A matrix with one applicable layout runs it (the other skipped); the report names the model
    as the user gave it (a relative path here), not its resolved location."""
    rel = os.path.relpath(one_kv_head, tmp_path)
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "mcore_bridge.cli", "verify", "--model", rel, "--matrix", "tp=1,2",
                        "--report", "reports", "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, **env))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0] == expected_version_line() and r.stdout.count("mcore-bridge ") == 1
    assert "skip {'tp': 2}" in r.stdout and "1/1 cases passed" in r.stdout
    saved = json.loads((tmp_path / "reports" / "llama-kv1" / "tp1-pp1-fp32.json").read_text())
    assert saved["source"] == rel and not Path(rel).is_absolute()
    page = (tmp_path / "reports" / "llama-kv1" / "index.html").read_text()
    assert f"source {rel} " in page and str(tmp_path) not in page


def test_export_header_once_from_rank_0(one_kv_head, tmp_path):
    """pp=2 self-launches two processes: the version line comes once (rank 0), not from the
    launcher too, and before anything else."""
    r = run_cli("export", "--model", one_kv_head, "--to-mcore", "--pp", "2", "--save", tmp_path / "m",
                "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    assert lines[0] == expected_version_line()
    assert sum(l.startswith("mcore-bridge ") for l in lines) == 1
    assert re.search(r"wrote .*\(Megatron, layout tp1-pp2[;)]", r.stdout)
