"""The command line end to end: real subprocesses, real torchrun self-launch, real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mcore_bridge.hf_io import HFCheckpoint, collective_output, staging_dir

CLI = [sys.executable, "-m", "mcore_bridge.cli"]


def run_cli(*args, env=None, timeout=300):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def assert_same_weights(src: Path, out: Path):
    a, b = HFCheckpoint(src), HFCheckpoint(out)
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        x, y = a.read(name), b.read(name)
        assert x.dtype == y.dtype and torch.equal(x, y), name


def assert_nothing_written(save: Path):
    assert not save.exists(), f"{save} exists after a failed run"
    assert not staging_dir(save).exists(), "staging directory left behind"


def test_help_explains_both_directions():
    r = run_cli("export", "--help")
    assert r.returncode == 0
    for flag in ("--to-mcore", "--to-hf", "--tp", "--decoder-first-pipeline-num-layers", "--nproc-per-node"):
        assert flag in r.stdout


def test_roundtrip_via_megatron_checkpoint(zoo_model, tmp_path):
    src = zoo_model("qwen3")
    mcore, hf = tmp_path / "mcore", tmp_path / "hf"
    r = run_cli("export", "--model", src, "--to-mcore", "--tp", "2", "--sp", "--save", mcore, "--device", "cpu",
                "--ckpt-format", "plain")
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((mcore / "mcore_bridge.json").read_text())
    assert meta["layout"]["tp"] == 2 and sorted(os.listdir(mcore)).count("mp_rank_01_000.safetensors") == 1
    # The Megatron checkpoint remembers its source: no --model needed, layout taken from it.
    r = run_cli("export", "--load", mcore, "--to-hf", "--save", hf, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(src, hf)
    for side in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (hf / side).read_bytes() == (src / side).read_bytes()
    assert json.loads((hf / "config.json").read_text()) == json.loads((src / "config.json").read_text())


def test_seed_spellings_and_env_nproc(zoo_model, tmp_path):
    """`--to_mcore true --tensor_model_parallel_size ...` with NPROC_PER_NODE, as the seed writes them."""
    src = zoo_model("llama")
    mcore, hf = tmp_path / "mcore", tmp_path / "hf"
    r = run_cli("export", "--model", src, "--to_mcore", "true", "--tensor_model_parallel_size", "2",
                "--pipeline_model_parallel_size", "2", "--decoder_first_pipeline_num_layers", "1",
                "--ckpt_format", "plain", "--save", mcore, env={"NPROC_PER_NODE": "4"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in mcore.glob("mp_rank_*")) == [
        "mp_rank_00_000.safetensors", "mp_rank_00_001.safetensors",
        "mp_rank_01_000.safetensors", "mp_rank_01_001.safetensors"]
    r = run_cli("export", "--load", mcore, "--to_hf", "true", "--save", hf)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(src, hf)


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_file_is_refused(zoo_model, tmp_path):
    model = _copy_model(zoo_model("mistral"), tmp_path / "model")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    save = tmp_path / "out"
    r = run_cli("export", "--model", model, "--to-mcore", "--save", save)
    assert r.returncode == 2
    assert "truncated" in r.stderr and "model.safetensors" in r.stderr
    assert_nothing_written(save)


def test_missing_tensor_is_named(zoo_model, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _copy_model(zoo_model("mistral"), tmp_path / "model")
    tensors = load_file(model / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    save = tmp_path / "out"
    r = run_cli("export", "--model", model, "--to-mcore", "--save", save)
    assert r.returncode == 2
    assert "missing 1 tensor(s): model.layers.2.mlp.up_proj.weight" in r.stderr
    assert_nothing_written(save)


def test_layout_that_does_not_divide_is_refused(zoo_model, tmp_path):
    save = tmp_path / "out"
    r = run_cli("export", "--model", zoo_model("qwen2"), "--to-mcore", "--tp", "3", "--save", save)
    assert r.returncode == 2
    assert "4 query groups" in r.stderr and "tp=3" in r.stderr
    assert_nothing_written(save)


def test_unknown_architecture(zoo_model, tmp_path):
    model = _copy_model(zoo_model("qwen2"), tmp_path / "model")
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (model / "config.json").write_text(json.dumps(cfg))
    r = run_cli("export", "--model", model, "--to-mcore", "--save", tmp_path / "out")
    assert r.returncode == 2 and "unknown architecture model_type='gpt_neox'" in r.stderr
    assert "qwen3" in r.stderr  # lists what is supported


def test_existing_output_is_kept_without_overwrite(zoo_model, tmp_path):
    save = tmp_path / "out"
    save.mkdir()
    (save / "precious.txt").write_text("keep me")
    r = run_cli("export", "--model", zoo_model("qwen2"), "--to-hf", "--save", save)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert (save / "precious.txt").read_text() == "keep me"


def test_plain_checkpoint_refuses_other_layout(zoo_model, tmp_path):
    mcore = tmp_path / "mcore"
    assert run_cli("export", "--model", zoo_model("qwen2"), "--to-mcore", "--ckpt-format", "plain",
                   "--save", mcore).returncode == 0
    r = run_cli("export", "--load", mcore, "--to-hf", "--tp", "2", "--save", tmp_path / "hf")
    assert r.returncode == 2 and "tp1-pp1" in r.stderr
    assert_nothing_written(tmp_path / "hf")


def test_failed_write_leaves_nothing(tmp_path):
    """A failure while ranks write (single process here) removes the staging directory."""
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        with collective_output(dest, overwrite=False) as stage:
            (stage / "model-00001-of-00002.safetensors").write_bytes(b"partial")
            raise RuntimeError("disk on fire")
    assert_nothing_written(dest)


def test_overwrite_replaces_previous_output(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with collective_output(dest, overwrite=True, finalize=lambda s: (s / "config.json").write_text("{}")) as stage:
        (stage / "new.txt").write_text("new")
    assert sorted(os.listdir(dest)) == ["config.json", "new.txt"]


def test_verify_reports_and_regression(zoo_model, tmp_path):
    zoo_model("qwen2")  # built once, in the shared cache
    good, bad = tmp_path / "good", tmp_path / "bad"
    r = run_cli("verify", "--model", "builtin:qwen2", "--matrix", "tp=1,2 sp=0,1", "--report", good,
                "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.count("PASS") == 3 and "skip {'tp': 1, 'sp': True}" in r.stdout
    for case in ("tp1-pp1-fp32", "tp2-pp1-fp32", "tp2-pp1-sp-fp32"):
        report = json.loads((good / "qwen2-tiny" / f"{case}.json").read_text())
        assert report["verdict"] == "pass" and report["versions"]["megatron_core"]
        assert report["source"] == "builtin:qwen2"  # as given, not the zoo's cache directory
    assert "qwen2-tiny" in (good / "index.html").read_text()

    r = run_cli("verify", "--model", "builtin:qwen2", "--matrix", "tp=2", "--report", bad, "--device", "cpu",
                "--control", "scale:decoder.layers.1.mlp.linear_fc1.weight:1.01")
    assert r.returncode == 1 and "first diverging: layer.1" in r.stdout
    # the worse set against the good one: the flipped verdict is a regression
    r = run_cli("report", "--baseline", good, "--current", bad)
    assert r.returncode == 1 and "tp2-pp1" in r.stdout


def test_export_with_precision_check(zoo_model, tmp_path):
    r = run_cli("export", "--model", zoo_model("llama"), "--to-mcore", "--tp", "2", "--save", tmp_path / "m",
                "--test_convert_precision", "true", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PASS" in r.stdout and "mean_diff" in r.stdout


def test_moe_roundtrip_with_expert_parallel_seed_spellings(zoo_model, tmp_path):
    """`--expert_model_parallel_size 2 --expert_tensor_parallel_size 1` with tp 2: four processes,
    one Megatron file per distinct (tp, ep) part, and back to the same HF bytes."""
    src = zoo_model("qwen2_moe")
    mcore, hf = tmp_path / "mcore", tmp_path / "hf"
    r = run_cli("export", "--model", src, "--to-mcore", "--tensor_model_parallel_size", "2", "--sp",
                "--expert_model_parallel_size", "2", "--expert_tensor_parallel_size", "1",
                "--nproc-per-node", "4", "--ckpt-format", "plain", "--save", mcore, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(p.name for p in mcore.glob("mp_rank_*"))
    # ranks: (tp, ep) = (0,0) (1,1) (0,0) (1,1) -> replicas 2, 3 write nothing
    assert files == ["mp_rank_00_000_000_x00.safetensors", "mp_rank_01_000_001_x00.safetensors"]
    meta = json.loads((mcore / "mcore_bridge.json").read_text())
    assert meta["layout"]["ep"] == 2 and meta["layout"]["etp"] == 1
    r = run_cli("export", "--load", mcore, "--to-hf", "--save", hf, "--nproc-per-node", "4", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(src, hf)


def test_experts_that_do_not_divide_over_ep_are_refused(zoo_model, tmp_path):
    save = tmp_path / "out"
    r = run_cli("export", "--model", zoo_model("mixtral"), "--to-mcore", "--ep", "3", "--save", save)
    assert r.returncode == 2
    assert "8 experts cannot be split over ep=3" in r.stderr and "--ep" in r.stderr
    assert_nothing_written(save)


def _deepseek_as_published(zoo_model, tmp_path, router_dtype):
    """The zoo's DeepSeek-V3 with DeepSeek-V3's published dtypes: bf16 weights and an fp32
    ``e_score_correction_bias``; the router weight in ``router_dtype``."""
    from mcore_bridge.ckpt_edit import edit_shards

    src = tmp_path / f"dsv3-{router_dtype}"
    shutil.copytree(zoo_model("deepseek_v3"), src)

    def edit(tensors):
        for n, t in tensors.items():
            keep = n.endswith("e_score_correction_bias") or (n.endswith("mlp.gate.weight") and router_dtype == "fp32")
            tensors[n] = t if keep else t.to(torch.bfloat16)

    edit_shards(src, edit)
    return src


def test_an_fp32_router_bias_does_not_make_the_model_fp32(zoo_model, tmp_path):
    """The model dtype is the checkpoint's weights' dtype: megatron keeps the router's expert bias in
    fp32 whatever the model's dtype, so DeepSeek-V3's fp32 bias beside bf16 weights builds a bf16
    model (half the memory of the fp32 one it built before) and still round-trips byte for byte. An
    fp32 router weight, which megatron would cast, keeps the model fp32 (exact)."""
    from mcore_bridge import Bridge

    src = _deepseek_as_published(zoo_model, tmp_path, "bf16")
    assert Bridge(src).source_dtype() == torch.bfloat16
    assert Bridge(_deepseek_as_published(zoo_model, tmp_path, "fp32")).source_dtype() == torch.float32
    mcore, hf = tmp_path / "mcore", tmp_path / "hf"
    r = run_cli("export", "--model", src, "--to-mcore", "--ckpt-format", "plain", "--save", mcore, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(str(next(mcore.glob("*.safetensors"))), "pt") as f:
        dtypes = {n: f.get_slice(n).get_dtype() for n in f.keys()}
    assert dtypes["chunk0.decoder.layers.0.self_attention.linear_proj.weight"] == "BF16"
    assert {d for n, d in dtypes.items() if n.endswith("router.expert_bias")} == {"F32"}
    r = run_cli("export", "--model", src, "--to-hf", "--save", hf, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(src, hf)
