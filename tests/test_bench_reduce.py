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


DSV3 = json.loads((REPO / "tests/published/deepseek-ai__DeepSeek-V3.json").read_text())
NEXT = json.loads((REPO / "tests/published/Qwen__Qwen3-Next-80B-A3B-Instruct.json").read_text())


def test_mtp_is_kept_only_when_asked_and_built_as_one_more_layer():
    assert reduce_published.mtp_layers(DSV3) == (1, "deepseek")
    assert "num_nextn_predict_layers" not in reduce_published.reduce_config(DSV3, layers=4, experts=8)
    kept = reduce_published.reduce_config(DSV3, layers=4, experts=8, mtp=True)
    assert kept["num_nextn_predict_layers"] == 1 and kept["num_hidden_layers"] == 5
    assert kept["first_k_dense_replace"] == 3  # clipped to the main depth, so the MTP layer is MoE too
    assert reduce_published.mtp_layers(NEXT) == (1, "qwen_next")  # no count published: one layer
    nxt = reduce_published.reduce_config(NEXT, layers=4, experts=8, mtp=True)
    # the main layers keep the published 3 linear : 1 full pattern; the MTP layer is full attention
    assert nxt["layer_types"] == ["linear_attention"] * 3 + ["full_attention", "full_attention"]
    assert reduce_published.mtp_layers(GPT_OSS) == (0, "")


def test_edit_shards_keeps_each_tensor_in_its_file_and_indexes_new_ones(tmp_path):
    from safetensors.torch import load_file, save_file

    from mcore_bridge import ckpt_edit
    from mcore_bridge.hf_io import HFCheckpoint

    a, b = {"x.weight": torch.arange(6.0).view(2, 3)}, {"y.weight": torch.ones(4), "z.weight": torch.zeros(2)}
    (tmp_path / "config.json").write_text("{}")
    save_file(a, tmp_path / "model-00001-of-00002.safetensors")
    save_file(b, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": {"x.weight": "model-00001-of-00002.safetensors",
                                                       "y.weight": "model-00002-of-00002.safetensors",
                                                       "z.weight": "model-00002-of-00002.safetensors"}}))

    def edit(t):
        t["moved.weight"] = t.pop("x.weight")  # renamed: leaves shard 1 empty
        t["new.weight"] = torch.full((3,), 7.0)

    ckpt_edit.edit_shards(tmp_path, edit)
    assert not (tmp_path / "model-00001-of-00002.safetensors").exists()
    assert set(load_file(tmp_path / "model-00002-of-00002.safetensors")) == {"y.weight", "z.weight"}
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["new.weight"] == index["weight_map"]["moved.weight"] == "model-extra.safetensors"
    assert index["metadata"]["total_size"] == 4 * (6 + 4 + 2 + 3)
    ck = HFCheckpoint(tmp_path)
    assert sorted(ck.names()) == ["moved.weight", "new.weight", "y.weight", "z.weight"]
    assert torch.equal(ck.read("moved.weight"), torch.arange(6.0).view(2, 3))
