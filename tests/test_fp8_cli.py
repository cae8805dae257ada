"""``mcore-bridge export --export-dtype``: FP8 written from a bf16-stored source, MXFP4 refused
with the reason, a damaged FP8 checkpoint refused naming the tensor (nothing written)."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file, save_file

from mcore_bridge import quant
from mcore_bridge.hf_io import HFCheckpoint
from tests.test_cli import assert_nothing_written, run_cli


def test_export_fp8_from_a_plain_source_quantises_deepseeks_linears(zoo_model, tmp_path):
    src = zoo_model("deepseek_v3")
    out = tmp_path / "fp8"
    r = run_cli("export", "--model", src, "--to-hf", "--save", out, "--export-dtype", "fp8")
    assert r.returncode == 0, r.stderr
    saved, plain = HFCheckpoint(out), HFCheckpoint(src)
    assert saved.config["quantization_config"] == quant.DEFAULT_FP8_CONFIG
    fp8 = {n for n in saved.names() if saved.info(n).dtype == torch.float8_e4m3fn}
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in fp8 and "model.layers.0.self_attn.o_proj.weight" in fp8
    assert not any(k in n for n in fp8 for k in ("norm", "embed", "lm_head", "mlp.gate.weight"))
    assert {n + quant.SCALE_SUFFIX for n in fp8} == {n for n in saved.names() if n.endswith(quant.SCALE_SUFFIX)}
    back = quant.open_quantized(saved)  # reads back within e4m3's half ulp (2^-4 relative) of the source
    for n in fp8:
        w = plain.read(n)
        assert float((back.read(n).float() - w).abs().max()) <= float(w.abs().max()) * 2 ** -4 + 1e-6, n


def test_fp8_export_of_an_mtp_model_reads_back_and_keeps_the_mtp_projection_and_copies(zoo_model, tmp_path):
    """The MTP layer's ``eh_proj`` and its copies of the embedding and head stay bf16 (as DeepSeek-V3
    publishes them); quantising the head copy made an FP8 export our own import refused (its copy
    no longer equal to ``lm_head``). The export then round-trips byte for byte."""
    src = zoo_model("deepseek_v3_mtp")
    mtp = f"model.layers.{HFCheckpoint(src).config['num_hidden_layers']}."
    out, back = tmp_path / "fp8", tmp_path / "back"
    r = run_cli("export", "--model", src, "--to-hf", "--save", out, "--export-dtype", "fp8")
    assert r.returncode == 0, r.stderr
    saved, plain = HFCheckpoint(out), HFCheckpoint(src)
    fp8 = {n for n in saved.names() if saved.info(n).dtype == torch.float8_e4m3fn}
    assert mtp + "self_attn.o_proj.weight" in fp8 and mtp + "mlp.experts.0.down_proj.weight" in fp8
    for kept in ("eh_proj.weight", "shared_head.head.weight", "embed_tokens.weight"):
        assert mtp + kept not in fp8 and torch.equal(saved.read(mtp + kept), plain.read(mtp + kept)), kept
    assert torch.equal(saved.read(mtp + "shared_head.head.weight"), saved.read("lm_head.weight"))
    r = run_cli("export", "--model", out, "--to-hf", "--save", back, "--export-dtype", "fp8")
    assert r.returncode == 0, r.stderr
    again = HFCheckpoint(back)
    assert set(again.names()) == set(saved.names())
    for n in saved.names():
        assert torch.equal(again.read(n).view(torch.uint8), saved.read(n).view(torch.uint8)), n


def test_export_mxfp4_is_refused_with_the_reason(zoo_model, tmp_path):
    r = run_cli("export", "--model", zoo_model("qwen3"), "--to-hf", "--save", tmp_path / "o", "--export-dtype", "mxfp4")
    assert r.returncode == 2 and "--export-dtype mxfp4 is refused" in r.stderr, r.stderr
    assert_nothing_written(tmp_path / "o")


def test_export_dtype_with_to_mcore_is_refused(zoo_model, tmp_path):
    r = run_cli("export", "--model", zoo_model("qwen3"), "--to-mcore", "--save", tmp_path / "o",
                "--export-dtype", "fp8")
    assert r.returncode == 2 and "--export-dtype fp8: applies to HF output" in r.stderr, r.stderr
    assert_nothing_written(tmp_path / "o")


def test_damaged_fp8_checkpoint_is_refused_before_writing(zoo_model, tmp_path):
    src = tmp_path / "damaged"
    shutil.copytree(zoo_model("deepseek_v3_fp8"), src)
    tensors = load_file(str(src / "model.safetensors"))
    victim = "model.layers.1.mlp.experts.5.up_proj.weight_scale_inv"
    tensors[victim] = tensors[victim][:, :1].contiguous()
    save_file(tensors, str(src / "model.safetensors"))
    r = run_cli("export", "--model", src, "--to-hf", "--save", tmp_path / "o")
    assert r.returncode == 2 and f"{victim}: shape (1, 1) does not fit" in r.stderr, r.stderr
    assert_nothing_written(tmp_path / "o")
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [32, 48]


def test_fp8_mtp_checkpoint_verifies_against_its_dequantised_reference(zoo_model, tmp_path):
    """The reference of an FP8 checkpoint with an MTP layer: the main model and the MTP layer both
    read the dequantised copy (the MTP loader once read the FP8 directory itself: transformers'
    FP8 path, which needs GPU kernels or dequantises by its own rule). Here the MTP layer's own
    ``eh_proj`` is FP8 too, as a publisher may store it."""
    src, fp8 = zoo_model("deepseek_v3_mtp"), tmp_path / "fp8"
    r = run_cli("export", "--model", src, "--to-hf", "--save", fp8, "--export-dtype", "fp8")
    assert r.returncode == 0, r.stderr
    eh = f"model.layers.{HFCheckpoint(src).config['num_hidden_layers']}.eh_proj.weight"
    tensors = load_file(str(fp8 / "model.safetensors"))
    block = tuple(HFCheckpoint(fp8).config["quantization_config"]["weight_block_size"])
    tensors[eh], tensors[eh + quant.SCALE_SUFFIX] = quant.quantize_fp8(tensors[eh], block)
    save_file(tensors, str(fp8 / "model.safetensors"), metadata={"format": "pt"})
    report = tmp_path / "report"
    r = run_cli("verify", "--model", fp8, "--matrix", "tp=1", "--dtype", "fp32", "--device", "cpu",
                "--report", report)
    assert r.returncode == 0, r.stdout + r.stderr
    (page,) = report.glob("*/tp1-pp1-fp32.json")
    rep = json.loads(page.read_text())
    assert rep["verdict"] == "pass" and rep["metrics"]["max_diff"] < 1e-4, rep["failures"]
    (depth,) = rep["mtp"]["depths"]
    assert depth["ok"] and depth["rel_mean_diff"] < 1e-5, depth


def test_a_verify_whose_reference_cannot_be_written_fails_fast_and_says_why(zoo_model, tmp_path):
    """The disk fills while the reference's dequantised copy is written (as on an H200 with two
    reduced DeepSeek-V3 lanes): the run ends non-zero with the worker's own error in front (under
    torchrun the tail is the agent's summary), says that no case wrote a report, and leaves no
    partial copy behind."""
    src = zoo_model("deepseek_v3_mtp_fp8")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = run_cli("verify", "--model", src, "--matrix", "tp=2", "--dtype", "fp32", "--device", "cpu",
                "--report", tmp_path / "report", env={"MCORE_BRIDGE_FAULT": "rank:0:write:enospc", "TMPDIR": str(tmp)},
                timeout=240)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "[rank0]: mcore_bridge.errors.WriteError: cannot write" in r.stderr, r.stderr
    assert "none wrote a report" in r.stderr and "no such report directory" not in r.stderr, r.stderr
    assert not list(tmp.glob("mcore-bridge-dequantised-*")), list(tmp.iterdir())
