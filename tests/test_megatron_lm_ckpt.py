"""Checkpoints written the way Megatron-LM's training loop writes them (megatron-core's DDP,
optimizer, scheduler and dist_checkpointing; see ``tests/megatron_lm_cases.py``) convert with the CLI:
the optimizer/RNG/args entries are left unread and listed in one line, the HF output is the
trained weights byte for byte; a checkpoint lacking a model tensor or holding one the model does not
have is refused by name (exit 2, no traceback, no output); a full (weights + LoRA) checkpoint serves
as an adapter source; a LoRA model whose tensor was not filled is refused."""

from __future__ import annotations

import argparse
import datetime
import json
import re

import pytest
import torch

from mcore_bridge import ParallelLayout as L
from mcore_bridge.hf_io import HFCheckpoint
from tests import megatron_lm_cases as mlc
from tests.test_cli import assert_nothing_written, assert_same_weights, run_cli

VARIANTS = {"good": {}, "missing": {"drop": ["output_layer.weight"]},
            "extra": {"extra": "decoder.layers.self_attention.q_layernorm.weight"}}


def _convert(ckpt, model, save, *extra):
    return run_cli("export", "--load", ckpt, "--model", model, "--to-hf", "--save", save, "--device", "cpu", *extra)


def _assert_trained(results, src, reference):
    for r in results:
        assert r["exp_avg_tensors"] > 0 and r["exp_avg_abs_sum"] > 0, r  # one real step was taken
    a, b = HFCheckpoint(src), HFCheckpoint(reference)
    assert any(not torch.equal(a.read(n), b.read(n)) for n in a.names()), "training changed nothing"


@pytest.mark.world(1)
def test_training_checkpoint_converts_and_mismatches_are_named(pools, zoo_model, tmp_path):
    src = zoo_model("llama")
    results = pools.get(1).run(mlc.train_and_save, timeout=300, source=str(src), layout=L().to_dict(),
                               out=str(tmp_path), variants=VARIANTS)
    _assert_trained(results, src, tmp_path / "reference")
    assert (tmp_path / "good" / "latest_checkpointed_iteration.txt").read_text() == "5"
    from megatron.core.enums import ModelType

    with torch.serialization.safe_globals([argparse.Namespace, ModelType]):
        common = torch.load(tmp_path / "good" / "iter_0000005" / "common.pt")
    hf_config = json.loads((src / "config.json").read_text())
    assert common["args"].num_layers == hf_config["num_hidden_layers"] and common["iteration"] == 5 and "opt_param_scheduler" in common

    out = tmp_path / "hf"
    r = _convert(tmp_path / "good", src, out)
    assert r.returncode == 0, r.stderr[-3000:]
    ignored = [line for line in r.stdout.splitlines() if line.startswith("ignored ")]
    assert len(ignored) == 1, r.stdout
    assert "optimizer (" in ignored[0] and "rng_state (1)" in ignored[0], ignored
    for entry in ("args", "opt_param_scheduler", "num_floating_point_operations_so_far"):
        assert entry in ignored[0]
    assert_same_weights(tmp_path / "reference", out)  # the trained weights, byte for byte
    # megatron's own writer's records are whole tensors too: most go file to file (unsplice)
    copied = re.search(r"(\d+) of (\d+) parameters written from the source files' bytes", r.stdout)
    assert copied and int(copied.group(1)) > int(copied.group(2)) // 2, r.stdout

    # lacks a tensor the model needs (as a tied-embedding checkpoint lacks output_layer.weight)
    save = tmp_path / "hf-missing"
    r = _convert(tmp_path / "missing", src, save)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "lacks 1 tensor(s) this model needs: ['output_layer.weight']" in r.stderr
    assert "Traceback" not in r.stderr
    assert_nothing_written(save)
    # the same through the CLI's own torchrun relaunch (2 processes): every rank fails, exit 2 as well
    r = _convert(tmp_path / "missing", src, save, "--tp", "2")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "['output_layer.weight']" in r.stderr
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr, r.stderr[-3000:]
    assert_nothing_written(save)

    # holds a model tensor the model does not have
    save = tmp_path / "hf-extra"
    r = _convert(tmp_path / "extra", src, save)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "does not have: ['decoder.layers.self_attention.q_layernorm.weight']" in r.stderr
    assert "Traceback" not in r.stderr
    assert_nothing_written(save)

    # read as another model whose tensors have other shapes
    save = tmp_path / "hf-shapes"
    r = _convert(tmp_path / "good", zoo_model("qwen3"), save)
    assert r.returncode == 2 and "Global shape mismatch" in r.stderr and "for key decoder." in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert_nothing_written(save)

    # common.pt with an object torch.load(weights_only=True) refuses (megatron-core reads it so)
    path = tmp_path / "extra" / "iter_0000005" / "common.pt"
    common["args"].started = datetime.datetime(2026, 1, 1)
    torch.save(common, path)
    save = tmp_path / "hf-unsafe"
    r = _convert(tmp_path / "extra", src, save)
    assert r.returncode == 2 and "common.pt: refused by torch.load(weights_only=True)" in r.stderr, r.stderr[-3000:]
    assert "datetime.datetime" in r.stderr and "Traceback" not in r.stderr
    assert_nothing_written(save)


@pytest.mark.world(2)
def test_moe_training_checkpoint_from_expert_parallel_converts(pools, zoo_model, tmp_path):
    """ep2 (dense parameters data-parallel over 2 ranks, experts split), the MoE model's two chained
    optimizers with the older ``chained_<i>.`` key prefix; converted at another layout (one process)."""
    src = zoo_model("qwen3_moe")
    results = pools.get(2).run(mlc.train_and_save, timeout=300, source=str(src), layout=L(ep=2).to_dict(),
                               out=str(tmp_path), variants={"good": {}}, prefixed_optimizer=True)
    assert {r["optimizer"] for r in results} == {"ChainedOptimizer"}
    _assert_trained(results, src, tmp_path / "reference")
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(tmp_path / "good" / "iter_0000005")).read_metadata().state_dict_metadata
    assert any(k.startswith("chained_1.optimizer.state.exp_avg.") for k in keys)
    out = tmp_path / "hf"
    r = _convert(tmp_path / "good", src, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ignored " in r.stdout and "optimizer (" in r.stdout
    assert_same_weights(tmp_path / "reference", out)


@pytest.fixture(scope="module")
def llama_adapter(zoo_model, tmp_path_factory):
    """A PEFT adapter for the llama tiny model, made by PEFT with non-zero B."""
    import peft
    import transformers

    torch.manual_seed(5)
    hf = transformers.AutoModelForCausalLM.from_pretrained(zoo_model("llama"), dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    out = tmp_path_factory.mktemp("peft-llama")
    peft.get_peft_model(hf, cfg).save_pretrained(out)
    return out


@pytest.mark.world(1)
def test_full_lora_checkpoint_is_an_adapter_source(pools, zoo_model, llama_adapter, tmp_path):
    src = zoo_model("llama")
    full = tmp_path / "full"
    pools.get(1).run(mlc.save_full_lora, timeout=300, source=str(src), adapter=str(llama_adapter), out=str(full))
    out = tmp_path / "peft"
    r = run_cli("export", "--model", src, "--adapter-load", full, "--to-hf", "--save", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = HFCheckpoint(llama_adapter, config={}), HFCheckpoint(out, config={})
    assert sorted(a.names()) == sorted(b.names()) and len(a.names()) > 10
    for n in a.names():
        assert torch.equal(a.read(n), b.read(n)), n


@pytest.mark.world(1)
def test_lora_model_with_an_unfilled_tensor_is_refused(pools, zoo_model, llama_adapter, tmp_path):
    name = "decoder.final_layernorm.weight"
    err = pools.get(1).run(mlc.unfilled_base_tensor, timeout=300, source=str(zoo_model("llama")),
                           adapter=str(llama_adapter), out=str(tmp_path / "full"), name=name)[0]
    assert err.startswith("MappingError") and "were not filled from the checkpoint" in err and name in err, err
