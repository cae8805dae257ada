"""``bench/reduce_published.py``: the GPU bench's reduced copies of published checkpoints.

The config keeps every published field but the depth-bound ones; ``--mxfp4`` writes gpt-oss's
experts as published (uint8 ``*_blocks`` / ``*_scales`` + the published ``quantization_config``),
and what a conversion must reproduce from it is its dequantised view."""

from __future__ import annotations

import json
import math
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


V31 = json.loads((REPO / "tests/published/deepseek-ai__DeepSeek-V3.1.json").read_text())


def _shard_in_two(src: Path, dst: Path) -> None:
    """``src``'s one safetensors file split over two files with an index, as published checkpoints are."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    (one,) = dst.glob("*.safetensors")
    tensors = load_file(one)
    one.unlink()
    names = sorted(tensors)
    half = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, part in half.items():
        save_file({n: tensors[n] for n in part}, dst / f, metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": {n: f for f, part in half.items() for n in part}}))


def test_fp8_copy_is_quantised_as_the_published_config_says(zoo_model, tmp_path):
    """DeepSeek-V3.1's published quantization_config (ue8m0: power-of-two scales) on a sharded checkpoint:
    put back verbatim, every scale a power of two and indexed in its weight's file, and the copy read back
    as blockwise FP8 whose dequantised view is the bf16 weights to within FP8's rounding."""
    from mcore_bridge import quant
    from mcore_bridge.hf_io import HFCheckpoint

    qc = V31["quantization_config"]
    assert qc["scale_fmt"] == "ue8m0" and qc["weight_block_size"] == [128, 128]
    qc = dict(qc, weight_block_size=[32, 48])  # the tiny model's matrices hold several (partial) blocks
    src = tmp_path / "bf16"
    _shard_in_two(zoo_model("deepseek_v3"), src)
    reduce_published.write_fp8(src, tmp_path / "fp8", qc, device="cpu")
    out = tmp_path / "fp8"
    assert json.loads((out / "config.json").read_text())["quantization_config"] == qc
    raw, bf16 = HFCheckpoint(out), HFCheckpoint(src)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    scales = [n for n in raw.names() if n.endswith(quant.SCALE_SUFFIX)]
    assert len(scales) > 10
    for s in scales:
        w = s[:-len(quant.SCALE_SUFFIX)]
        assert index["weight_map"][s] == index["weight_map"][w]  # a rank reads both from one file
        assert raw.info(w).dtype == torch.float8_e4m3fn
        v = raw.read(s)
        assert torch.equal(v, torch.exp2(torch.log2(v).round()))  # ue8m0: powers of two
    assert index["metadata"]["total_size"] == sum(raw.info(n).dtype.itemsize * math.prod(raw.info(n).shape)
                                                  for n in raw.names())
    view = quant.open_quantized(raw)
    assert sorted(view.names()) == sorted(bf16.names())
    for s in scales[:6]:
        w = s[:-len(quant.SCALE_SUFFIX)]
        a, b = view.read(w).float(), bf16.read(w).float()
        assert (a - b).abs().max() <= b.abs().max() / 8  # e4m3 keeps 3 mantissa bits; powers of two up to 2x
        assert not torch.equal(a, b) or a.abs().sum() == 0  # quantised, not copied


def test_fp8_copy_refuses_a_config_it_cannot_describe(zoo_model, tmp_path):
    with pytest.raises(SystemExit, match="quant_method"):
        reduce_published.write_fp8(zoo_model("deepseek_v3"), tmp_path / "a", GPT_OSS["quantization_config"], "cpu")
    assert not (tmp_path / "a").exists()
    from mcore_bridge import ckpt_edit
    from mcore_bridge.errors import CheckpointError

    src = tmp_path / "b"
    shutil.copytree(zoo_model("deepseek_v3"), src)
    before = {f.name: f.read_bytes() for f in src.iterdir() if f.is_file()}
    with pytest.raises(CheckpointError, match="scale_fmt"):
        ckpt_edit.quantize_fp8_dir(src, qconfig=dict(V31["quantization_config"], scale_fmt="e8m0fnu"))
    assert {f.name: f.read_bytes() for f in src.iterdir() if f.is_file()} == before  # nothing touched
