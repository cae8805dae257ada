"""Megatron-LM's training loop with the HF hooks (``mcore_bridge.megatron_lm``): the model from an HF
directory, weights from its safetensors, HF safetensors written at Megatron-LM's saves, resumption
from Megatron-LM's own checkpoint. On CPU (see ``tests/megatron_lm_train_cases.py`` for which of
Megatron-LM's pieces run: ``pretrain`` itself needs CUDA). Where megatron-core ships no
``megatron.training`` (0.16.1, the 3.11 leg) the hooks refuse with an error naming the requirement."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mcore_bridge import megatron_lm
from mcore_bridge.errors import UsageError
from mcore_bridge.hf_io import HFCheckpoint
from tests import megatron_lm_train_cases as cases

HAS_MLM = importlib.util.find_spec("megatron.training") is not None


def _assert_refused():
    with pytest.raises(UsageError, match=r"megatron.training \(shipped in megatron-core 0.17\+ wheels"):
        megatron_lm.require_megatron_training()
    with pytest.raises(UsageError, match="megatron-core 0.17"):
        with megatron_lm.saving_safetensors(megatron_lm.HFHooks("builtin:qwen3")):
            pass


def test_flags_and_refusals():
    """The seed's spellings parse (dashes too); misuse is refused by name; without megatron.training
    (megatron-core < 0.17) every hook into Megatron-LM says what it needs."""
    import argparse

    p = megatron_lm.add_arguments(argparse.ArgumentParser())
    a = p.parse_args(["--hf_model", "m", "--load_safetensors", "true", "--save-safetensors", "false"])
    assert (a.hf_model, a.load_safetensors, a.save_safetensors) == ("m", True, False)
    with pytest.raises(SystemExit):
        p.parse_args(["--load_safetensors", "maybe"])
    with pytest.raises(UsageError, match="--hf_model is required"):
        megatron_lm.HFHooks("")
    with pytest.raises(UsageError, match="needs LoRA"):
        megatron_lm.HFHooks("builtin:qwen3", adapter_only=True)
    # the seed's packing and freeze flags; the freeze flags become TrainOptions.freeze
    a = p.parse_args(["--hf_model", "m", "--packing", "true", "--freeze_vit", "true", "--freeze-llm", "true"])
    assert a.packing and megatron_lm.training_options(a).freeze == ("vision", "language")
    assert megatron_lm.training_options(p.parse_args([])).freeze == ()
    # a vision-language family: its language model's arguments, mRoPE with the model's sections
    vl = megatron_lm.model_arguments("builtin:qwen3_vl")
    i = vl.index("--position-embedding-type")
    assert vl[i + 1: i + 6] == ["mrope", "--mrope-section", "6", "5", "5"], vl
    with pytest.raises(UsageError, match="internvl is neither a RoPE text model nor an mRoPE"):
        megatron_lm.model_arguments("builtin:internvl")  # VL with 1-D RoPE: not mapped (yet)
    argv = megatron_lm.model_arguments("builtin:qwen3")
    assert argv[argv.index("--num-layers") + 1] == "4" and "--qk-layernorm" in argv
    assert "--untie-embeddings-and-output-weights" not in argv  # qwen3 tiny ties them
    moe = megatron_lm.model_arguments("builtin:qwen3_moe")
    assert moe[moe.index("--num-experts") + 1] == "8" and "--untie-embeddings-and-output-weights" in moe
    if not HAS_MLM:
        _assert_refused()
        return
    megatron_lm.require_megatron_training()  # imports where the wheel ships it


def _check_run(r0: dict, source, tmp_path, expect_iters=(2, 4), vl=False):
    """Shared expectations of a training run (rank 0's result)."""
    import transformers

    assert r0["wrapped_inside"] and r0["restored"], r0
    losses = r0["losses"]
    assert all(x == x and x > 0 for x in losses), losses
    assert losses[2] < losses[0] and losses[3] < losses[1], losses  # the same batches again: it learns
    # the HF directories, one per Megatron-LM save, beside Megatron-LM's own iteration directories
    assert r0["hf_dirs"] == [str(tmp_path / "mlm" / "hf" / f"iter_{i:07d}") for i in expect_iters]
    for i in expect_iters:
        assert (tmp_path / "mlm" / f"iter_{i:07d}").is_dir()  # Megatron-LM's checkpoint
    assert not list((tmp_path / "mlm" / "hf").glob("*tmp*")) and not list((tmp_path / "mlm" / "hf").glob(".*"))
    # the last HF directory loads strictly in transformers and gives megatron's final logits (fp32)
    last = r0["hf_dirs"][-1]
    cls = transformers.AutoModelForImageTextToText if vl else transformers.AutoModelForCausalLM
    hf, info = cls.from_pretrained(last, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        got = hf(input_ids=r0["probe"], use_cache=False).logits.float()
        before = cls.from_pretrained(source, dtype=torch.float32)(input_ids=r0["probe"], use_cache=False).logits.float()
    meg = r0["logits"]
    diff, control = (got - meg).abs().max().item(), (before - meg).abs().max().item()
    assert diff < 1e-4, diff
    assert control > 100 * max(diff, 1e-6), (diff, control)  # negative control: the untrained model differs
    # names and shapes as the source's; training changed the weights
    a, b = HFCheckpoint(source), HFCheckpoint(last)
    assert sorted(a.names()) == sorted(b.names())
    assert any(not torch.equal(a.read(n), b.read(n)) for n in a.names())
    # resumption from Megatron-LM's checkpoint at step 2: no HF read, the weights came from it, and
    # steps 3.. give the uninterrupted run's losses
    assert not r0["hf_read_on_resume"] and r0["changed_by_load"] and r0["tracker"] == str(expect_iters[-1])
    assert r0["resumed"] == losses[2:], (r0["resumed"], losses)


@pytest.mark.world(1)
def test_megatron_lm_loop_ws1(pools, zoo_model, tmp_path):
    if not HAS_MLM:
        _assert_refused()
        return
    src = zoo_model("qwen3")
    r = pools.get(1).run(cases.train, timeout=600, source=str(src), tp=1, pp=1, out=str(tmp_path))
    _check_run(r[0], src, tmp_path)


@pytest.mark.world(1)
def test_megatron_lm_loop_moe(pools, zoo_model, tmp_path):
    """A MoE model (qwen3_moe: routed experts, untied embeddings), Megatron-LM's MoE arguments from
    ``model_arguments``."""
    if not HAS_MLM:
        _assert_refused()
        return
    src = zoo_model("qwen3_moe")
    r = pools.get(1).run(cases.train, timeout=600, source=str(src), tp=1, pp=1, out=str(tmp_path))
    _check_run(r[0], src, tmp_path)


@pytest.mark.world(1)
def test_megatron_lm_loop_vl(pools, zoo_model, tmp_path):
    """A vision-language model (Qwen3-VL: the vision tower in Megatron-LM's checkpoint beside the
    language model, mRoPE), Megatron-LM's arguments from ``model_arguments`` (its language model):
    saves, strict reload, resumption as for text (text-only rows)."""
    if not HAS_MLM:
        _assert_refused()
        return
    src = zoo_model("qwen3_vl")
    r = pools.get(1).run(cases.train, timeout=600, source=str(src), tp=1, pp=1, out=str(tmp_path))
    _check_run(r[0], src, tmp_path, vl=True)


@pytest.mark.world(2)
def test_megatron_lm_loop_pp2(pools, zoo_model, tmp_path):
    """Two pipeline stages (the provider's pre/post-process chunks; tied embeddings across stages).
    pp, not tp: Megatron-LM's argument validation asks the GPU's architecture when tp > 1."""
    if not HAS_MLM:
        _assert_refused()
        return
    src = zoo_model("qwen3")
    r = pools.get(2).run(cases.train, timeout=600, source=str(src), tp=1, pp=2, out=str(tmp_path))
    assert r[0]["losses"] == [None] * 4 and r[0]["logits"] is None  # the first stage computes no loss
    assert r[0]["hf_dirs"] == r[1]["hf_dirs"]
    _check_run(r[1], src, tmp_path)


@pytest.mark.world(1)
def test_megatron_lm_loop_lora_adapter_only(pools, zoo_model, tmp_path):
    """``--hf_lora_rank 4 --save_safetensors_adapter_only true``: only the LoRA factors train; each
    save writes the PEFT adapter alone, which PEFT loads onto the HF base and which then gives
    megatron's logits (fp32)."""
    if not HAS_MLM:
        _assert_refused()
        return
    import peft
    import transformers

    src = zoo_model("qwen3")
    r = pools.get(1).run(cases.train, timeout=600, source=str(src), tp=1, pp=1, out=str(tmp_path), lora_rank=4,
                         resume=False)[0]
    assert r["wrapped_inside"] and r["restored"]
    assert r["losses"][2] < r["losses"][0], r["losses"]
    last = tmp_path / "mlm" / "hf" / "iter_0000004"
    assert r["hf_dirs"][-1] == str(last)
    assert sorted(p.name for p in last.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    base = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        before = base(input_ids=r["probe"], use_cache=False).logits.float()
        model = peft.PeftModel.from_pretrained(base, last)
        got = model(input_ids=r["probe"], use_cache=False).logits.float()
    diff, control = (got - r["logits"]).abs().max().item(), (before - r["logits"]).abs().max().item()
    assert diff < 1e-4 and control > 100 * max(diff, 1e-6), (diff, control)
