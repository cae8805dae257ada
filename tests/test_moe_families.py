"""MoE families without a process group: HF config -> megatron MoE settings (real transformers
configs, both spellings of the expert count), layout checks for EP / expert-TP, expert placement in
the plan, TE grouped-expert names, and settings megatron cannot express."""

from __future__ import annotations

import pytest
import torch

from mcore_bridge.families import UnsupportedConfig, canonical_param_name, family_for
from mcore_bridge.layout import LayoutError, ParallelLayout
from mcore_bridge.plan import MappingError, inventory, local_items

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=256)
MOE = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, sliding_window=None),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
}


def raw(model_type, **kw):
    return transformers.AutoConfig.for_model(model_type, **{**BASE, **MOE[model_type], **kw}).to_dict()


@pytest.mark.parametrize("model_type", list(MOE))
def test_router_and_expert_settings(model_type):
    cfg = raw(model_type)
    c = family_for(cfg).model_settings()["config"]
    assert c["num_moe_experts"] == 8 and c["moe_router_topk"] == 2
    assert c["moe_ffn_hidden_size"] == (96 if model_type == "mixtral" else 32)
    assert c["moe_router_score_function"] == "softmax"
    # Mixtral and norm_topk_prob renormalise the top-k weights: softmax over the top-k logits
    assert c["moe_router_pre_softmax"] is (model_type == "qwen2_moe")
    shared = model_type == "qwen2_moe"
    assert c["moe_shared_expert_intermediate_size"] == (48 if shared else None)
    assert c["moe_shared_expert_gate"] is shared
    assert c["moe_layer_freq"] == [1, 1, 1, 1]
    assert c["add_qkv_bias"] is (model_type == "qwen2_moe") and c["qk_layernorm"] is (model_type == "qwen3_moe")


def test_expert_count_in_either_spelling():
    cfg = raw("qwen3_moe")
    assert cfg.get("num_local_experts") == 8 or cfg.get("num_experts") == 8  # transformers 5 saves either
    for key in ("num_experts", "num_local_experts"):
        other = {k: v for k, v in cfg.items() if k not in ("num_experts", "num_local_experts")}
        assert family_for({**other, key: 6}).num_experts == 6


def test_dense_layers_between_sparse_ones():
    fam = family_for(raw("qwen2_moe", mlp_only_layers=[1], decoder_sparse_step=1))
    assert [fam.is_moe_layer(i) for i in range(4)] == [True, False, True, True]
    assert fam.model_settings()["config"]["moe_layer_freq"] == [1, 0, 1, 1]
    fam = family_for(raw("qwen3_moe", decoder_sparse_step=2))
    assert fam.model_settings()["config"]["moe_layer_freq"] == [0, 1, 0, 1]
    units = inventory(fam, ParallelLayout())
    assert {u.layer for u in units if "router" in u.rule.mcore} == {1, 3}
    assert {u.layer for u in units if u.rule.mcore.endswith("mlp.linear_fc1.weight")} == {0, 2}
    with pytest.raises(UnsupportedConfig, match="no layer .* is sparse"):
        family_for(raw("qwen3_moe", mlp_only_layers=[0, 1, 2, 3])).model_settings()


@pytest.mark.parametrize("model_type", list(MOE))
def test_settings_build_a_megatron_moe_config(model_type):
    pytest.importorskip("megatron.core")
    from mcore_bridge.model import transformer_config

    fam = family_for(raw(model_type))
    config = transformer_config(fam, ParallelLayout(tp=2, sp=True, ep=2, etp=1), torch.float32, "cpu")
    assert config.num_moe_experts == 8 and config.expert_model_parallel_size == 2
    assert config.expert_tensor_parallel_size == 1 and config.moe_aux_loss_coeff == 0.0
    assert config.moe_router_load_balancing_type == "none"


def test_topk_beyond_experts_is_refused():
    with pytest.raises(UnsupportedConfig, match="num_experts_per_tok=9"):
        family_for(raw("qwen3_moe", num_experts_per_tok=9)).model_settings()


# ---- layouts -------------------------------------------------------------------------------------

def dims(model_type="qwen3_moe", **kw):
    return family_for(raw(model_type, **kw)).layout_dims()


def test_experts_must_divide_over_ep():
    with pytest.raises(LayoutError, match=r"8 experts cannot be split over ep=3: choose --ep from \[1, 2, 4, 8\]"):
        ParallelLayout(ep=3).validate(**dims())


def test_expert_width_must_divide_over_etp():
    with pytest.raises(LayoutError, match="expert intermediate size 32 cannot be split over etp=3"):
        ParallelLayout(etp=3).validate(**dims())
    ParallelLayout(tp=2, etp=1).validate(**dims())  # etp=1 under tp=2 is fine


def test_tp_with_ep_needs_sequence_parallel():
    with pytest.raises(LayoutError, match="needs sequence parallelism .* add --sp"):
        ParallelLayout(tp=2, ep=2)


def test_ep_on_a_dense_model_is_refused():
    dense = family_for({**BASE, "model_type": "qwen3"}).layout_dims()
    with pytest.raises(LayoutError, match="apply to mixture-of-experts models"):
        ParallelLayout(ep=2).validate(**dense)


def test_world_size_covers_both_grids():
    layout = ParallelLayout(tp=2, sp=True, ep=4, etp=1)
    assert layout.min_world_size == 4
    with pytest.raises(LayoutError, match="multiple of 4"):
        layout.validate(**dims(), world_size=2)
    layout.validate(**dims(), world_size=8)


def test_shared_expert_width_must_divide_over_tp():
    with pytest.raises(LayoutError, match="shared expert intermediate size 48 cannot be split over tp=32"):
        ParallelLayout(tp=32).validate(**{**dims("qwen2_moe"), "num_query_groups": 32, "num_attention_heads": 32,
                                          "expert_ffn_hidden_size": 64})


# ---- plan ----------------------------------------------------------------------------------------

def test_local_experts_resolve_to_global_ones_per_ep_rank():
    fam = family_for(raw("qwen3_moe"))
    layout = ParallelLayout(ep=4, pp=2)
    names = ["decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight", "decoder.layers.0.mlp.router.weight"]
    items = local_items(fam, layout, pp_rank=1, chunk_params=[names], ep_rank=3)
    expert, router = items
    assert (expert.unit.layer, expert.unit.expert, expert.unit.ep_rank) == (3, 7, 3)
    assert expert.unit.hf_names == ("model.layers.3.mlp.experts.7.down_proj.weight",)
    assert router.unit.expert is None and router.unit.hf_names == ("model.layers.2.mlp.gate.weight",)
    with pytest.raises(MappingError, match="local expert 2 but the layout gives 2 experts"):
        local_items(fam, layout, 0, [["decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight"]], 0)


def test_moe_parameter_on_a_dense_layer_is_refused():
    fam = family_for(raw("qwen2_moe", mlp_only_layers=[1]))
    with pytest.raises(MappingError, match="layer 1 is a dense layer .* belongs to a moe layer"):
        local_items(fam, ParallelLayout(), 0, [["decoder.layers.1.mlp.router.weight"]])


def test_te_grouped_expert_names_are_canonical():
    assert canonical_param_name("module.decoder.layers.3.mlp.experts.linear_fc1.weight5") == \
        "decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight"
    assert canonical_param_name("decoder.layers.0.mlp.experts.linear_fc2.weight12") == \
        "decoder.layers.0.mlp.experts.local_experts.12.linear_fc2.weight"
    # the dense / shared MLP names are untouched
    assert canonical_param_name("decoder.layers.0.mlp.shared_experts.linear_fc1.weight") == \
        "decoder.layers.0.mlp.shared_experts.linear_fc1.weight"


# ---- DeepSeek-V3 ---------------------------------------------------------------------------------

DSV3 = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=8, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=4,
            n_group=4, topk_group=2, n_shared_experts=2, moe_intermediate_size=32, routed_scaling_factor=2.5,
            norm_topk_prob=True, rope_interleave=True, rms_norm_eps=1e-6)


def dsv3(**kw):
    return transformers.AutoConfig.for_model("deepseek_v3", **{**DSV3, **kw}).to_dict()


def test_deepseek_v3_settings():
    fam = family_for(dsv3())
    c = fam.model_settings()["config"]
    assert c["multi_latent_attention"] and c["q_lora_rank"] == 32 and c["kv_lora_rank"] == 16
    assert (c["qk_head_dim"], c["qk_pos_emb_head_dim"], c["v_head_dim"]) == (16, 8, 16)
    assert c["moe_layer_freq"] == [0, 1, 1, 1] and c["num_moe_experts"] == 8
    assert c["moe_shared_expert_intermediate_size"] == 64  # 2 shared experts of 32
    assert c["moe_router_score_function"] == "sigmoid" and c["moe_router_enable_expert_bias"]
    assert (c["moe_router_num_groups"], c["moe_router_group_topk"]) == (4, 2)
    assert c["moe_router_topk_scaling_factor"] == 2.5 and c["rope_type"] == "rope"
    names = {n for u in inventory(fam, ParallelLayout()) for n in u.hf_names}
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names and "model.layers.0.mlp.gate.weight" not in names
    assert "model.layers.2.self_attn.kv_a_proj_with_mqa.weight" in names
    assert "model.layers.3.mlp.shared_experts.down_proj.weight" in names
    no_q_lora = {n for u in inventory(family_for(dsv3(q_lora_rank=None)), ParallelLayout()) for n in u.hf_names}
    assert "model.layers.0.self_attn.q_proj.weight" in no_q_lora and not any("q_a_proj" in n for n in no_q_lora)


def test_deepseek_v3_yarn_fields_by_name():
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 64,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    c = family_for(dsv3(rope_parameters=rope)).model_settings()["config"]
    assert c["rope_type"] == "yarn" and c["rotary_scaling_factor"] == 40.0
    assert c["original_max_position_embeddings"] == 64 and c["mscale_all_dim"] == 1.0  # megatron's default is 0


@pytest.mark.parametrize("change,message", [
    (dict(rope_interleave=False), "rope_interleave=false"),
    (dict(norm_topk_prob=False), "norm_topk_prob=false"),
    (dict(num_experts_per_tok=2), "num_experts_per_tok=2 with topk_group=2"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "mscale_all_dim": 1.0}),
     "mscale_all_dim=1.0 without mscale"),
])
def test_deepseek_v3_refuses_what_megatron_cannot_express(change, message):
    with pytest.raises(UnsupportedConfig, match=message):
        family_for(dsv3(**change)).model_settings()


def test_deepseek_v3_mtp_layer_converts_unless_the_checkpoint_has_none():
    """transformers' DeepseekV3Config says num_nextn_predict_layers=1 by default; the MTP layer maps
    to megatron's MTP block (tests/test_mtp.py) where the checkpoint holds it, else the main model."""
    fam = family_for(dsv3(num_nextn_predict_layers=1))
    assert fam.architecture.config["mtp_num_layers"] == 1
    assert "mtp.layers.0.eh_proj.weight" in {r.mcore for r in fam.rules()}
    stripped = family_for(dsv3(num_nextn_predict_layers=1))
    stripped.adapt({"model.layers.3.mlp.gate.weight"})
    assert "mtp_num_layers" not in stripped.architecture.config
    assert not any(r.mcore.startswith("mtp.") for r in stripped.rules())


def test_deepseek_v3_latent_widths_must_divide_over_tp():
    dims = family_for(dsv3(kv_lora_rank=20, num_attention_heads=12, num_key_value_heads=12)).layout_dims()
    with pytest.raises(LayoutError, match=r"kv_lora_rank \+ qk_rope_head_dim = 28 cannot be split over tp=3"):
        ParallelLayout(tp=3).validate(**dims)
