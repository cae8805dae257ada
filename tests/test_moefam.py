"""DeepSeek-V2 / V2-Lite, GLM-4.5 (glm4_moe) and OLMoE without a process group: the megatron settings
each maps to (from real transformers configs and the published ones), every refusal, and the
semantic gaps measured on the real modules of both sides (megatron-core's router, rotary and norm
against transformers'). Round trips and verification over layouts: ``test_moe.py`` (zoo.MOE)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mcore_bridge.families import UnsupportedConfig, family_for
from mcore_bridge.families.olmoe import FullWidthKeyRMSNorm, FullWidthRMSNorm
from mcore_bridge.layout import ParallelLayout
from mcore_bridge.plan import MappingError, inventory

transformers = pytest.importorskip("transformers")
PUBLISHED = Path(__file__).parent / "published"
MLA = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
           num_key_value_heads=8, first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=16,
           qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=2, moe_intermediate_size=32,
           rms_norm_eps=1e-6)


def hf_names(fam) -> set[str]:
    return {n for u in inventory(fam, ParallelLayout()) for n in u.hf_names}


def published(name: str) -> dict:
    return json.loads((PUBLISHED / name).read_text())


# ---- DeepSeek-V2 -----------------------------------------------------------------------------------

def dsv2(**kw):
    base = dict(MLA, q_lora_rank=None, num_experts_per_tok=2, topk_method="greedy", routed_scaling_factor=1.0,
                norm_topk_prob=False)
    return transformers.AutoConfig.for_model("deepseek_v2", **{**base, **kw}).to_dict()


def test_deepseek_v2_lite_settings():
    fam = family_for(dsv2())
    c = fam.model_settings()["config"]
    assert c["multi_latent_attention"] and c["q_lora_rank"] is None and c["kv_lora_rank"] == 16
    assert c["moe_router_score_function"] == "softmax" and c["moe_router_pre_softmax"] is True
    assert c["moe_router_enable_expert_bias"] is False and c["moe_router_num_groups"] is None
    assert c["moe_layer_freq"] == [0, 1, 1, 1] and c["moe_shared_expert_intermediate_size"] == 64
    names = hf_names(fam)
    assert "model.layers.0.self_attn.q_proj.weight" in names and not any("q_a_proj" in n for n in names)
    assert not any("e_score_correction_bias" in n for n in names)  # V2 has no routing bias


def test_deepseek_v2_group_limited_with_q_lora():
    fam = family_for(dsv2(q_lora_rank=32, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                          routed_scaling_factor=16.0))
    c = fam.model_settings()["config"]
    assert (c["moe_router_num_groups"], c["moe_router_group_topk"]) == (4, 2)
    assert c["moe_router_topk_scaling_factor"] == 16.0 and c["q_lora_rank"] == 32
    assert "model.layers.1.self_attn.q_a_proj.weight" in hf_names(fam)
    # greedy top-k ignores n_group / topk_group on the HF side: no groups in megatron either
    c = family_for(dsv2(n_group=4, topk_group=2)).model_settings()["config"]
    assert c["moe_router_num_groups"] is None and c["moe_router_group_topk"] is None


def test_deepseek_v2_lite_query_is_a_plain_projection_in_the_spec():
    """megatron-core 0.19's MLA would demand a fused norm+linear query projection (TE only) for a
    model without q_lora; the family's spec keeps megatron's plain ColumnParallelLinear, no q norm."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from megatron.core.transformer.identity_op import IdentityOp

    from mcore_bridge.families.deepseek import plain_query_mla
    from mcore_bridge.model import transformer_config

    for q_lora, plain in [(None, True), (32, False)]:
        fam = family_for(dsv2(q_lora_rank=q_lora))
        config = transformer_config(fam, ParallelLayout(), torch.float32, "cpu")
        for layer in fam.architecture.layer_spec(config, None, 0).layer_specs:
            attn = layer.submodules.self_attention
            assert (attn.module is plain_query_mla()) is plain
            if plain:
                assert attn.submodules.q_layernorm is IdentityOp
                assert attn.submodules.linear_q_proj is ColumnParallelLinear


@pytest.mark.parametrize("change,message", [
    (dict(topk_method="group_limited_greedy", n_group=4, topk_group=1), r"num_experts_per_tok=2, topk_group=1"),
    (dict(topk_method="noaux_tc"), "topk_method='noaux_tc'"),
    (dict(norm_topk_prob=True), "norm_topk_prob=true"),
    (dict(moe_layer_freq=2), "moe_layer_freq=2"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(scoring_func="sigmoid"), "scoring_func='sigmoid'"),
])
def test_deepseek_v2_refuses_what_megatron_cannot_express(change, message):
    with pytest.raises(UnsupportedConfig, match=message):
        family_for(dsv2(**change)).model_settings()


def _routers(num_experts, topk, groups, topk_group, scaling, logits):
    """HF's DeepseekV2TopkRouter and megatron-core's routing function on the same logits, as dense
    [tokens, experts] weights (0 where an expert is not chosen)."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    cfg = transformers.AutoConfig.for_model(
        "deepseek_v2", hidden_size=num_experts, num_attention_heads=1, num_key_value_heads=1,
        n_routed_experts=num_experts, num_experts_per_tok=topk,
        topk_method="group_limited_greedy", n_group=groups, topk_group=topk_group, routed_scaling_factor=scaling)
    router = DeepseekV2TopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))  # logits = the input
    _, weights, idx = router(logits)
    hf = torch.zeros_like(logits).scatter(1, idx, weights)
    probs, _ = topk_routing_with_score_function(logits, topk, use_pre_softmax=True, num_groups=groups,
                                                group_topk=topk_group, scaling_factor=scaling,
                                                score_function="softmax")
    return hf, probs


def test_deepseek_v2_accepted_group_routing_equals_megatron():
    torch.manual_seed(0)
    hf, mc = _routers(8, 2, 4, 2, 2.0, torch.randn(64, 8) * 3)
    torch.testing.assert_close(mc, hf, rtol=0, atol=1e-6)


def test_deepseek_v2_group_scoring_megatron_cannot_express():
    """DeepSeek-V2's own setting (top-6 of 3 groups) made small: top-4 of 2 groups. HF picks groups by
    their largest score, megatron by the sum of their top 2: another set of experts wins."""
    probs = torch.tensor([[0.30, 0.0, 0.2, 0.2, 0.19, 0.19, 0.01, 0.01]]) + 1e-3
    hf, mc = _routers(8, 4, 4, 2, 1.0, probs.log())
    assert set(hf.nonzero()[:, 1].tolist()) == {0, 1, 2, 3}  # groups 0 (max 0.30) and 1
    assert set(mc.nonzero()[:, 1].tolist()) == {2, 3, 4, 5}  # groups 1 and 2 (sums 0.40, 0.38)
    with pytest.raises(UnsupportedConfig, match="num_experts_per_tok=4, topk_group=2"):
        family_for(dsv2(num_experts_per_tok=4, topk_method="group_limited_greedy", n_group=4,
                        topk_group=2)).model_settings()


# ---- GLM-4.5 ---------------------------------------------------------------------------------------

GLM = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
           num_key_value_heads=2, head_dim=16, attention_bias=True, use_qk_norm=True, first_k_dense_replace=1,
           n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
           moe_intermediate_size=32, routed_scaling_factor=2.5, norm_topk_prob=True)


def glm(**kw):
    return transformers.AutoConfig.for_model("glm4_moe", **{**GLM, **kw}).to_dict()


def test_glm4_moe_settings():
    fam = family_for(glm())
    s = fam.model_settings()
    c, m = s["config"], s["model"]
    assert c["add_qkv_bias"] and not c["add_bias_linear"] and c["qk_layernorm"] and c["kv_channels"] == 16
    assert m["rotary_percent"] == 0.5 and m["position_embedding_type"] == "rope"
    assert c["moe_router_score_function"] == "sigmoid" and c["moe_router_enable_expert_bias"]
    assert (c["moe_router_num_groups"], c["moe_router_group_topk"]) == (4, 2)
    assert c["moe_router_topk_scaling_factor"] == 2.5 and c["moe_router_pre_softmax"] is False
    assert c["moe_layer_freq"] == [0, 1, 1, 1] and c["moe_shared_expert_intermediate_size"] == 32
    assert c["moe_shared_expert_gate"] is False and c["moe_router_dtype"] == "fp32"
    names = hf_names(fam)
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.q_norm.weight",
            "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.layers.1.mlp.shared_experts.down_proj.weight"} <= names
    assert "model.layers.0.self_attn.o_proj.bias" not in names  # GLM's o_proj has no bias


def test_glm4_moe_air_shape_no_qk_norm_and_partial_rotary_spellings():
    fam = family_for(glm(use_qk_norm=False))
    assert fam.model_settings()["config"]["qk_layernorm"] is False
    assert not any("_norm." in n and "self_attn" in n for n in hf_names(fam))
    raw = glm()
    raw.pop("rope_parameters", None)  # a 4.x checkpoint: top-level field, or absent (GLM's default 0.5)
    assert family_for({**raw, "partial_rotary_factor": 0.25}).model_settings()["model"]["rotary_percent"] == 0.25
    assert family_for(raw).model_settings()["model"]["rotary_percent"] == 0.5


@pytest.mark.parametrize("change,message", [
    (dict(norm_topk_prob=False), "norm_topk_prob=false"),
    (dict(num_experts_per_tok=2), "num_experts_per_tok=2 with topk_group=2"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(partial_rotary_factor=0.3, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                       "partial_rotary_factor": 0.3}), "partial_rotary_factor=0.3"),
])
def test_glm4_moe_refuses_what_megatron_cannot_express(change, message):
    with pytest.raises(UnsupportedConfig, match=message):
        family_for(glm(**change)).model_settings()


def test_glm4_moe_mtp_tensors_are_converted_not_dropped():
    """GLM-4.5's MTP layer (stored as layer num_hidden_layers) is part of the plan (MTPMixin): a
    checkpoint holding only some of its tensors is refused by strict accounting, naming the rest."""
    from mcore_bridge.plan import check_names, expected_hf_names, inventory

    fam = family_for(glm(num_nextn_predict_layers=1))
    partial = {"model.layers.3.mlp.gate.weight", "model.layers.4.eh_proj.weight", "model.layers.4.enorm.weight"}
    fam.adapt(partial)
    expected = expected_hf_names(inventory(fam, ParallelLayout()))
    assert {"model.layers.4.eh_proj.weight", "model.layers.4.hnorm.weight",
            "model.layers.4.shared_head.norm.weight", "model.layers.4.mlp.gate.weight"} <= expected
    with pytest.raises(MappingError, match=r"missing \d+ tensor\(s\): .*model\.layers\.4\."):
        check_names(inventory(fam, ParallelLayout()), expected - {"model.layers.4.hnorm.weight"}, "ckpt")


def test_partial_rotary_megatron_equals_transformers_glm4_moe():
    """Measured on the real modules: megatron's RotaryEmbedding(rotary_percent=0.5) applied
    non-interleaved rotates the same first half of each head, paired i <-> i + 4, as transformers'
    GLM-4.5; the other half passes through. Full rotary or interleaved pairs differ."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.models.glm4_moe import modeling_glm4_moe as g

    from mcore_bridge.runtime import compat

    S, D = 12, 16
    cfg = transformers.AutoConfig.for_model("glm4_moe", **GLM)
    torch.manual_seed(0)
    q = torch.randn(1, 2, S, D)  # HF [batch, heads, seq, dim]
    cos, sin = g.Glm4MoeRotaryEmbedding(cfg)(q, torch.arange(S)[None])
    hf, _ = g.apply_rotary_pos_emb(q, q, cos, sin)
    diffs = {}
    with compat.scope("cpu"):
        for percent, interleaved in [(0.5, False), (1.0, False), (0.5, True)]:
            rope = RotaryEmbedding(kv_channels=D, rotary_percent=percent, rotary_interleaved=interleaved,
                                   rotary_base=10000, use_cpu_initialization=True)
            out = rope_utils._apply_rotary_pos_emb_bshd(q.permute(2, 0, 1, 3), rope(S),
                                                        rotary_interleaved=interleaved).permute(1, 2, 0, 3)
            diffs[(percent, interleaved)] = (out - hf).abs().max().item()
            if percent == 0.5:
                assert torch.equal(out[..., D // 2:], q[..., D // 2:])  # the unrotated half
    assert diffs[(0.5, False)] < 1e-6
    assert diffs[(1.0, False)] > 0.5 and diffs[(0.5, True)] > 0.5


# ---- OLMoE -----------------------------------------------------------------------------------------

OLMOE = dict(vocab_size=100, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, rms_norm_eps=1e-5)


def olmoe(**kw):
    return transformers.AutoConfig.for_model("olmoe", **{**OLMOE, **kw}).to_dict()


@pytest.mark.parametrize("norm,pre_softmax", [(False, True), (True, False)])
def test_olmoe_settings(norm, pre_softmax):
    fam = family_for(olmoe(norm_topk_prob=norm))
    c = fam.model_settings()["config"]
    assert c["moe_router_score_function"] == "softmax" and c["moe_router_pre_softmax"] is pre_softmax
    assert c["moe_ffn_hidden_size"] == 32 and c["moe_layer_freq"] == [1, 1] and c["qk_layernorm"]
    assert c["moe_shared_expert_intermediate_size"] is None
    rules = {r.mcore: r for r in fam.rules()}
    assert rules["decoder.layers.{L}.self_attention.q_layernorm.weight"].transform.parallel_mode == "column"


@pytest.mark.parametrize("change,message", [
    (dict(clip_qkv=8.0), "clip_qkv=8.0"),
    (dict(head_dim=16), "head_dim=16"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_olmoe_refuses_what_megatron_cannot_express(change, message):
    with pytest.raises(UnsupportedConfig, match=message):
        family_for(olmoe(**change)).model_settings()


class _Cfg:  # the config fields the norm reads
    num_attention_heads, num_query_groups, tensor_model_parallel_size, params_dtype = 8, 4, 1, torch.float32


def test_olmoe_full_width_norm_equals_transformers_and_per_head_does_not():
    """megatron's attention hands its q/k norm [s, b, heads, head_dim] and builds it with
    hidden_size = head_dim: its own RMSNorm normalises each head; OLMoE normalises all heads of a
    token together. FullWidthRMSNorm computes transformers' OlmoeRMSNorm exactly."""
    from transformers.models.olmoe.modeling_olmoe import OlmoeRMSNorm

    torch.manual_seed(0)
    for cls, heads in [(FullWidthRMSNorm, 8), (FullWidthKeyRMSNorm, 4)]:
        x = torch.randn(5, 2, heads, 8) * torch.linspace(0.1, 3, heads)[:, None]  # heads of unequal scale
        ours = cls(_Cfg(), hidden_size=8, eps=1e-5)
        hf = OlmoeRMSNorm(heads * 8, eps=1e-5)
        with torch.no_grad():
            hf.weight.copy_(1 + 0.1 * torch.randn(heads * 8))
            ours.weight.copy_(hf.weight)
        expected = hf(x.flatten(-2)).view_as(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-6, atol=1e-6)
        per_head = torch.nn.RMSNorm(8, eps=1e-5)  # what megatron's local spec builds (WrappedTorchNorm)
        assert (per_head(x) * hf.weight.view(heads, 8) - expected).abs().max() > 0.1


def test_olmoe_spec_carries_the_full_width_norms():
    from mcore_bridge.model import transformer_config

    fam = family_for(olmoe())
    config = transformer_config(fam, ParallelLayout(), torch.float32, "cpu")
    spec = fam.architecture.layer_spec(config, None, 0)
    for layer in spec.layer_specs:
        attn = layer.submodules.self_attention.submodules
        assert (attn.q_layernorm, attn.k_layernorm) == (FullWidthRMSNorm, FullWidthKeyRMSNorm)
    # megatron's spec builder still gives its per-head norm afterwards (the family edits a copy)
    from mcore_bridge.families.moe import MoEMixin

    plain = MoEMixin.layer_spec(fam, config, None, 0).layer_specs[0].submodules.self_attention.submodules
    assert plain.q_layernorm is not FullWidthRMSNorm and plain.k_layernorm is not FullWidthKeyRMSNorm


# ---- the flagships' shapes -------------------------------------------------------------------------
# Model-defining fields of the published config.json files (read from copies of them; the verbatim
# files belong in tests/published/, see the report). transformers fills the rest with its defaults.
FLAGSHIPS = {
    "deepseek-ai/DeepSeek-V2-Lite": ("deepseek_v2", dict(
        hidden_size=2048, intermediate_size=10944, num_hidden_layers=27, num_attention_heads=16,
        num_key_value_heads=16, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, moe_intermediate_size=1408, moe_layer_freq=1, n_group=1,
        n_routed_experts=64, n_shared_experts=2, norm_topk_prob=False, num_experts_per_tok=6, topk_group=1,
        topk_method="greedy", routed_scaling_factor=1.0, scoring_func="softmax", rms_norm_eps=1e-6,
        max_position_embeddings=163840, vocab_size=102400, rope_theta=10000,
        rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                      "original_max_position_embeddings": 4096, "type": "yarn"})),
    "zai-org/GLM-4.5": ("glm4_moe", dict(
        hidden_size=5120, intermediate_size=12288, num_hidden_layers=92, num_attention_heads=96,
        num_key_value_heads=8, head_dim=128, attention_bias=True, use_qk_norm=True, partial_rotary_factor=0.5,
        first_k_dense_replace=3, n_routed_experts=160, n_shared_experts=1, num_experts_per_tok=8,
        moe_intermediate_size=1536, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        num_nextn_predict_layers=1, rms_norm_eps=1e-5, rope_theta=1000000, max_position_embeddings=131072,
        vocab_size=151552)),
    "zai-org/GLM-4.5-Air": ("glm4_moe", dict(
        hidden_size=4096, intermediate_size=10944, num_hidden_layers=46, num_attention_heads=96,
        num_key_value_heads=8, head_dim=128, attention_bias=True, use_qk_norm=False, partial_rotary_factor=0.5,
        first_k_dense_replace=1, n_routed_experts=128, n_shared_experts=1, num_experts_per_tok=8,
        moe_intermediate_size=1408, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
        num_nextn_predict_layers=1, rms_norm_eps=1e-5, rope_theta=1000000, max_position_embeddings=131072,
        vocab_size=151552)),
    "allenai/OLMoE-1B-7B-0924": ("olmoe", dict(
        hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, clip_qkv=None,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096, vocab_size=50304,
        tie_word_embeddings=False)),
}


@pytest.mark.parametrize("name", list(FLAGSHIPS))
def test_flagship_shapes_are_accepted_and_mapped(name):
    model_type, fields = FLAGSHIPS[name]
    raw = {"model_type": model_type, **fields}  # as config.json holds them (4.x spellings)
    fam = family_for(raw)
    s = fam.model_settings()
    c, m = s["config"], s["model"]
    assert c["num_layers"] == fields["num_hidden_layers"] and c["hidden_size"] == fields["hidden_size"]
    experts = fields.get("n_routed_experts", fields.get("num_experts"))
    assert c["num_moe_experts"] == experts and c["moe_router_topk"] == fields["num_experts_per_tok"]
    dense = fields.get("first_k_dense_replace", 0)
    assert c["moe_layer_freq"] == [0] * dense + [1] * (fields["num_hidden_layers"] - dense)
    if model_type == "deepseek_v2":  # V2-Lite: plain top-6 of a softmax, yarn x40 with both mscales
        assert c["moe_router_score_function"] == "softmax" and c["moe_router_pre_softmax"]
        assert c["moe_router_num_groups"] is None and c["q_lora_rank"] is None
        assert c["rope_type"] == "yarn" and c["rotary_scaling_factor"] == 40 and c["mscale_all_dim"] == 0.707
        assert c["moe_shared_expert_intermediate_size"] == 2 * 1408
    elif model_type == "glm4_moe":
        assert m["rotary_percent"] == 0.5 and c["kv_channels"] == 128 and c["add_qkv_bias"]
        assert c["qk_layernorm"] is fields["use_qk_norm"] and c["moe_router_score_function"] == "sigmoid"
        assert c["moe_router_topk_scaling_factor"] == fields["routed_scaling_factor"]
        assert c["moe_router_num_groups"] is None  # n_group 1: plain top-8 of the biased scores
        assert c["moe_shared_expert_intermediate_size"] == fields["moe_intermediate_size"]
        assert m["rotary_base"] == 1000000
    else:
        assert c["moe_router_pre_softmax"] and c["moe_ffn_hidden_size"] == 1024 and c["qk_layernorm"]
    ParallelLayout(tp=8, sp=True, ep=8).validate(**fam.layout_dims())  # one node of 8 GPUs


def test_deepseek_v2_flagship_is_refused_by_its_group_scoring():
    """DeepSeek-V2 (236B): top-6 of 160 experts in 8 groups, 3 groups kept. megatron-core would score
    groups by their top-2 sum, transformers by their top-1 (test above shows the choices differ)."""
    fields = dict(FLAGSHIPS["deepseek-ai/DeepSeek-V2-Lite"][1], hidden_size=5120, intermediate_size=12288,
                  num_hidden_layers=60, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
                  moe_intermediate_size=1536, n_routed_experts=160, n_group=8, topk_group=3,
                  topk_method="group_limited_greedy", routed_scaling_factor=16.0)
    with pytest.raises(UnsupportedConfig, match="num_experts_per_tok=6, topk_group=3"):
        family_for({"model_type": "deepseek_v2", **fields}).model_settings()


@pytest.mark.parametrize("name", ["deepseek_v2", "glm4_moe", "olmoe"])
def test_rules_match_saved_zoo_checkpoint(zoo_model, name):
    """The rule table names exactly the tensors transformers saves (strict accounting both ways),
    on every layout's inventory."""
    from safetensors import safe_open

    from mcore_bridge.plan import expected_hf_names

    path = zoo_model(name)
    saved = set()
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            saved |= set(h.keys())
    fam = family_for(json.loads((path / "config.json").read_text()))
    for layout in [ParallelLayout(), ParallelLayout(tp=2, sp=True), ParallelLayout(ep=4),
                   ParallelLayout(pp=2, ep=2), ParallelLayout(tp=2, sp=True, ep=2, etp=1)]:
        assert expected_hf_names(inventory(fam, layout)) == saved, (name, layout.short())
