"""LoRA through the command line with the seed's spellings: PEFT -> Megatron adapter checkpoint
(torch_dist, resharded on the way back) -> PEFT byte-exact, merged exports to HF and to torch_dist,
``--test-convert-precision`` against HF + PeftModel, ``verify --adapters``, and failures that leave
nothing behind."""

from __future__ import annotations

import json

import pytest
import torch

from mcore_bridge.hf_io import HFCheckpoint
from tests.test_cli import assert_nothing_written, run_cli


@pytest.fixture(scope="module")
def adapter(zoo_model, tmp_path_factory):
    """A PEFT adapter for qwen2_moe made by PEFT (dense layer, shared expert, routed experts, router)."""
    import peft
    import transformers

    torch.manual_seed(2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(zoo_model("qwen2_moe"), dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight",
                                             "gate_proj.weight", "up_proj.weight", "down_proj.weight"])
    out = tmp_path_factory.mktemp("peft-qwen2_moe")
    peft.get_peft_model(hf, cfg).save_pretrained(out)
    return out


def _same_adapter(a, b):
    x, y = HFCheckpoint(a, config={}), HFCheckpoint(b, config={})
    assert sorted(x.names()) == sorted(y.names())
    for n in x.names():
        assert torch.equal(x.read(n), y.read(n)), n


def test_adapter_round_trip_through_megatron_checkpoint(zoo_model, adapter, tmp_path):
    src = zoo_model("qwen2_moe")
    mc, peft_out = tmp_path / "mcore-adapter", tmp_path / "peft"
    r = run_cli("export", "--model", src, "--adapters", adapter, "--to_mcore", "true", "--merge_lora", "false",
                "--tensor_model_parallel_size", "2", "--sequence_parallel", "--expert_model_parallel_size", "2",
                "--expert_tensor_parallel_size", "1", "--save", mc, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((mc / "mcore_bridge.json").read_text())
    assert meta["content"] == "adapter" and meta["lora"]["r"] == 4 and meta["lora"]["per_projection"]
    # adapter-only: no base weight in the checkpoint
    r = run_cli("export", "--model", src, "--adapter_load", mc, "--to_hf", "true", "--save", peft_out,
                "--pp", "2", "--device", "cpu", "--test_convert_precision", "true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tp1-pp2-lora " in r.stdout and "PASS" in r.stdout
    _same_adapter(adapter, peft_out)
    cfg = json.loads((peft_out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16 and "mlp.experts.gate_up_proj" in cfg["target_parameters"]


def test_merged_exports_to_hf_and_torch_dist_agree_with_peft(zoo_model, adapter, tmp_path):
    import peft
    import transformers

    src = zoo_model("qwen2_moe")
    hf_merged, mc_merged, back = tmp_path / "hf-merged", tmp_path / "mc-merged", tmp_path / "back"
    r = run_cli("export", "--model", src, "--adapters", adapter, "--to-hf", "--merge-lora", "--ep", "2",
                "--save", hf_merged, "--device", "cpu", "--test-convert-precision")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("export", "--model", src, "--adapters", adapter, "--to-mcore", "--merge-lora", "--tp", "2",
                "--save", mc_merged, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lora" not in json.loads((mc_merged / "mcore_bridge.json").read_text())
    r = run_cli("export", "--load", mc_merged, "--to-hf", "--save", back, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(hf, adapter).merge_and_unload().state_dict()
    for out in (hf_merged, back):
        saved = HFCheckpoint(out)
        names = [n for n in saved.names() if n in ref]
        assert len(names) > 20
        for n in names:
            assert torch.allclose(saved.read(n), ref[n], rtol=0, atol=1e-6), (out.name, n)


def test_verify_with_adapters_passes_and_reports_the_adapter(zoo_model, adapter, tmp_path):
    r = run_cli("verify", "--model", zoo_model("qwen2_moe"), "--adapters", adapter, "--matrix", "tp=2 sp=1 ep=2",
                "--report", tmp_path / "reports", "--device", "cpu", timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    [report] = list((tmp_path / "reports").glob("*/*-lora-fp32.json"))
    data = json.loads(report.read_text())
    assert data["verdict"] == "pass" and data["adapter"]["r"] == 4 and data["adapter"]["per_projection"]


def test_adapter_errors_leave_nothing(zoo_model, adapter, tmp_path):
    save = tmp_path / "out"
    r = run_cli("export", "--model", zoo_model("qwen3"), "--adapters", adapter, "--to-hf", "--save", save,
                "--device", "cpu")
    out = r.stderr + r.stdout
    assert r.returncode != 0 and "qwen3 has no MoE router" in out, out[-3000:]  # a MoE adapter on a dense model
    assert_nothing_written(save)
    r = run_cli("export", "--model", zoo_model("qwen3"), "--adapters", adapter, "--adapter-load", adapter,
                "--to-hf", "--save", save, "--device", "cpu")
    assert r.returncode != 0 and "pass one" in r.stderr
    assert_nothing_written(save)
