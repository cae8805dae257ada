"""DeepSeek-V2 and V2-Lite: DeepSeek-V3's multi-latent attention (with and without q_lora) and
layout, with V2's router: softmax over all experts, plain or group-limited top-k, the top-k
weights scaled by ``routed_scaling_factor`` and never renormalised, no routing bias.

megatron-core's softmax router with ``moe_router_pre_softmax`` computes exactly that (softmax,
then top-k, then the scaling factor). What it cannot express is refused (``check_unsupported``):

- group scores: transformers' ``group_limited_greedy`` scores a group by its *largest* expert score,
  megatron-core by the sum of its top ``topk // group_topk`` scores: they agree only when that
  ratio is 1 (DeepSeek-V2 itself, top-6 of 3 groups, is refused; V2-Lite uses plain greedy top-k);
- ``norm_topk_prob=true``: transformers' DeepseekV2 never renormalises (DeepSeek's own code did),
  so a checkpoint asking for it has no single meaning;
- ``moe_layer_freq`` other than 1 (transformers makes every layer from ``first_k_dense_replace`` on
  sparse, whatever it says).

Any ``rms_norm_eps`` is accepted: transformers' DeepSeek-V2, like V3, builds the q/kv latent norms
(``q_a_layernorm``, ``kv_a_layernorm``) with a fixed eps of 1e-6 and only the decoder norms with
``rms_norm_eps``; the inherited layer spec builds megatron's latent norms at 1e-6 (``latent_norm``).
"""

from __future__ import annotations

from .base import UnsupportedConfig
from .deepseek import DeepSeekV3

TOPK_METHODS = ("greedy", "group_limited_greedy")


class DeepSeekV2(DeepSeekV3):
    model_types = ("deepseek_v2",)
    name = "deepseek_v2"
    router_bias_hf = None  # V2 has no e_score_correction_bias

    @property
    def topk_method(self) -> str:
        return self.cfg.get("topk_method", default="greedy")

    @property
    def router_groups(self) -> tuple[int, int] | None:
        """(n_group, topk_group) where routing is group-limited, else None."""
        if self.topk_method != "group_limited_greedy":
            return None  # transformers ignores n_group / topk_group for greedy top-k
        groups = int(self.cfg.require("n_group"))
        topk_group = int(self.cfg.require("topk_group"))
        return None if topk_group >= groups else (groups, topk_group)

    def check_unsupported(self):
        c = self.cfg
        if c.get("hidden_act", default="silu") != "silu":
            raise UnsupportedConfig(f"hidden_act={c.get('hidden_act')!r}: only 'silu' (SwiGLU) is mapped")
        if c.get("attention_bias", default=False):
            raise UnsupportedConfig("attention_bias=true: megatron's MLA has no bias on its projections")
        if self.topk_method not in TOPK_METHODS:
            raise UnsupportedConfig(f"topk_method={self.topk_method!r}: DeepSeek-V2 routing is mapped for "
                                    f"{', '.join(TOPK_METHODS)}")
        if c.get("scoring_func", default="softmax") != "softmax":
            raise UnsupportedConfig(f"scoring_func={c.get('scoring_func')!r}: transformers' DeepSeek-V2 router "
                                    f"always scores with softmax")
        if c.get("norm_topk_prob", default=False):
            raise UnsupportedConfig(
                "norm_topk_prob=true: transformers' DeepSeek-V2 router never renormalises its top-k weights "
                "(DeepSeek's original code did), so the converted model could match only one of them")
        if int(c.get("moe_layer_freq", default=1)) != 1:
            raise UnsupportedConfig(f"moe_layer_freq={c.get('moe_layer_freq')}: transformers makes every layer "
                                    f"from first_k_dense_replace on sparse; only moe_layer_freq=1 means that")
        topk = int(c.require("num_experts_per_tok"))
        if self.router_groups:
            groups, topk_group = self.router_groups
            if topk // topk_group != 1:
                raise UnsupportedConfig(
                    f"topk_method='group_limited_greedy' with num_experts_per_tok={topk}, "
                    f"topk_group={topk_group}: transformers scores a group by its largest expert score, "
                    f"megatron-core by the sum of its top num_experts_per_tok // topk_group = {topk // topk_group}; "
                    f"they agree only when topk_group <= num_experts_per_tok < 2 x topk_group")

    def model_settings(self) -> dict:
        settings = super().model_settings()
        c = self.cfg
        groups = self.router_groups
        settings["config"].update(
            moe_router_score_function="softmax",
            moe_router_pre_softmax=True,  # softmax over all experts, then top-k: no renormalisation
            moe_router_enable_expert_bias=False,
            moe_router_num_groups=groups[0] if groups else None,
            moe_router_group_topk=groups[1] if groups else None,
            moe_router_topk_scaling_factor=float(c.get("routed_scaling_factor", default=1.0)),
        )
        return settings
