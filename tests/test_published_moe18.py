"""Family-specific expectations for published configs added by issue 18's leftovers: the megatron
settings each maps to (the shared plan / parameter-count test is ``test_published.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcore_bridge.families import family_for

PUBLISHED = Path(__file__).parent / "published"
EXPECTED = {
    # Qwen3-235B-A22B: 94 MoE layers (decoder_sparse_step 1, no mlp_only_layers), 128 experts top-8
    # renormalised (norm_topk_prob: top-k of the logits, then softmax = megatron's pre_softmax=False)
    "Qwen__Qwen3-235B-A22B.json": ("Qwen3MoE", dict(
        num_layers=94, hidden_size=4096, num_attention_heads=64, num_query_groups=4, kv_channels=128,
        ffn_hidden_size=12288, num_moe_experts=128, moe_router_topk=8, moe_ffn_hidden_size=1536,
        moe_shared_expert_intermediate_size=None, moe_router_score_function="softmax", moe_router_pre_softmax=False,
        qk_layernorm=True, add_qkv_bias=False, layernorm_epsilon=1e-6, moe_layer_freq=[1] * 94),
        dict(vocab_size=151936, share_embeddings_and_output_weights=False, rotary_base=1e6, rotary_percent=1.0)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_published_config_maps_to(name):
    cls, config, model = EXPECTED[name]
    fam = family_for(json.loads((PUBLISHED / name).read_text()))
    assert type(fam).__name__ == cls
    s = fam.model_settings()
    assert {k: s["config"][k] for k in config} == config
    assert {k: s["model"][k] for k in model} == model
