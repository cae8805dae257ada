"""``bench/reduce_published.py``: the GPU bench's reduced copies of published checkpoints.

The config keeps every published field but the depth-bound ones; ``--mxfp4`` writes gpt-oss's
experts as published (uint8 ``*_blocks`` / ``*_scales`` + the published ``quantization_config``),
and what a conversion must reproduce from it is its dequantised view."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import reduce_published  # noqa: E402

GPT_OSS = json.loads((REPO / "tests/published/openai__gpt-oss-20b.json").read_text())


def test_reduce_config_cuts_depth_and_quantisation_only():
    out = reduce_published.reduce_config(GPT_OSS, layers=2, experts=8)
    assert out["num_hidden_layers"] == 2 and out["layer_types"] == GPT_OSS["layer_types"][:2]
    assert out["num_local_experts"] == 8 and out["num_experts_per_tok"] == 4
    assert "quantization_config" not in out
    kept = {k: v for k, v in GPT_OSS.items()
            if k not in ("num_hidden_layers", "layer_types", "num_local_experts", "quantization_config")}
    assert {k: out[k] for k in kept} == kept


def test_mxfp4_copy_is_read_back_with_the_bf16_names_and_shapes(zoo_model, tmp_path):
    from mcore_bridge import quant
    from mcore_bridge.hf_io import HFCheckpoint

    src = tmp_path / "bf16"
    shutil.copytree(zoo_model("gpt_oss"), src)
    reduce_published.write_mxfp4(src, tmp_path / "mx", GPT_OSS["quantization_config"], seed=0)
    raw = HFCheckpoint(tmp_path / "mx")
    stored = {n: raw.info(n) for n in raw.names()}
    blocks = [n for n in stored if n.endswith("_blocks")]
    assert blocks and all(stored[n].dtype == torch.uint8 for n in blocks)
    assert all(n[:-len("_blocks")] + "_scales" in stored for n in blocks)
    assert json.loads((tmp_path / "mx/config.json").read_text())["quantization_config"] == GPT_OSS["quantization_config"]
    view, bf16 = quant.open_quantized(raw), HFCheckpoint(src)
    assert isinstance(view, quant.MXFP4Checkpoint)
    assert sorted(view.names()) == sorted(bf16.names())
    assert {n: tuple(view.info(n).shape) for n in view.names()} == {n: tuple(bf16.info(n).shape) for n in bf16.names()}
    w = view.read(blocks[0][:-len("_blocks")]).float()
    assert 0 < w.abs().max() <= 6 * 2.0 ** -6  # FP4 codes times the scales written (2^-8 .. 2^-6)


def test_mxfp4_copy_refuses_a_config_that_is_not_mxfp4(zoo_model, tmp_path):
    with pytest.raises(SystemExit, match="quant_method"):
        reduce_published.write_mxfp4(zoo_model("gpt_oss"), tmp_path / "mx", {"quant_method": "fp8"}, seed=0)
    assert not (tmp_path / "mx").exists()
