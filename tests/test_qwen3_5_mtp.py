"""Qwen3.5's multi-token-prediction layer (``families/qwen3_5.py`` on Qwen3-Next's MTPMixin hooks,
``qwen3_next.QwenNextMTP``).

The published Qwen3.5 checkpoints declare ``text_config.mtp_num_hidden_layers: 1`` and store the
layer at the top level, ``mtp.*`` (``mtp.fc``, ``mtp.pre_fc_norm_embedding`` / ``_hidden``,
``mtp.layers.0.*``: a gated full-attention layer under the language layers' names, ``mtp.norm``),
which transformers ignores (``_keys_to_ignore_on_load_unexpected = [r"^mtp.*"]``) and vLLM's
``Qwen3_5MTP`` loads. The zoo variant ``qwen3_5_mtp`` stores it so. Converted into megatron-core's
``MultiTokenPredictionBlock`` with ``(1 + w)`` norms and byte-exact back. The MoE variant's MTP layer:
tests/test_qwen3_5_moe_mtp.py; the scaffolding the three families' MTP tests share: tests/mtp_cases.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcore_bridge import ParallelLayout as L
from mcore_bridge.families import UnsupportedConfig, family_for
from tests import mtp_cases as mc
from tests.matrix import case_id

MODEL = "qwen3_5_mtp"


def test_rules_name_the_published_mtp_tensors(zoo_model):
    saved = mc.saved(zoo_model, MODEL)
    fam = mc.adapted(mc.config(zoo_model, MODEL), saved)
    assert fam.mtp_layers == 1 and fam.architecture.config["mtp_num_layers"] == 1
    rows = mc.check_rules_name_the_mtp_tensors(fam, "model.language_model.embed_tokens.weight")
    assert rows["mtp.layers.0.transformer_layer.self_attention.linear_proj.weight"].hf == (
        "mtp.layers.0.self_attn.o_proj.weight",)
    assert rows["mtp.layers.0.transformer_layer.mlp.linear_fc2.weight"].hf == ("mtp.layers.0.mlp.down_proj.weight",)
    raw = mc.config(zoo_model, MODEL)
    raw["text_config"] = {**raw["text_config"], "mtp_num_hidden_layers": 2}
    with pytest.raises(UnsupportedConfig, match=r"qwen3_5: 2 multi-token-prediction layers"):
        family_for(raw).architecture


def test_rules_cover_the_saved_checkpoint(zoo_model):
    mc.check_rules_cover(zoo_model, MODEL, (L(), L(tp=2, sp=True), L(pp=2), L(pp=2, vpp=2)), "model.language_model.")


def test_nothing_is_dropped(zoo_model):
    """Strict accounting (tests/mtp_cases.py): a missing or extra MTP tensor refused by name; no
    mtp.* tensor at all: the main model alone."""
    mc.check_nothing_dropped(zoo_model, MODEL)


def test_mtp_needs_a_full_attention_last_layer(zoo_model):
    """megatron builds the MTP layer from the last decoder layer's spec; Qwen3.5's MTP layer is gated
    full attention, so a linear-attention last layer is refused, naming the way out."""
    raw = mc.config(zoo_model, MODEL)
    raw["text_config"] = {**raw["text_config"], "layer_types": ["full_attention", "linear_attention"] * 2}
    with pytest.raises(UnsupportedConfig, match=r"\(3\), a linear-attention layer.*without the mtp\.\* tensors"):
        mc.adapted(raw, mc.saved(zoo_model, MODEL)).architecture


@pytest.mark.parametrize("world,layout", [
    pytest.param(w, lay, id=case_id(MODEL, w, lay), marks=pytest.mark.world(w))
    for w, lay in [(2, L(pp=2)), (2, L(tp=2, sp=True))]])
def test_roundtrip_is_byte_exact(world, layout, pools, zoo_model, tmp_path):
    expected = mc.roundtrip(pools, world, layout, zoo_model(MODEL), tmp_path / "converted")
    assert "mtp.layers.0.mlp.down_proj.weight" in expected


PUBLISHED = {  # tests/published: the megatron settings each maps to (the rest is Qwen3.5's, tests/test_qwen3_5.py)
    "Qwen__Qwen3.5-0.8B.json": dict(num_layers=24, hidden_size=1024, num_attention_heads=8, num_query_groups=2,
                                    ffn_hidden_size=3584, kv_channels=256, linear_num_value_heads=16),
    "Qwen__Qwen3.6-35B-A3B.json": dict(num_layers=40, hidden_size=2048, num_attention_heads=16, num_query_groups=2,
                                       kv_channels=256, linear_num_value_heads=32, num_moe_experts=256,
                                       moe_router_topk=8, moe_ffn_hidden_size=512,
                                       moe_shared_expert_intermediate_size=512, moe_shared_expert_gate=True),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_map_with_their_mtp_layer(name):
    raw = json.loads((Path(__file__).parent / "published" / name).read_text())
    assert raw["text_config"]["mtp_num_hidden_layers"] == 1
    fam = family_for(raw)
    c = fam.architecture.config
    assert {k: c[k] for k in PUBLISHED[name]} == PUBLISHED[name]
    assert c["mtp_num_layers"] == 1 and c["attention_output_gate"] is True and c["mrope_section"] == [11, 11, 10]
    assert c["experimental_attention_variant"] == "gated_delta_net"
    assert c["linear_attention_freq"] == [0 if (i + 1) % 4 == 0 else 1 for i in range(c["num_layers"])]
    assert c["linear_key_head_dim"] == c["linear_value_head_dim"] == 128 and c["linear_num_key_heads"] == 16
    rows = mc.rows(fam)
    assert rows["mtp.layers.0.eh_proj.weight"].hf == ("mtp.fc.weight",)
    assert rows["mtp.layers.0.transformer_layer.self_attention.linear_qkv.weight"].hf[0] == (
        "mtp.layers.0.self_attn.q_proj.weight")
    head = rows["output_layer.weight"]  # 0.8B ties its head: read from the embedding, not written back
    tied = raw["tie_word_embeddings"]
    assert head.hf == (("model.language_model.embed_tokens.weight",) if tied else ("lm_head.weight",))
    assert head.export is not tied


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("qwen3-5-mtp-reference-cache"))


@pytest.mark.world(2)
def test_mtp_head_verifies_fp32_with_images(pools, zoo_model, ref_cache):
    """The main model with images and the MTP head, against transformers' model and our reference
    of the MTP formula (verify/mtp.py, transformers' own decoder layer, mRoPE positions)."""
    r = mc.verify(pools, zoo_model(MODEL), L(pp=2), ref_cache)
    mc.check_mtp_head_passes(r, moe=False)


@pytest.mark.world(2)
def test_mtp_head_verifies_under_sequence_parallelism(pools, zoo_model, ref_cache):
    """TP2 + SP: the vision-language model embeds the whole sequence before scattering it, and the MTP
    layer's own embedding of the shifted tokens must come out scattered like the hidden states it
    joins (the MTP forward once failed here on a sequence-length mismatch, found by `make demo`)."""
    r = mc.verify(pools, zoo_model(MODEL), L(tp=2, sp=True), ref_cache)
    mc.check_mtp_head_passes(r, moe=False)


@pytest.mark.world(2)
def test_perturbed_mtp_projection_is_caught_and_located(pools, zoo_model, ref_cache):
    """Negative control: the MTP layer's fc x 1.01 leaves the main model exact and fails the MTP
    head, located at mtp.0 with the HF tensor named."""
    r = mc.verify(pools, zoo_model(MODEL), L(pp=2), ref_cache, control="scale:mtp.layers.0.eh_proj.weight:1.01")
    mc.check_mtp_control_located(r, "mtp.fc.weight")
