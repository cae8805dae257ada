"""DeepSeek-V3 relatives: Moonlight (rms_norm_eps 1e-5 while HF's q/kv latent norms keep a fixed
1e-6) and Kimi-K2 (``model_type: kimi_k2``, DeepSeek-V3's architecture, n_group 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcore_bridge import quant, zoo
from mcore_bridge.families import DeepSeekV3, family_for
from mcore_bridge.zoo import _COMMON, ZOO
from tests import fp8_cases


@pytest.fixture(scope="module")
def eps_model(tmp_path_factory):
    spec = dict(ZOO["deepseek_v3"], rms_norm_eps=1e-5)
    ZOO["_deepseek_eps"] = spec
    try:
        out = tmp_path_factory.mktemp("ds-eps") / "m"
        zoo.build("_deepseek_eps", out)
    finally:
        del ZOO["_deepseek_eps"]
    return out


@pytest.mark.world(1)
def test_latent_norms_keep_hf_eps_when_rms_norm_eps_differs(eps_model, pools):
    fixed = pools.get(1).run(fp8_cases.logits_latent_eps, timeout=300, source=str(eps_model), layout={})[0]
    # control: the latent norms built with rms_norm_eps, as megatron's MLA does by itself
    control = pools.get(1).run(fp8_cases.logits_latent_eps, timeout=300, source=str(eps_model), layout={},
                               latent_eps=1e-5)[0]
    assert fixed < 1e-5, fixed  # measured 2.4e-7
    assert control > 20 * fixed and control > 2e-5, (fixed, control)  # measured 1.3e-4




def test_kimi_k2_is_deepseek_v3():
    cfg = {**_COMMON, **ZOO["deepseek_v3"], "model_type": "kimi_k2", "n_group": 1, "topk_group": 1}
    fam = family_for(cfg)
    assert isinstance(fam, DeepSeekV3)
    s = fam.architecture.config
    assert s["moe_router_num_groups"] is None and s["moe_router_group_topk"] is None  # n_group 1: no grouping
    assert s["moe_router_score_function"] == "sigmoid" and s["moe_router_enable_expert_bias"]


PUBLISHED = Path(__file__).parent / "published"
# megatron settings each published config maps to (family-specific expectations)
EXPECTED = {
    "deepseek-ai__DeepSeek-V3.json": dict(
        num_layers=61, hidden_size=7168, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128, num_moe_experts=256, moe_router_topk=8,
        moe_router_num_groups=8, moe_router_group_topk=4, moe_router_topk_scaling_factor=2.5,
        moe_ffn_hidden_size=2048, moe_shared_expert_intermediate_size=2048, layernorm_epsilon=1e-6,
        rope_type="yarn", rotary_scaling_factor=40.0, original_max_position_embeddings=4096,
        beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, rotary_base=10000.0),
    # V3.1 (reconstructed, tests/published/PROVENANCE.md): V3's architecture, power-of-two FP8 scales
    "deepseek-ai__DeepSeek-V3.1.json": dict(
        num_layers=61, hidden_size=7168, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128, num_moe_experts=256, moe_router_topk=8,
        moe_router_num_groups=8, moe_router_group_topk=4, moe_router_topk_scaling_factor=2.5,
        moe_ffn_hidden_size=2048, moe_shared_expert_intermediate_size=2048, layernorm_epsilon=1e-6,
        rope_type="yarn", rotary_scaling_factor=40.0, original_max_position_embeddings=4096,
        beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, rotary_base=10000.0),
    "moonshotai__Kimi-K2-Instruct.json": dict(
        num_layers=61, hidden_size=7168, num_attention_heads=64, q_lora_rank=1536, num_moe_experts=384,
        moe_router_topk=8, moe_router_num_groups=None, moe_router_group_topk=None,
        moe_router_topk_scaling_factor=2.827, moe_shared_expert_intermediate_size=2048, layernorm_epsilon=1e-6,
        rope_type="yarn", rotary_scaling_factor=32.0, beta_fast=1.0, beta_slow=1.0, rotary_base=50000.0),
    "moonshotai__Moonlight-16B-A3B-Instruct.json": dict(
        num_layers=27, hidden_size=2048, num_attention_heads=16, q_lora_rank=None, num_moe_experts=64,
        moe_router_topk=6, moe_router_num_groups=None, moe_ffn_hidden_size=1408,
        moe_shared_expert_intermediate_size=2816, moe_router_topk_scaling_factor=2.446,
        layernorm_epsilon=1e-5, rope_type="rope", rotary_base=50000.0),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_published_deepseek_family_configs_map_to(name):
    config = json.loads((PUBLISHED / name).read_text())
    fam = family_for(config)
    assert isinstance(fam, DeepSeekV3)
    s = fam.architecture.config
    got = {k: s[k] for k in EXPECTED[name]}
    assert got == EXPECTED[name]
    dense = int(config["first_k_dense_replace"])
    assert s["moe_layer_freq"] == [0] * dense + [1] * (config["num_hidden_layers"] - dense)
    q = quant.quant_config(config)
    if q:  # DeepSeek-V3 and Kimi-K2 ship blockwise FP8 of 128 x 128
        assert quant.fp8_block(q) == (128, 128)
        # published tensor: kv_a_proj_with_mqa [576, 7168] -> scales [5, 56] (a partial edge block)
        rows = config["kv_lora_rank"] + config["qk_rope_head_dim"]
        assert quant.fp8_grid((rows, config["hidden_size"]), (128, 128)) == (5, 56)
