"""Qwen3.5-MoE's multi-token-prediction layer (``families/qwen3_5.py``, ``Qwen35MoE`` on Qwen3-Next's
MTPMixin hooks, ``qwen3_next.QwenNextMTP``).

The published Qwen3.5-MoE / Qwen3.6-MoE checkpoints hold one MTP layer (``text_config``
``mtp_num_hidden_layers: 1``) at the top level, ``mtp.*``: ``mtp.fc``, ``mtp.pre_fc_norm_embedding`` /
``_hidden``, ``mtp.norm`` and ``mtp.layers.0.*``, a gated full-attention layer with the model's MoE
(routed experts, a shared expert behind a sigmoid gate), as vLLM's ``Qwen3_5MoeMTP`` loads it. The zoo
variant ``qwen3_5_moe_mtp`` stores it so. Strict accounting in every layout, stacked-expert storage
read; byte-exact round trips (ws1, and tp2+sp with ep2 over the MTP layer's experts too); fp32
verification with images gated on the loss tokens, the MTP head against our reference of the formula
(verify/mtp.py), router agreement of the main model; a perturbed MTP expert weight caught and located
at ``mtp.0``. Shared scaffolding: tests/mtp_cases.py."""

from __future__ import annotations

import pytest

from mcore_bridge import ParallelLayout as L
from mcore_bridge.families import UnsupportedConfig
from mcore_bridge.plan import expected_hf_names, inventory
from tests import mtp_cases as mc
from tests.matrix import case_id

MODEL = "qwen3_5_moe_mtp"
MAIN = "model.language_model."


def test_rules_name_the_mtp_layers_moe(zoo_model):
    fam = mc.adapted(mc.config(zoo_model, MODEL), mc.saved(zoo_model, MODEL))
    assert fam.mtp_layers == 1 and fam.architecture.config["mtp_num_layers"] == 1
    rows = mc.check_rules_name_the_mtp_tensors(fam, MAIN + "embed_tokens.weight")
    mlp = "mtp.layers.0.transformer_layer.mlp."
    assert rows[mlp + "router.weight"].hf == ("mtp.layers.0.mlp.gate.weight",)
    assert rows[mlp + "shared_experts.gate_weight"].hf == ("mtp.layers.0.mlp.shared_expert_gate.weight",)
    assert rows[mlp + "shared_experts.linear_fc2.weight"].hf == ("mtp.layers.0.mlp.shared_expert.down_proj.weight",)
    assert rows[mlp + "experts.local_experts.{E}.linear_fc1.weight"].hf == (
        "mtp.layers.0.mlp.experts.{E}.gate_proj.weight", "mtp.layers.0.mlp.experts.{E}.up_proj.weight")
    assert rows[mlp + "experts.local_experts.{E}.linear_fc2.weight"].hf == ("mtp.layers.0.mlp.experts.{E}.down_proj.weight",)


def test_rules_cover_the_saved_checkpoint(zoo_model):
    layouts = (L(), L(ep=2), L(tp=2, sp=True, ep=2, etp=1), L(pp=2, ep=2), L(pp=2, vpp=2))
    mc.check_rules_cover(zoo_model, MODEL, layouts, MAIN)


def test_nothing_is_dropped(zoo_model):
    """Strict accounting (tests/mtp_cases.py): a missing or extra MTP tensor refused by name; no
    mtp.* tensor at all: the main model alone."""
    mc.check_nothing_dropped(zoo_model, MODEL)


def test_mtp_needs_a_full_attention_last_layer(zoo_model):
    raw = mc.config(zoo_model, MODEL)
    raw["text_config"] = {**raw["text_config"], "layer_types": ["full_attention", "linear_attention"] * 2}
    with pytest.raises(UnsupportedConfig, match=r"full-attention MoE layer.*\(3\), a linear-attention layer"):
        mc.adapted(raw, mc.saved(zoo_model, MODEL)).architecture


def test_stacked_experts_of_the_moe_mtp_layer_are_read(zoo_model, tmp_path):
    """Qwen3.5-MoE checkpoints may store experts stacked (``experts.gate_up_proj [E, 2F, H]``), the
    MTP layer's too (``mtp.layers.0.mlp.experts.gate_up_proj``, as vLLM's Qwen3_5MoeMTP loads them):
    read as the per-expert tensors of the zoo's per-expert copy, the MTP layer's included."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from mcore_bridge.bridge import Bridge
    from mcore_bridge.hf_io import HFCheckpoint

    src = zoo_model("qwen3_5_moe_mtp")
    dest = tmp_path / "stacked"
    shutil.copytree(src, dest)
    prefixes = [f"model.language_model.layers.{layer}.mlp.experts." for layer in range(4)] + ["mtp.layers.0.mlp.experts."]
    for f in dest.glob("*.safetensors"):
        state = load_file(str(f))
        for p in prefixes:
            gate_up = [torch.cat([state.pop(f"{p}{e}.gate_proj.weight"), state.pop(f"{p}{e}.up_proj.weight")])
                       for e in range(8)]
            state[p + "gate_up_proj"] = torch.stack(gate_up)
            state[p + "down_proj"] = torch.stack([state.pop(f"{p}{e}.down_proj.weight") for e in range(8)])
        save_file(state, str(f), metadata={"format": "pt"})
    stacked = Bridge(dest)
    assert stacked.expert_storage == "out_in"
    a, b = HFCheckpoint(src), stacked.reader.hf
    assert sorted(b.names()) == sorted(a.names()) and "mtp.layers.0.mlp.experts.7.up_proj.weight" in set(b.names())
    for name in ("mtp.layers.0.mlp.experts.5.up_proj.weight", "mtp.layers.0.mlp.experts.0.gate_proj.weight",
                 "mtp.layers.0.mlp.experts.3.down_proj.weight", "model.language_model.layers.1.mlp.experts.2.up_proj.weight"):
        assert torch.equal(a.read(name), b.read(name)), name
    assert not torch.equal(a.read("mtp.layers.0.mlp.experts.5.gate_proj.weight"),
                           b.read("mtp.layers.0.mlp.experts.5.up_proj.weight"))  # control
    units = inventory(stacked.family, L(pp=2, ep=2))
    assert expected_hf_names(units) == set(a.names())


@pytest.mark.parametrize("world,layout", [
    pytest.param(w, lay, id=case_id(MODEL, w, lay), marks=pytest.mark.world(w))
    for w, lay in [(1, L()), (2, L(tp=2, sp=True, ep=2, etp=1))]])
def test_roundtrip_is_byte_exact(world, layout, pools, zoo_model, tmp_path):
    expected = mc.roundtrip(pools, world, layout, zoo_model(MODEL), tmp_path / "converted")
    assert {"mtp.layers.0.mlp.experts.7.down_proj.weight", "mtp.layers.0.mlp.gate.weight",
            "mtp.layers.0.mlp.shared_expert_gate.weight"} <= set(expected)
    assert sum(".visual." in f".{n}" for n in expected) > 20 and sum(".linear_attn." in n for n in expected) == 18


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("qwen3-5-moe-mtp-reference-cache"))


VERIFY_LAYOUT = L(ep=2)  # the MTP layer's experts split over two ranks (pp=2 is qwen3_5_mtp's case)


@pytest.mark.world(2)
def test_mtp_head_verifies_fp32_with_images(pools, zoo_model, ref_cache):
    """The main model with images, gated on the loss tokens, routers agreeing, and the MoE MTP head
    against our reference of the formula (transformers' own MoE decoder layer, mRoPE positions)."""
    r = mc.verify(pools, zoo_model(MODEL), VERIFY_LAYOUT, ref_cache)
    mc.check_mtp_head_passes(r, moe=True)
    m = r["metrics"]
    assert r["gate"] == "with_loss" and m["top1_agreement_with_loss"] == 1.0 and m["mean_diff_with_loss"] < 1e-5
    assert m["router_agreement"] == 1.0  # every routed token of the main model picks the same experts
    assert len([i for i in r["inputs"] if i.get("images")]) == 2
    probes = [entry["probe"] for entry in r["layers"]]
    assert "vision.merger" in probes and probes[-6:] == ["embedding"] + [f"layer.{i}" for i in range(4)] + ["final_norm"]


def _mcore_name(zoo_model, hf: str) -> str:
    """The megatron parameter holding ``hf`` in this megatron-core (0.16's and 0.19's MTP names differ)."""
    fam = mc.adapted(mc.config(zoo_model, MODEL), mc.saved(zoo_model, MODEL))
    (name,) = [r.mcore for r in fam.rules() if r.hf == (hf,)]
    return name


@pytest.mark.world(2)
def test_perturbed_mtp_shared_expert_is_caught_and_located(pools, zoo_model, ref_cache):
    """Negative control: the MTP layer's shared-expert down projection x 1.5 leaves the main model
    exact and fails the MTP head, located at mtp.0 with the HF tensor named. (x 1.01 on this tiny
    model's MTP MoE weights -- shared expert down, router, one routed expert, shared-expert gate --
    stays under verify's MTP limits, measured drift 5e-6..5e-5 against 1e-4; x 1.5 gives 2.3e-3.)"""
    hf = "mtp.layers.0.mlp.shared_expert.down_proj.weight"
    control = f"scale:{_mcore_name(zoo_model, hf)}:1.5"
    r = mc.verify(pools, zoo_model(MODEL), VERIFY_LAYOUT, ref_cache, control=control)
    mc.check_mtp_control_located(r, hf)


@pytest.mark.world(2)
def test_zeroed_mtp_router_fails_the_mtp_routing_check(pools, zoo_model, ref_cache):
    """Negative control of the MTP layer's routing check: its router zeroed (every expert tied, so
    megatron's top-k picks by index) leaves the main model exact; the MTP layer's expert choice no
    longer matches transformers' (measured 0.047 of the tokens agree) and is named as such at mtp.0.
    (Scaling a router never changes its top-k; x 1.01 .. 1.5 keep agreement 1.0.)"""
    control = f"zero:{_mcore_name(zoo_model, 'mtp.layers.0.mlp.gate.weight')}"
    r = mc.verify(pools, zoo_model(MODEL), VERIFY_LAYOUT, ref_cache, control=control)
    mc.check_mtp_control_located(r, "mtp.layers.0.mlp.gate.weight")
    assert r["metrics"]["router_agreement"] == 1.0 and r["mtp"]["depths"][0]["router_agreement"] < 0.5
    assert any(f.startswith("mtp.0 routing: ") for f in r["failures"]), r["failures"]
