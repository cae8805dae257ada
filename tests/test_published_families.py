"""Family-specific expectations for the published configs added for issues 18 / 19 (GLM-4.5,
GLM-4.5-Air, OLMoE, InternVL3-1B): the megatron settings each maps to (``Family.architecture``, mixins included, so the MTP
layer count is there), and megatron-core's own ``TransformerConfig`` accepts them at the real size.
The shared plan / parameter-count test is ``test_published.py``; provenance in
``tests/published/PROVENANCE.md``. Expected values are read off the config.json by hand, not computed
by the code under test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mcore_bridge.families import family_for
from mcore_bridge.layout import ParallelLayout

PUBLISHED = Path(__file__).parent / "published"

EXPECTED = {
    # GLM-4.5-Air: GQA 96/8 heads of 128 with q/k/v bias, no q/k norm (use_qk_norm false), half the
    # head rotated (partial_rotary_factor 0.5), sigmoid router with correction bias, no groups
    # (n_group 1), scaling 1.0, layer 0 dense (first_k_dense_replace 1), one shared expert of the
    # expert width, one MTP layer.
    "zai-org__GLM-4.5-Air.json": ("Glm4Moe", dict(
        num_layers=46, hidden_size=4096, num_attention_heads=96, num_query_groups=8, kv_channels=128,
        ffn_hidden_size=10944, add_qkv_bias=True, add_bias_linear=False, qk_layernorm=False, layernorm_epsilon=1e-5,
        num_moe_experts=128, moe_router_topk=8, moe_ffn_hidden_size=1408, moe_shared_expert_intermediate_size=1408,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_num_groups=None,
        moe_router_group_topk=None, moe_router_topk_scaling_factor=1.0, moe_layer_freq=[0] + [1] * 45,
        mtp_num_layers=1),
        dict(vocab_size=151552, share_embeddings_and_output_weights=False, rotary_base=1e6, rotary_percent=0.5,
             max_sequence_length=131072)),
    # GLM-4.5 (355B-A32B): as the Air but larger and with q/k norm (use_qk_norm true): 96/8 heads of
    # 128 on hidden 5120, q/k/v bias, rotary 0.5, 160 experts top-8 of 1536 plus one shared, sigmoid
    # with correction bias, scaling 2.5, layers 0-2 dense of 12288 (first_k_dense_replace 3), one MTP layer.
    "zai-org__GLM-4.5.json": ("Glm4Moe", dict(
        num_layers=92, hidden_size=5120, num_attention_heads=96, num_query_groups=8, kv_channels=128,
        ffn_hidden_size=12288, add_qkv_bias=True, add_bias_linear=False, qk_layernorm=True, layernorm_epsilon=1e-5,
        num_moe_experts=160, moe_router_topk=8, moe_ffn_hidden_size=1536, moe_shared_expert_intermediate_size=1536,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_num_groups=None,
        moe_router_group_topk=None, moe_router_topk_scaling_factor=2.5, moe_layer_freq=[0] * 3 + [1] * 89,
        mtp_num_layers=1),
        dict(vocab_size=151552, share_embeddings_and_output_weights=False, rotary_base=1e6, rotary_percent=0.5,
             max_sequence_length=131072)),
    # OLMoE-1B-7B-0125-Instruct: MHA 16 heads of 128, q/k RMSNorm over the full projection width
    # (FullWidthRMSNorm, checked below), softmax over all 64 experts then top-8 without
    # renormalisation (norm_topk_prob false = megatron's pre-softmax), every layer sparse, no shared
    # expert, experts of intermediate_size 1024.
    "allenai__OLMoE-1B-7B-0125-Instruct.json": ("Olmoe", dict(
        num_layers=16, hidden_size=2048, num_attention_heads=16, num_query_groups=16, kv_channels=128,
        add_qkv_bias=False, add_bias_linear=False, qk_layernorm=True, layernorm_epsilon=1e-5,
        num_moe_experts=64, moe_router_topk=8, moe_ffn_hidden_size=1024, moe_shared_expert_intermediate_size=None,
        moe_router_score_function="softmax", moe_router_pre_softmax=True, moe_layer_freq=[1] * 16),
        dict(vocab_size=50304, share_embeddings_and_output_weights=False, rotary_base=1e4, rotary_percent=1.0,
             max_sequence_length=4096)),
    # InternVL3-1B (-hf; RECONSTRUCTED, see PROVENANCE): the language model is Qwen2.5-0.5B's shape --
    # 24 layers of 896, GQA 14/2 heads of 64 with q/k/v bias, 4864 MLP, rope 1e6 (its dynamic-NTK
    # rope_scaling taken as the default RoPE); no tie_word_embeddings key, so tied as transformers ties it.
    "OpenGVLab__InternVL3-1B-hf.json": ("InternVLQwen2", dict(
        num_layers=24, hidden_size=896, num_attention_heads=14, num_query_groups=2, kv_channels=64,
        ffn_hidden_size=4864, add_qkv_bias=True, qk_layernorm=False, layernorm_epsilon=1e-6),
        dict(vocab_size=151674, share_embeddings_and_output_weights=True, rotary_base=1e6, rotary_percent=1.0,
             max_sequence_length=32768)),
}


def _family(name):
    return family_for(json.loads((PUBLISHED / name).read_text()))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_published_config_maps_to(name):
    cls, config, model = EXPECTED[name]
    fam = _family(name)
    assert type(fam).__name__ == cls
    arch = fam.architecture
    assert {k: arch.config.get(k, "<absent>") for k in config} == config
    assert {k: arch.model.get(k, "<absent>") for k in model} == model


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_megatron_core_accepts_the_published_config_at_its_real_size(name):
    """megatron-core's TransformerConfig (its own validation, no weights built) takes the mapped
    settings at the published size; its fields carry them."""
    from mcore_bridge.model import transformer_config

    fam = _family(name)
    config = transformer_config(fam, ParallelLayout(), torch.bfloat16, "cpu")
    expected = EXPECTED[name][1]
    for k in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "num_moe_experts",
              "moe_router_topk", "moe_ffn_hidden_size", "qk_layernorm", "add_qkv_bias"):
        assert getattr(config, k) == expected.get(k, None if k == "num_moe_experts" else getattr(config, k)), k
    assert getattr(config, "mtp_num_layers", None) == expected.get("mtp_num_layers")


def test_internvl_published_tiles_make_the_config_s_image_tokens():
    """A 448-pixel tile of 14-pixel patches, pixel-shuffled by 0.5, is the config's own
    ``image_seq_length`` (256) language tokens: the vision settings read from the published file."""
    raw = json.loads((PUBLISHED / "OpenGVLab__InternVL3-1B-hf.json").read_text())
    tiles = _family("OpenGVLab__InternVL3-1B-hf.json").tile_settings()
    assert (tiles.image_size, tiles.patch_size, tiles.downsample_ratio) == (448, 14, 0.5)
    assert tiles.tokens_per_tile == raw["image_seq_length"] and tiles.image_token_id == raw["image_token_id"]


def test_olmoe_published_spec_has_full_width_qk_norms():
    from mcore_bridge.families.olmoe import FullWidthKeyRMSNorm, FullWidthRMSNorm
    from mcore_bridge.model import transformer_config

    fam = _family("allenai__OLMoE-1B-7B-0125-Instruct.json")
    config = transformer_config(fam, ParallelLayout(), torch.bfloat16, "cpu")
    spec = fam.architecture.layer_spec(config, None, 0)
    assert len(spec.layer_specs) == 16
    for layer in spec.layer_specs:
        attn = layer.submodules.self_attention.submodules
        assert (attn.q_layernorm, attn.k_layernorm) == (FullWidthRMSNorm, FullWidthKeyRMSNorm)


def test_the_mapping_follows_the_config_fields_not_the_model_name():
    """Negative control: the same published file with use_qk_norm / first_k_dense_replace /
    norm_topk_prob changed maps to other settings (the expectations above are not defaults)."""
    air = json.loads((PUBLISHED / "zai-org__GLM-4.5-Air.json").read_text())
    c = family_for({**air, "use_qk_norm": True, "first_k_dense_replace": 3}).architecture.config
    assert c["qk_layernorm"] is True and c["moe_layer_freq"] == [0, 0, 0] + [1] * 43
    olmoe = json.loads((PUBLISHED / "allenai__OLMoE-1B-7B-0125-Instruct.json").read_text())
    assert family_for({**olmoe, "norm_topk_prob": True}).architecture.config["moe_router_pre_softmax"] is False
