"""DeepSeek-V3: multi-latent attention, sigmoid router with a routing bias and group-limited
top-k, the first ``first_k_dense_replace`` layers dense, shared experts.

Settings megatron-core cannot express are refused (each measured against transformers, see
``../shared/FACTS.md``): non-interleaved MLA RoPE, un-normalised sigmoid top-k weights, group
scores other than HF's "sum of the top 2" (megatron sums the top ``topk / topk_group``), yarn
variants megatron's MLA rotary does not have. The MTP (next-token prediction) layers convert into
megatron's MTP block (``mtp.MTPMixin``). HF normalises the q/kv latents with a fixed eps of 1e-6 whatever
``rms_norm_eps`` is (Moonlight: 1e-5); megatron's MLA builds them with ``layernorm_epsilon``, so
the layer spec gives them ``latent_norm``: megatron's own norm module, built with eps 1e-6.
Kimi-K2 (``model_type: kimi_k2``) is this architecture under another name.
"""

from __future__ import annotations

import functools
import math

import torch

from ..transforms import COLUMN, REPLICATED, ROW
from .base import UnsupportedConfig, rule
from .llama import Llama
from .moe import MoEMixin
from .mtp import MTPMixin

L = "decoder.layers.{L}."
A = L + "self_attention."
HF_LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with the default eps


@functools.cache
def plain_query_mla() -> type:
    """megatron's MLASelfAttention, building the spec's ``linear_q_proj`` / ``linear_kv_up_proj`` /
    ``kv_layernorm`` as given (a model without q_lora: no q norm, no fused projections)."""
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    class PlainQueryMLA(MLASelfAttention):
        def _resolve_qk_norm_config(self, submodules):
            return dict(linear_q_proj=submodules.linear_q_proj, linear_q_up_proj=IdentityOp,
                        linear_kv_up_proj=submodules.linear_kv_up_proj, q_layernorm=IdentityOp,
                        kv_layernorm=submodules.kv_layernorm)

    return PlainQueryMLA


def check_sigmoid_router(c) -> None:
    """Refuse what megatron-core's sigmoid router (DeepSeek-V3's, also GLM-4.5's) computes otherwise."""
    topk, groups = int(c.require("num_experts_per_tok")), int(c.get("n_group", default=1))
    topk_group = int(c.get("topk_group", default=groups))
    if topk > 1 and not c.get("norm_topk_prob", default=True):
        raise UnsupportedConfig("norm_topk_prob=false: megatron-core always renormalises sigmoid top-k "
                                "weights, so expert outputs would be scaled differently")
    if 1 < groups and topk_group < groups and topk != 2 * topk_group:
        raise UnsupportedConfig(
            f"num_experts_per_tok={topk} with topk_group={topk_group}: HF scores a group by the sum of "
            f"its top 2 experts, megatron-core by its top {topk // topk_group}; they agree only when "
            f"num_experts_per_tok = 2 x topk_group")


class DeepSeekV3(MTPMixin, MoEMixin, Llama):
    model_types = ("deepseek_v3", "kimi_k2")
    name = "deepseek_v3"
    shared_hf = "mlp.shared_experts."
    shared_gate_hf = None
    router_bias_hf = "mlp.gate.e_score_correction_bias"

    # -- config ------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return int(self.cfg.require("n_routed_experts"))

    @property
    def shared_expert(self) -> bool:
        return int(self.cfg.get("n_shared_experts", default=0)) > 0

    @property
    def q_lora(self):
        return self.cfg.get("q_lora_rank")

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= int(self.cfg.get("first_k_dense_replace", default=0))

    def check_unsupported(self):
        c = self.cfg
        if c.get("hidden_act", default="silu") != "silu":
            raise UnsupportedConfig(f"hidden_act={c.get('hidden_act')!r}: only 'silu' (SwiGLU) is mapped")
        if c.get("attention_bias", default=False):
            raise UnsupportedConfig("attention_bias=true: megatron's MLA has no bias on its projections")
        if c.get("rope_interleave", default=True) is False:
            raise UnsupportedConfig("rope_interleave=false: megatron-core's MLA always applies RoPE to "
                                    "interleaved pairs; the converted model would rotate other dimensions")
        check_sigmoid_router(c)

    def layer_spec(self, config, vp_stage, pp_rank):
        """The MoE block spec, its q/kv latent norms built with HF's fixed eps (``latent_norm``).

        Without q_lora (DeepSeek-V2-Lite, Moonlight) the query is one plain column-parallel
        projection with no norm. megatron-core 0.19's MLA resolver insists on a fused norm+linear
        there when qk_layernorm is on (TransformerEngine's; none exists without it) and refuses an
        explicit q norm, while 0.16 builds the plain projection: the spec then uses
        ``PlainQueryMLA``, which keeps the spec's own modules (0.16 never calls the hook it overrides)."""
        import copy

        from megatron.core.transformer.identity_op import IdentityOp

        spec = super().layer_spec(config, vp_stage, pp_rank)
        latent_eps = float(self.cfg.get("rms_norm_eps", default=1e-6)) != HF_LATENT_NORM_EPS
        if not latent_eps and self.q_lora:
            return spec
        spec = copy.deepcopy(spec)
        for layer in spec.layer_specs:
            attn = layer.submodules.self_attention
            if latent_eps:
                for field in ("q_layernorm", "kv_layernorm"):
                    norm = getattr(attn.submodules, field)
                    if isinstance(norm, type) and norm.__name__ != "IdentityOp":
                        setattr(attn.submodules, field, latent_norm(norm))
            if not self.q_lora:
                attn.module = plain_query_mla()
                attn.submodules.q_layernorm = IdentityOp
        return spec

    def rope_settings(self) -> dict:
        rope = self.cfg.rope
        kind = rope.get("rope_type", "default")
        out = {"rotary_base": float(rope.get("rope_theta", 10000.0))}
        if kind == "default":
            return {**out, "rope_type": "rope"}
        if kind != "yarn":
            raise UnsupportedConfig(f"rope_type={kind!r}: megatron-core's MLA supports default and yarn")
        if rope.get("truncate", True) is False:
            raise UnsupportedConfig("yarn with truncate=false: megatron-core's MLA yarn rotary always truncates "
                                    "the correction range")
        factor = rope.get("factor")
        orig = rope.get("original_max_position_embeddings")
        if factor is None:
            raise UnsupportedConfig("yarn rope_parameters without 'factor'")
        # cos/sin factor. transformers: attention_factor if given, else m(f, mscale) / m(f, mscale_all_dim)
        # when both mscales are set, else m(f, 1) (a lone mscale is ignored); megatron-core's MLA:
        # m(f, mscale) / m(f, mscale_all_dim) with m(f, 0) = 1. Both scale the softmax by
        # m(f, mscale_all_dim)^2. A lone mscale therefore maps to megatron's mscale = 1; whatever else
        # leaves the two cos/sin factors unequal is refused.
        f, mscale, mscale_all = float(factor), rope.get("mscale"), rope.get("mscale_all_dim")
        both = bool(mscale) and bool(mscale_all)
        given = rope.get("attention_factor")
        if given is None and mscale_all and not mscale and f > 1.0:
            raise UnsupportedConfig(f"yarn mscale_all_dim={mscale_all} without mscale: transformers leaves cos/sin "
                                    f"at m(factor, 1), megatron-core's MLA divides them by m(factor, mscale_all_dim)")
        hf = float(given) if given is not None else (
            float(_yarn_m(f, mscale) / _yarn_m(f, mscale_all)) if both else _yarn_m(f))
        mscale = float(mscale) if both else 1.0
        megatron = float(_yarn_m(f, mscale) / _yarn_m(f, float(mscale_all or 0.0)))
        if hf != megatron:
            raise UnsupportedConfig(
                f"yarn attention_factor={given}: megatron-core's MLA derives its cos/sin factor from factor, "
                f"mscale and mscale_all_dim ({megatron}); another value cannot be expressed")
        return {**out, "rope_type": "yarn", "rotary_scaling_factor": float(factor),
                "original_max_position_embeddings": int(orig or self.cfg.require("max_position_embeddings")),
                "beta_fast": float(rope.get("beta_fast", 32.0)), "beta_slow": float(rope.get("beta_slow", 1.0)),
                "mscale": mscale, "mscale_all_dim": float(mscale_all or 0.0)}

    def model_settings(self) -> dict:
        self.check_unsupported()
        c = self.cfg
        rope = self.rope_settings()
        heads = int(c.require("num_attention_heads"))
        config = dict(
            num_layers=self.num_layers, hidden_size=int(c.require("hidden_size")),
            num_attention_heads=heads, num_query_groups=heads,
            ffn_hidden_size=int(c.require("intermediate_size")),
            normalization="RMSNorm", layernorm_epsilon=float(c.get("rms_norm_eps", default=1e-6)),
            gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=False,
            qk_layernorm=True,  # the q/kv latent norms
            multi_latent_attention=True, q_lora_rank=self.q_lora, kv_lora_rank=int(c.require("kv_lora_rank")),
            qk_head_dim=int(c.require("qk_nope_head_dim")), qk_pos_emb_head_dim=int(c.require("qk_rope_head_dim")),
            v_head_dim=int(c.require("v_head_dim")), **rope,
            num_moe_experts=self.num_experts, moe_router_topk=int(c.require("num_experts_per_tok")),
            moe_ffn_hidden_size=int(c.require("moe_intermediate_size")),
            moe_shared_expert_intermediate_size=(int(c.require("moe_intermediate_size"))
                                                 * int(c.get("n_shared_experts", default=0))) or None,
            moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
            moe_router_num_groups=int(c.get("n_group", default=1)),
            moe_router_group_topk=int(c.get("topk_group", default=c.get("n_group", default=1))),
            moe_router_topk_scaling_factor=float(c.get("routed_scaling_factor", default=1.0)),
            moe_router_pre_softmax=False,
            moe_router_dtype="fp32",  # transformers keeps the router and its bias in fp32
            moe_layer_freq=[1 if self.is_moe_layer(i) else 0 for i in range(self.num_layers)],
        )
        if config["moe_router_num_groups"] <= 1:
            config["moe_router_num_groups"] = config["moe_router_group_topk"] = None
        model = dict(vocab_size=int(c.require("vocab_size")),
                     max_sequence_length=int(c.get("max_position_embeddings", default=4096)),
                     position_embedding_type="rope",  # MLA builds its own (yarn) rotary from config
                     rotary_base=rope["rotary_base"], share_embeddings_and_output_weights=self.tied)
        return {"config": config, "model": model}

    def megatron_config_class(self) -> type:
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        return MLATransformerConfig

    def layout_dims(self) -> dict:
        s = self.architecture.config
        dims = super().layout_dims()
        # column-split latent projections: their widths must divide over tp as well
        dims["tp_split_dims"] = {"kv_lora_rank + qk_rope_head_dim": s["kv_lora_rank"] + s["qk_pos_emb_head_dim"]}
        if s["q_lora_rank"]:
            dims["tp_split_dims"]["q_lora_rank"] = s["q_lora_rank"]
        return dims

    # -- weights -----------------------------------------------------------------------------
    def attention_rules(self):
        HA = self.hf_layer_prefix + "self_attn."
        if self.q_lora:
            q = [rule(A + "linear_q_down_proj.weight", HA + "q_a_proj.weight", COLUMN),
                 rule(A + "q_layernorm.weight", HA + "q_a_layernorm.weight", REPLICATED),
                 rule(A + "linear_q_up_proj.weight", HA + "q_b_proj.weight", COLUMN)]
        else:
            q = [rule(A + "linear_q_proj.weight", HA + "q_proj.weight", COLUMN)]
        return q + [
            # [kv latent; shared rope key] rows in the same order on both sides, split as one tensor
            rule(A + "linear_kv_down_proj.weight", HA + "kv_a_proj_with_mqa.weight", COLUMN),
            rule(A + "kv_layernorm.weight", HA + "kv_a_layernorm.weight", REPLICATED),
            rule(A + "linear_kv_up_proj.weight", HA + "kv_b_proj.weight", COLUMN),
            rule(A + "linear_proj.weight", HA + "o_proj.weight", ROW),
        ]


def _yarn_m(factor: float, mscale: float = 1.0) -> float:
    """yarn's attention scale m(factor, mscale), as transformers and megatron-core both define it."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def latent_norm(norm: type) -> type:
    """A subclass of megatron's norm module ``norm`` that is built with eps 1e-6 (HF's q/kv latent
    norms) whatever eps megatron passes (``layernorm_epsilon``): it builds ``norm`` itself."""
    def __new__(cls, *args, **kwargs):
        kwargs["eps"] = HF_LATENT_NORM_EPS
        return norm(*args, **kwargs)

    return type(f"Latent{norm.__name__}", (norm,), {"__new__": __new__, "__module__": __name__})
