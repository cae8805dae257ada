"""LoRA both ways against the real PEFT on the real transformers models, on CPU process groups.

* megatron LoRA (non-zero B) -> PEFT directory: ``PeftModel.from_pretrained`` loads exactly the
  keys it expects, its forward equals megatron's, and the merged export equals PEFT's
  ``merge_and_unload`` without touching the model's weights;
* a PEFT adapter made by PEFT (a different A for every projection) -> megatron -> PEFT, byte-exact;
* gradients of the LoRA factors at TP / SP / expert-TP layouts equal the single-process ones;
* bad adapters and targets fail with errors that say what is wrong.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from mcore_bridge import ParallelLayout as L
from mcore_bridge.hf_io import HFCheckpoint
from tests import lora_cases
from tests.cases import same_bytes
from tests.matrix import case_id

SPEC = {"r": 4, "alpha": 8.0, "targets": ["all-linear"]}
DENSE = ["qwen3", "llama", "qwen2"]
MOE = ["qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3"]
DENSE_LAYOUTS = [(1, L()), (2, L(tp=2)), (2, L(tp=2, sp=True)), (2, L(pp=2, vpp=2)), (4, L(tp=2, pp=2, sp=True))]
MOE_LAYOUTS = [(1, L()), (2, L(ep=2)), (2, L(tp=2, sp=True, ep=2, etp=1)), (2, L(tp=2, sp=True)),
               (4, L(ep=2, etp=2)), (4, L(tp=2, sp=True, ep=2)), (4, L(pp=2, ep=2))]
ATTENTION = {"deepseek_v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]}
MLP = ["gate_proj", "up_proj", "down_proj"]


def _params(models, layouts):
    return [pytest.param(m, w, lay, id=case_id(m, w, lay), marks=pytest.mark.world(w))
            for w, lay in layouts for m in models]


def _peft(model_dir, adapter_dir):
    """PeftModel on the HF model, plus the keys PEFT expected that the file lacks and the file's
    keys PEFT has no place for (PEFT drops those silently)."""
    import peft
    import transformers
    from safetensors.torch import load_file

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    expected = set(peft.get_peft_model_state_dict(pm))
    stored = set(load_file(f"{adapter_dir}/adapter_model.safetensors"))
    key_warnings = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    return pm, sorted(expected - stored), sorted(stored - expected), key_warnings


def _the(results, key="logits"):
    got = [r[key] for r in results if r[key] is not None]
    assert len(got) == 1
    return got[0]


ROUTER_SPEC = {**SPEC, "targets": ["all-linear", "router"]}
ROUTER_CASES = [pytest.param(m, w, lay, ROUTER_SPEC, id=case_id(m, w, lay) + "-router", marks=pytest.mark.world(w))
                for m, w, lay in [("qwen3_moe", 2, L(tp=2, sp=True, ep=2, etp=1)), ("mixtral", 4, L(pp=2, ep=2)),
                                  ("deepseek_v3", 2, L(ep=2))]]


@pytest.mark.parametrize("model,world,layout,spec", [
    pytest.param(*p.values, SPEC, id=p.id, marks=p.marks) for p in _params(DENSE, DENSE_LAYOUTS) + _params(MOE, MOE_LAYOUTS)
] + ROUTER_CASES)
def test_megatron_lora_exports_a_peft_adapter_that_peft_runs_identically(model, world, layout, spec, pools, zoo_model,
                                                                         tmp_path):
    src = zoo_model(model)
    results = pools.get(world).run(lora_cases.lora_export, timeout=300, source=str(src), layout=layout.to_dict(),
                                   out_dir=str(tmp_path), spec=spec)
    assert all(r["unchanged"] for r in results)  # merging never wrote into the model
    got = _the(results)
    pm, missing, unexpected, key_warnings = _peft(src, tmp_path / "adapter")
    assert missing == [] and unexpected == [] and key_warnings == []
    ids = lora_cases.input_ids(got.shape[-1])
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
        with pm.disable_adapter():
            base = pm(input_ids=ids).logits
    assert (ref - base).abs().max() > 1e-2  # the adapter really changes the model
    assert (ref - got).abs().max() < 2e-5
    # merged export == PEFT's own merge (both fp32), tensor by tensor
    merged = pm.merge_and_unload().state_dict()
    saved = HFCheckpoint(tmp_path / "merged")
    for name in saved.names():
        if name in merged:
            assert torch.allclose(saved.read(name), merged[name], rtol=0, atol=1e-6), name


# -- PEFT-made adapters in ---------------------------------------------------------------------
def _peft_targets(model: str) -> dict:
    """What a PEFT user on transformers 5 writes: attention (and dense-model MLPs) as modules,
    MoE experts (and the MoE models' other MLP linears) as parameters."""
    attention = ATTENTION.get(model, ["q_proj", "k_proj", "v_proj", "o_proj"])
    if model in DENSE:
        return {"target_modules": attention + MLP}
    params = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]  # routers too
    if model in ("qwen2_moe", "deepseek_v3"):  # shared experts / dense layers
        params += [f"{m}.weight" for m in MLP]
    return {"target_modules": attention, "target_parameters": params}


@pytest.fixture(scope="module")
def peft_adapter(zoo_model, tmp_path_factory):
    """``peft_adapter(model)``: a directory saved by PEFT itself, A and B random (so q/k/v and
    gate/up carry different A matrices)."""
    made = {}

    def make(model: str):
        if model not in made:
            import peft
            import transformers

            torch.manual_seed(1)
            hf = transformers.AutoModelForCausalLM.from_pretrained(zoo_model(model), dtype=torch.float32)
            cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **_peft_targets(model))
            out = tmp_path_factory.mktemp(f"peft-{model}")
            peft.get_peft_model(hf, cfg).save_pretrained(out)
            made[model] = out
        return made[model]

    return make


IMPORT_LAYOUTS = [(1, L()), (2, L(tp=2, sp=True)), (2, L(pp=2))]
MOE_IMPORT_LAYOUTS = [(2, L(tp=2, sp=True, ep=2, etp=1)), (4, L(ep=2, etp=2)), (4, L(pp=2, ep=2))]


@pytest.mark.parametrize("model,world,layout", _params(DENSE[:2], IMPORT_LAYOUTS) + _params(MOE, MOE_IMPORT_LAYOUTS))
def test_peft_adapter_imports_and_exports_byte_exact(model, world, layout, pools, zoo_model, peft_adapter, tmp_path):
    src, adapter = zoo_model(model), peft_adapter(model)
    out = tmp_path / "again"
    results = pools.get(world).run(lora_cases.lora_import, timeout=300, source=str(src), layout=layout.to_dict(),
                                   adapter=str(adapter), out_dir=str(out))
    assert all(r["per_projection"] for r in results)  # PEFT drew a different A for every projection
    original, again = HFCheckpoint(adapter, config={}), HFCheckpoint(out, config={})
    assert sorted(again.names()) == sorted(original.names())
    for name in original.names():
        assert same_bytes(again.read(name), original.read(name)), name
    pm, missing, unexpected, _ = _peft(src, out)
    assert missing == [] and unexpected == []
    got = _the(results)
    with torch.no_grad():
        ref = pm(input_ids=lora_cases.input_ids(got.shape[-1])).logits
    assert (ref - got).abs().max() < 2e-5


# -- training: gradients of the factors --------------------------------------------------------
# Not DeepSeek-V3 at TP>1: megatron's local-spec MLA drops TP ranks' shares of the rope key's
# gradient (``gather_from_tensor_model_parallel_region`` backward after the column-parallel
# ``linear_kv_down_proj``), so the base model's own gradients differ from TP=1 there.
GRAD_CASES = [("qwen3", 2, L(tp=2)), ("qwen3", 2, L(tp=2, sp=True)), ("qwen3_moe", 2, L(tp=2, sp=True)),
              ("qwen3_moe", 2, L(tp=2, sp=True, ep=2, etp=1)), ("qwen2_moe", 2, L(tp=2, sp=True, ep=2, etp=1)),
              ("mixtral", 2, L(tp=2, sp=True))]
GRAD_SPEC = {"qwen3": SPEC}  # MoE models: the routers too


@pytest.fixture(scope="module")
def single_process_grads(pools, zoo_model, tmp_path_factory):
    done = {}

    def get(model):
        if model not in done:
            out = tmp_path_factory.mktemp(f"grads-{model}")
            pools.get(1).run(lora_cases.lora_grads, timeout=300, source=str(zoo_model(model)),
                             layout=L().to_dict(), out_dir=str(out), spec=GRAD_SPEC.get(model, ROUTER_SPEC))
            done[model] = HFCheckpoint(out, config={})
        return done[model]

    return get


@pytest.mark.parametrize("model,world,layout", [
    pytest.param(m, w, lay, id=case_id(m, w, lay), marks=pytest.mark.world(w)) for m, w, lay in GRAD_CASES])
def test_lora_gradients_match_the_single_process_ones(model, world, layout, pools, zoo_model, tmp_path,
                                                      single_process_grads):
    ref = single_process_grads(model)  # first: it runs on the 1-process pool
    results = pools.get(world).run(lora_cases.lora_grads, timeout=300, source=str(zoo_model(model)),
                                   layout=layout.to_dict(), out_dir=str(tmp_path), spec=GRAD_SPEC.get(model, ROUTER_SPEC))
    assert all(r["frozen_with_grad"] == [] for r in results)  # only the adapter trains
    got = HFCheckpoint(tmp_path, config={})
    assert sorted(got.names()) == sorted(ref.names())
    worst = max(float((got.read(n) - ref.read(n)).abs().max() / ref.read(n).abs().max().clamp_min(1e-12))
                for n in ref.names())
    assert worst < 1e-4, worst
    assert any(float(ref.read(n).abs().max()) > 0 for n in ref.names() if "lora_A" in n)
    if model != "qwen3":  # the router's factors were trained too
        assert any(".mlp.gate.lora_A" in n and float(ref.read(n).abs().max()) > 0 for n in ref.names())


# -- errors ------------------------------------------------------------------------------------
def _adapter_with(tmp_path, source_adapter, **changes):
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(source_adapter, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.world(1)
def test_adapter_for_another_base_names_the_mismatch(pools, zoo_model, tmp_path):
    import peft
    import transformers

    small = transformers.AutoConfig.from_pretrained(zoo_model("qwen3"))
    small.hidden_size, small.head_dim = 32, 8  # same names, other widths
    hf = transformers.AutoModelForCausalLM.from_config(small)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft.get_peft_model(hf, cfg).save_pretrained(tmp_path / "other")
    [err] = pools.get(1).run(lora_cases.lora_error, timeout=120, source=str(zoo_model("qwen3")),
                             layout=L().to_dict(), adapter=str(tmp_path / "other"))
    assert err.startswith("MappingError") and ".lora_A.weight [(4, 64)]" in err and "model holds (4, 256)" in err, err


@pytest.mark.world(1)
@pytest.mark.parametrize("change,expect", [
    ({"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "foo_proj"]}, "unknown LoRA target 'foo_proj'"),
    ({"target_modules": ["q_proj", "o_proj"]}, "megatron fuses"),
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 8}}, "per-module ranks"),
    ({"r": 8}, "MappingError"),  # the tensors are rank 4: every factor is mis-shaped
], ids=["unknown-target", "partial-qkv", "dora", "modules-to-save", "rank-pattern", "wrong-rank"])
def test_bad_adapters_are_refused(change, expect, pools, zoo_model, peft_adapter, tmp_path):
    adapter = _adapter_with(tmp_path, peft_adapter("qwen3"), **change)
    [err] = pools.get(1).run(lora_cases.lora_error, timeout=120, source=str(zoo_model("qwen3")),
                             layout=L().to_dict(), adapter=str(adapter))
    assert err is not None and expect in err, err


@pytest.mark.world(1)
def test_adapter_missing_a_tensor_is_refused(pools, zoo_model, peft_adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = _adapter_with(tmp_path, peft_adapter("qwen3"))
    tensors = load_file(adapter / "adapter_model.safetensors")
    dropped = sorted(tensors)[3]
    del tensors[dropped]
    save_file(tensors, adapter / "adapter_model.safetensors")
    [err] = pools.get(1).run(lora_cases.lora_error, timeout=120, source=str(zoo_model("qwen3")),
                             layout=L().to_dict(), adapter=str(adapter))
    assert err.startswith("MappingError") and "missing 1 tensor" in err and dropped[len("base_model.model."):] in err, err


@pytest.mark.world(2)
@pytest.mark.parametrize("model,targets,expect", [
    ("qwen3", ["router"], "has no MoE router"), ("qwen3_moe", ["lm_head"], "embeddings"),
    ("qwen3_moe", ["q_proj"], "megatron fuses"),
])
def test_bad_targets_are_refused(model, targets, expect, pools, zoo_model):
    results = pools.get(2).run(lora_cases.lora_error, timeout=120, source=str(zoo_model(model)),
                               layout=(L(ep=2) if "moe" in model else L(tp=2)).to_dict(),
                               spec={"r": 4, "targets": targets})
    assert all(e is not None and expect in e for e in results), results


@pytest.mark.world(2)
def test_lora_on_grouped_experts_is_refused(pools, zoo_model):
    results = pools.get(2).run(lora_cases.lora_error, timeout=120, source=str(zoo_model("qwen3_moe")),
                               layout=L(ep=2).to_dict(), spec=SPEC, grouped=True)
    assert all(e is not None and "grouped_experts" in e for e in results), results


@pytest.mark.world(2)
def test_per_expert_modules_format_runs_in_peft_and_reads_back(pools, zoo_model, tmp_path):
    """``peft_experts="modules"``: one module per expert (transformers-4 adapters); PEFT 0.21
    converts it for qwen3_moe on load, and the bridge reads it back byte-exact."""
    src = zoo_model("qwen3_moe")
    results = pools.get(2).run(lora_cases.lora_export, timeout=300, source=str(src), layout=L(ep=2).to_dict(),
                               out_dir=str(tmp_path), spec=SPEC, peft_experts="modules")
    got = _the(results)
    stored = HFCheckpoint(tmp_path / "adapter", config={})
    assert any(".mlp.experts.7.down_proj.lora_B.weight" in n for n in stored.names())
    assert "target_parameters" not in json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    pm = _peft(src, tmp_path / "adapter")[0]
    with torch.no_grad():
        assert (pm(input_ids=lora_cases.input_ids(got.shape[-1])).logits - got).abs().max() < 2e-5
    again = tmp_path / "again"
    pools.get(2).run(lora_cases.lora_import, timeout=300, source=str(src), layout=L(ep=2).to_dict(),
                     adapter=str(tmp_path / "adapter"), out_dir=str(again))
    back = HFCheckpoint(again, config={})  # written in the default (stacked parameters) form
    assert any(n.endswith("mlp.experts.base_layer.lora_A.weight") for n in back.names())


def test_targets_resolve_in_both_namings(zoo_model):
    """Which megatron kinds a target list selects (no process group needed)."""
    import json as _json

    from mcore_bridge.families import family_for
    from mcore_bridge.lora.spec import target_kinds

    moe = family_for(_json.loads((zoo_model("qwen3_moe") / "config.json").read_text()))
    every = {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"}
    assert target_kinds(moe, ["all-linear"]) == every
    assert target_kinds(moe, ["all-linear", "router"]) == every | {"router"}
    assert target_kinds(moe, ["q_proj", "k_proj", "v_proj", "gate"]) == {"linear_qkv", "router"}
    assert target_kinds(moe, ["linear_fc2", "down_proj"]) == {"linear_fc2"}
