"""Qwen3-Next's multi-token-prediction layer (``families/qwen3_next.py`` on ``families/mtp.py``'s hooks).

The published checkpoint stores it under ``mtp.*`` (``mtp.fc``, ``mtp.pre_fc_norm_embedding`` /
``_hidden``, ``mtp.layers.0.*``: a gated full-attention MoE layer, ``mtp.norm``); its config declares
nothing (one layer assumed). The zoo variant ``qwen3_next_mtp`` stores it so. Converted into
megatron-core's ``MultiTokenPredictionBlock`` with ``(1 + w)`` norms, byte-exact back, and verified
against our reference of the formula (verify/mtp.py) with transformers' own decoder layer.
The scaffolding shared with Qwen3.5's MTP tests: tests/mtp_cases.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcore_bridge import ParallelLayout as L
from mcore_bridge.families import UnsupportedConfig, family_for
from tests import mtp_cases as mc
from tests.matrix import case_id

MODEL = "qwen3_next_mtp"
PUBLISHED = Path(__file__).parent / "published" / "Qwen__Qwen3-Next-80B-A3B-Instruct.json"


def _config(zoo_model, **change) -> dict:
    return {**mc.config(zoo_model, MODEL), **change}


def test_published_config_counts_one_mtp_layer():
    raw = json.loads(PUBLISHED.read_text())
    assert not any("nextn" in k or "mtp" in k for k in raw)  # the config declares nothing
    fam = family_for(raw)
    assert fam.mtp_layers == 1 and fam.architecture.config["mtp_num_layers"] == 1
    rows = mc.check_rules_name_the_mtp_tensors(fam, "model.embed_tokens.weight")
    assert rows["mtp.layers.0.transformer_layer.mlp.router.weight"].hf == ("mtp.layers.0.mlp.gate.weight",)
    with pytest.raises(UnsupportedConfig, match=r"2 multi-token-prediction layers"):
        family_for({**raw, "num_nextn_predict_layers": 2}).architecture


def test_rules_cover_the_saved_checkpoint(zoo_model):
    mc.check_rules_cover(zoo_model, MODEL, (L(), L(tp=2, sp=True), L(pp=2, ep=2), L(pp=2, vpp=2)), "model.")


def test_nothing_is_dropped(zoo_model):
    """Strict accounting (tests/mtp_cases.py): a missing or extra MTP tensor refused by name; no
    mtp.* tensor at all: the main model alone."""
    mc.check_nothing_dropped(zoo_model, MODEL)


def test_mtp_needs_a_full_attention_moe_last_layer(zoo_model):
    """megatron builds the MTP layer from the last decoder layer's spec; Qwen3-Next's MTP layer is
    gated full attention + MoE, so a last layer of another kind is refused, naming the way out."""
    saved = mc.saved(zoo_model, MODEL)
    types = ["linear_attention", "full_attention", "full_attention", "linear_attention"]
    with pytest.raises(UnsupportedConfig, match=r"spec of the last decoder layer \(3\), a linear-attention layer"):
        mc.adapted(_config(zoo_model, layer_types=types), saved).architecture
    with pytest.raises(UnsupportedConfig, match=r"\(3\), a dense layer.*without the mtp\.\* tensors"):
        mc.adapted(_config(zoo_model, mlp_only_layers=[3]), saved).architecture


@pytest.mark.parametrize("world,layout", [
    pytest.param(w, lay, id=case_id(MODEL, w, lay), marks=pytest.mark.world(w))
    for w, lay in [(2, L(pp=2)), (2, L(tp=2, sp=True, ep=2, etp=1))]])
def test_roundtrip_is_byte_exact(world, layout, pools, zoo_model, tmp_path):
    expected = mc.roundtrip(pools, world, layout, zoo_model(MODEL), tmp_path / "converted")
    assert "mtp.layers.0.mlp.experts.7.down_proj.weight" in expected


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("qwen3-next-mtp-reference-cache"))


@pytest.mark.world(2)
def test_mtp_head_verifies_fp32(pools, zoo_model, ref_cache):
    r = mc.verify(pools, zoo_model(MODEL), L(pp=2), ref_cache)
    mc.check_mtp_head_passes(r, moe=True)
    assert r["metrics"]["router_agreement"] == 1.0


@pytest.mark.world(2)
def test_perturbed_mtp_norm_is_caught_and_located(pools, zoo_model, ref_cache):
    """Negative control: the MTP embedding norm's stored offset x 1.5 (its (1 + w) scale moves by
    ~5%) leaves the main model exact and fails the MTP head, located with the HF tensor named."""
    r = mc.verify(pools, zoo_model(MODEL), L(pp=2), ref_cache, control="scale:mtp.layers.0.enorm.weight:1.5")
    mc.check_mtp_control_located(r, "mtp.pre_fc_norm_embedding.weight")
