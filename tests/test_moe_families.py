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
