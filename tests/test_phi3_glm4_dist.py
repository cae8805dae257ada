"""Phi-3 and GLM-4 on CPU process groups: deliberate errors inside the fused and sandwich parts are
caught by fp32 verification and located at their layer, and LoRA on the fused modules round-trips
with the real PEFT (the round trips and the fp32 matrix itself run in test_roundtrip / test_verify,
which cover every zoo.DENSE model)."""

from __future__ import annotations

import pytest
import torch

from mcore_bridge import ParallelLayout as L
from mcore_bridge.hf_io import HFCheckpoint
from tests import lora_cases, verify_cases
from tests.cases import same_bytes
from tests.matrix import case_id

CONTROLS = [  # (model, layout, control, the probe that must be named first, an HF tensor it names)
    ("phi3", L(tp=2), "swap_qk:1", "layer.1", "model.layers.1.self_attn.qkv_proj.weight"),
    ("phi3", L(pp=2), "scale:decoder.layers.3.mlp.linear_fc1.weight:1.01", "layer.3",
     "model.layers.3.mlp.gate_up_proj.weight"),
    ("glm4", L(tp=2, sp=True), "swap_qk:2", "layer.2", "model.layers.2.self_attn.q_proj.weight"),
    ("glm4", L(pp=2), "scale:decoder.layers.2.post_mlp_layernorm.weight:1.01", "layer.2",
     "model.layers.2.post_mlp_layernorm.weight"),
    ("glm4", L(), "scale:decoder.layers.1.post_self_attn_layernorm.weight:1.01", "layer.1",
     "model.layers.1.post_self_attn_layernorm.weight"),
]


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("reference-cache"))


@pytest.mark.parametrize("model,layout,control,where,hf_name", [
    pytest.param(*c, id=f"{c[0]}-{c[1].short()}-{c[2].split(':')[0]}-{c[3]}",
                 marks=pytest.mark.world(c[1].model_parallel_size)) for c in CONTROLS])
def test_negative_control_is_caught_and_located(model, layout, control, where, hf_name, pools, zoo_model, ref_cache):
    out = pools.get(layout.model_parallel_size).run(
        verify_cases.verify, timeout=300, source=str(zoo_model(model)), layout=layout.to_dict(),
        reference_cache=ref_cache, control=control)
    r = next(x for x in out if x is not None)
    assert r["verdict"] == "fail"
    first = r["first_diverging"]
    assert first is not None and first["probe"] == where
    assert hf_name in first["hf_params"]
    before = r["layers"][: [p["probe"] for p in r["layers"]].index(where)]
    assert before and all(p["ok"] for p in before)  # clean up to the injected layer
    if control.startswith("scale:"):
        assert control.split(":")[1] in first["mcore_params"]


# -- LoRA on the fused modules -----------------------------------------------------------------
SPEC = {"r": 4, "alpha": 8.0, "targets": ["all-linear"]}
LAYOUTS = [(1, L()), (2, L(tp=2, sp=True)), (2, L(pp=2))]
TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
           "glm4": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]}


def _params(models, layouts):
    return [pytest.param(m, w, lay, id=case_id(m, w, lay), marks=pytest.mark.world(w))
            for w, lay in layouts for m in models]


def _peft_model(model_dir, adapter_dir):
    import peft
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(hf, adapter_dir).eval()


def _the_logits(results):
    got = [r["logits"] for r in results if r["logits"] is not None]
    assert len(got) == 1
    return got[0]


@pytest.mark.parametrize("model,world,layout", _params(["phi3", "glm4"], LAYOUTS[1:2]) + _params(["phi3"], LAYOUTS[:1]))
def test_megatron_lora_on_fused_modules_runs_identically_in_peft(model, world, layout, pools, zoo_model, tmp_path):
    src = zoo_model(model)
    results = pools.get(world).run(lora_cases.lora_export, timeout=300, source=str(src), layout=layout.to_dict(),
                                   out_dir=str(tmp_path), spec=SPEC)
    assert all(r["unchanged"] for r in results)
    saved = HFCheckpoint(tmp_path / "adapter", config={}).names()
    assert any("gate_up_proj.lora_B" in n for n in saved)
    assert any("qkv_proj.lora_A" in n for n in saved) is (model == "phi3")
    got = _the_logits(results)
    pm = _peft_model(src, tmp_path / "adapter")
    ids = lora_cases.input_ids(got.shape[-1])
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
        with pm.disable_adapter():
            base = pm(input_ids=ids).logits
    assert (ref - base).abs().max() > 1e-2  # the adapter changes the model
    assert (ref - got).abs().max() < 2e-5
    merged = pm.merge_and_unload().state_dict()
    out = HFCheckpoint(tmp_path / "merged")
    for name in ("model.layers.1.self_attn.qkv_proj.weight" if model == "phi3" else
                 "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.gate_up_proj.weight"):
        assert torch.allclose(out.read(name), merged[name], rtol=0, atol=1e-6), name


@pytest.fixture(scope="module")
def peft_adapter(zoo_model, tmp_path_factory):
    made = {}

    def make(model):
        if model not in made:
            import peft
            import transformers

            torch.manual_seed(1)
            hf = transformers.AutoModelForCausalLM.from_pretrained(zoo_model(model), dtype=torch.float32)
            cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS[model])
            made[model] = tmp_path_factory.mktemp(f"peft-{model}")
            peft.get_peft_model(hf, cfg).save_pretrained(made[model])
        return made[model]

    return make


@pytest.mark.parametrize("model,world,layout", _params(["phi3"], LAYOUTS[1:]) + _params(["glm4"], LAYOUTS[1:2]))
def test_peft_adapter_on_fused_modules_imports_and_exports_byte_exact(model, world, layout, pools, zoo_model,
                                                                      peft_adapter, tmp_path):
    src, adapter = zoo_model(model), peft_adapter(model)
    out = tmp_path / "again"
    results = pools.get(world).run(lora_cases.lora_import, timeout=300, source=str(src), layout=layout.to_dict(),
                                   adapter=str(adapter), out_dir=str(out))
    # q/k/v as separate PEFT modules carry different A (stacked); a fused qkv_proj has one A
    assert all(r["per_projection"] is (model == "glm4") for r in results)
    original, again = HFCheckpoint(adapter, config={}), HFCheckpoint(out, config={})
    assert sorted(again.names()) == sorted(original.names())
    for name in original.names():
        assert same_bytes(again.read(name), original.read(name)), name
    got = _the_logits(results)
    with torch.no_grad():
        ref = _peft_model(src, out)(input_ids=lora_cases.input_ids(got.shape[-1])).logits
    assert (ref - got).abs().max() < 2e-5


@pytest.mark.parametrize("model", ["phi3", "glm4"])
def test_lora_gradients_on_fused_modules_match_the_single_process_ones(model, pools, zoo_model, tmp_path):
    """LoRA factor gradients (through the fused qkv / gate_up B split and the sandwich norms) at
    tp2 + sp equal the single-process ones, exported in PEFT names."""
    grads = {}
    for world, layout in ((1, L()), (2, L(tp=2, sp=True))):
        out = tmp_path / f"ws{world}"
        results = pools.get(world).run(lora_cases.lora_grads, timeout=300, source=str(zoo_model(model)),
                                       layout=layout.to_dict(), out_dir=str(out), spec=SPEC)
        assert all(r["frozen_with_grad"] == [] for r in results)  # only the adapter trains
        grads[world] = HFCheckpoint(out, config={})
    ref, got = grads[1], grads[2]
    assert sorted(got.names()) == sorted(ref.names())
    assert any("gate_up_proj.lora_B" in n for n in ref.names())
    worst = max(float((got.read(n) - ref.read(n)).abs().max() / ref.read(n).abs().max().clamp_min(1e-12))
                for n in ref.names())
    assert worst < 1e-4, worst
    assert all(float(ref.read(n).abs().max()) > 0 for n in ref.names() if "qkv_proj.lora_A" in n or "q_proj.lora_A" in n)


# -- TransformerEngine layout: the sandwich norms are standalone TENorms there --------------------
@pytest.mark.world(2)
def test_glm4_te_keys_equal_megatron_te_model_tp2_sp(pools, zoo_model):
    from tests import te_cases
    from tests.test_te_layout import check_keys

    results = pools.get(2).run(te_cases.te_keys, source=str(zoo_model("glm4")), layout=L(tp=2, sp=True).to_dict())
    check_keys(results, "glm4", "tp2-sp")
    assert all(r["local_differs"] > 0 for r in results)  # control: the local layout is not the TE one
