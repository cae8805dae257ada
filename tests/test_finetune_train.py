"""Issue 22 end to end through ``examples/finetune_hf.py`` (its CPU path: Megatron-LM's parser and
sequential sampler, megatron-core's DDP, Adam and schedule, the HF hooks), fp32:

* packed rows (``--packing true``: one row holds the samples of one unpacked micro-batch, THD
  ``PackedSeqParams``) give the unpacked run's per-iteration losses, for a text and a
  vision-language model; negative control: rows whose ``cu_seqlens`` say "one sample" do not;
* Megatron-LM's ``--recompute-granularity full --recompute-method uniform --recompute-num-layers 1``
  reaches the built model's config (the layers run again in backward) and gives the same losses;
  without the flags: no recomputation. Megatron-LM's MoE arguments reach the config too;
* the seed's ``--freeze_vit / --freeze_aligner / --freeze_llm true``: the frozen parts' saved
  weights equal the source's after the steps, the others changed;
* tp2: the HF safetensors saved beside Megatron-LM's checkpoints load in transformers strictly and
  give the logits of megatron's final model; resuming from Megatron-LM's checkpoint continues the
  losses.

megatron-core < 0.17 has no ``megatron.training``: the example's refusal is tested in
``test_finetune_example.py``; here every test checks it too.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

from mcore_bridge.hf_io import HFCheckpoint

ROOT = Path(__file__).resolve().parents[1]
HAS_MLM = importlib.util.find_spec("megatron.training") is not None
CASE = "tests.finetune_cases:run"
BASE = ["--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "3", "--log-interval", "100"]
RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
EQUAL = 1e-6  # fp32, relative (measured on CPU: <= 4e-8)


def _evidence():
    sys.path.insert(0, str(ROOT / "bench"))
    import train_evidence

    return train_evidence


def _refused():
    from mcore_bridge import megatron_lm
    from mcore_bridge.errors import UsageError

    with pytest.raises(UsageError, match="megatron-core 0.17"):
        megatron_lm.require_megatron_training()


def _run(pools, world, tmp_path, name, source, extra, save=None, control=None):
    """``save``: None (nothing saved), "hf" (HF safetensors only, at the end) or "megatron"
    (Megatron-LM's checkpoint every 2 iterations, HF safetensors beside it)."""
    log = tmp_path / f"{name}.jsonl"
    argv = ["--hf_model", source, "--data_dir", tmp_path / "data", "--loss_log", log] + BASE + extra
    argv += {None: ["--save_safetensors", "false"], "hf": ["--save_safetensors_dir", tmp_path / name / "hf"],
             "megatron": ["--save", tmp_path / name, "--save-interval", "2"]}[save]
    out = pools.get(world).run(CASE, timeout=600, argv=[str(a) for a in argv], control=control)
    return out[0], _evidence().read_losses(log)


def _same(a: dict, b: dict, what: str):
    c = _evidence().compare(a, b, [1, 2, 3])
    assert c["max_rel_diff"] <= EQUAL, (what, a, b)


def _packed_and_recomputed(pools, tmp_path, source, vl=False):
    plain, ref = _run(pools, 1, tmp_path, "plain", source, [])
    assert plain["recompute"] == [None, None, None]
    # the VL model takes packed rows always; a text model's attention is adapted only with --packing
    assert plain["packed_attention"] == (plain["layers"] if vl else 0)
    assert plain["layer_calls"] == 3 * plain["micro_batches"] * plain["layers"]  # forward only, no replay
    assert ref[3] < ref[1], ref  # it learns
    packed, losses = _run(pools, 1, tmp_path, "packed", source, ["--packing", "true"])
    assert packed["packed_attention"] == packed["layers"]
    _same(ref, losses, "packed")
    rec, losses = _run(pools, 1, tmp_path, "recompute", source, RECOMPUTE)
    assert rec["recompute"] == ["full", "uniform", 1]
    assert rec["layer_calls"] == 2 * plain["layer_calls"]  # every layer ran again in backward
    _same(ref, losses, "recompute")
    return ref


@pytest.mark.world(1)
def test_text_packed_and_recomputed_runs_match(pools, zoo_model, tmp_path):
    if not HAS_MLM:
        return _refused()
    ref = _packed_and_recomputed(pools, tmp_path, str(zoo_model("qwen3")))
    _, bad = _run(pools, 1, tmp_path, "one_segment", str(zoo_model("qwen3")), ["--packing", "true"],
                  control="one_segment")
    assert abs(bad[1] - ref[1]) > 1e-3 * ref[1], (bad, ref)  # cu_seqlens matter


@pytest.mark.world(1)
def test_vl_packed_and_recomputed_runs_match(pools, zoo_model, tmp_path):
    if not HAS_MLM:
        return _refused()
    _packed_and_recomputed(pools, tmp_path, str(zoo_model("qwen3_vl")), vl=True)


def _part(hf_name: str) -> str:
    if ".visual.merger." in hf_name or ".visual.deepstack_merger_list." in hf_name:
        return "projector"
    return "vision" if ".visual." in hf_name else "language"


@pytest.mark.world(1)
@pytest.mark.parametrize("flags,frozen", [(["--freeze_vit", "true", "--freeze-llm", "true"], {"vision", "language"}),
                                          (["--freeze_aligner", "true"], {"projector"})])
def test_freeze_flags(pools, zoo_model, tmp_path, flags, frozen):
    if not HAS_MLM:
        return _refused()
    src = zoo_model("qwen3_vl")
    out, _ = _run(pools, 1, tmp_path, "frozen", str(src), flags, save="hf")
    a, b = HFCheckpoint(src), HFCheckpoint(out["hf_dirs"][-1])
    assert sorted(a.names()) == sorted(b.names())
    changed = {}
    for n in a.names():
        changed.setdefault(_part(n), []).append(not torch.equal(a.read(n), b.read(n)))
    assert set(changed) == {"vision", "projector", "language"}
    for part, flags_changed in changed.items():
        if part in frozen:
            assert not any(flags_changed), (part, "a frozen weight changed")
        else:
            assert all(flags_changed), (part, "a trained weight did not change")


@pytest.mark.world(1)
def test_moe_arguments_reach_the_model(pools, zoo_model):
    if not HAS_MLM:
        return _refused()
    argv = ["--moe-expert-capacity-factor", "1.5", "--moe-pad-expert-input-to-capacity", "--moe-token-drop-policy",
            "position", "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001"]
    got = pools.get(1).run("tests.finetune_cases:moe_options", timeout=600, source=str(zoo_model("qwen3_moe")),
                           argv=argv)[0]
    assert got["moe_expert_capacity_factor"] == 1.5 and got["moe_pad_expert_input_to_capacity"]
    assert got["moe_token_drop_policy"] == "position" and got["moe_z_loss_coeff"] == 0.001
    assert got["moe_aux_loss_coeff"] == 0.01 and got["moe_router_load_balancing_type"] == "aux_loss"
    plain = pools.get(1).run("tests.finetune_cases:moe_options", timeout=600, source=str(zoo_model("qwen3_moe")),
                             argv=[])[0]
    assert plain["moe_expert_capacity_factor"] is None and plain["moe_token_drop_policy"] == "probs"


@pytest.mark.world(1)
def test_recompute_from_pretrains_config(pools, zoo_model):
    if not HAS_MLM:
        return _refused()
    run = pools.get(1).run
    src = str(zoo_model("qwen3"))
    assert run("tests.finetune_cases:config_recompute", timeout=600, source=src, with_config=True)[0] == [
        "full", "uniform", 1]
    assert run("tests.finetune_cases:config_recompute", timeout=600, source=src, with_config=False)[0] == [
        None, None, None]


@pytest.mark.world(2)
def test_tp2_saved_safetensors_and_resumption(pools, zoo_model, tmp_path):
    """tp2: Megatron-LM's checkpoints with HF safetensors beside them; the last HF directory gives
    the final model's logits; a run resumed from (a copy of) Megatron-LM's checkpoint at iteration 2
    takes iteration 3 as the uninterrupted run did."""
    if not HAS_MLM:
        return _refused()
    import shutil

    src = zoo_model("qwen3")
    probe = tmp_path / "probe.pt"
    tp2 = ["--tensor-model-parallel-size", "2"]
    out, losses = _run(pools, 2, tmp_path, "tp2", str(src), tp2 + ["--probe_out", probe], save="megatron")
    assert losses[3] < losses[1]
    assert [Path(d).name for d in out["hf_dirs"]] == ["iter_0000002", "iter_0000003"]
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "tp2" / "iter_0000002", copy / "iter_0000002")
    (copy / "latest_checkpointed_iteration.txt").write_text("2")
    again, resumed = _run(pools, 2, tmp_path, "resumed", str(src), tp2 + ["--load", copy])
    assert again["resuming"] and not out["resuming"]  # the HF read was skipped (Megatron-LM's checkpoint)
    assert list(resumed) == [3], resumed  # only iteration 3 ran: it resumed
    assert abs(resumed[3] - losses[3]) <= EQUAL * losses[3], (resumed, losses)
    r = _evidence().hf_check(out["hf_dirs"][-1], probe, source=src)
    assert r["strict"], r["loading_info"]
    assert r["max_abs_diff"] < 1e-4, r
    assert r["untrained_max_abs_diff"] > 100 * max(r["max_abs_diff"], 1e-6), r  # negative control


@pytest.mark.world(1)
def test_hooks_write_the_training_dtype_not_the_source_s(pools, zoo_model, tmp_path):
    """An fp32 run from a bf16 checkpoint writes fp32 safetensors holding the model's values (on an
    H200 a bf16 write of an fp32 run gave logits 0.06 off megatron's final model)."""
    if not HAS_MLM:
        return _refused()
    from safetensors.torch import load_file, save_file

    src = tmp_path / "bf16"
    shutil.copytree(zoo_model("qwen3"), src)
    for f in src.glob("*.safetensors"):
        save_file({n: t.to(torch.bfloat16) for n, t in load_file(f).items()}, f, metadata={"format": "pt"})
    got = pools.get(1).run("tests.finetune_cases:saved_dtype", timeout=600, source=str(src),
                           out=str(tmp_path / "hf"))[0]
    assert got == {"dtypes": ["torch.float32"], "embed_equal": True}
