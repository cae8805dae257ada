"""GLM-4.5 / 4.6 / 4.5-Air (``glm4_moe``): a GQA attention with q/k/v bias, optional per-head q/k
RMSNorm (``use_qk_norm``) and partial rotary (``partial_rotary_factor``, default 0.5); DeepSeek-V3's
router (sigmoid scores, ``e_score_correction_bias`` for the choice only, group-limited top-k,
``routed_scaling_factor``); the first ``first_k_dense_replace`` layers dense; shared experts; MTP
layers stored after the last decoder layer, stored and converted as DeepSeek-V3's (``mtp.MTPMixin``).

Partial rotary: transformers rotates the first ``head_dim * partial_rotary_factor`` dimensions of
each head, pairing dimension i with i + rot/2 (``rotate_half``), frequencies over that width;
megatron-core's ``rotary_percent`` does the same (non-interleaved ``rotate_half`` on the first
``kv_channels * rotary_percent`` dimensions). Verified end to end against transformers.
"""

from __future__ import annotations

from .base import UnsupportedConfig
from .deepseek import check_sigmoid_router
from .llama import Llama
from .moe import MoEMixin
from .mtp import MTPMixin

HF_PARTIAL_ROTARY_DEFAULT = 0.5  # Glm4MoeConfig's default when config.json does not say


class Glm4Moe(MTPMixin, MoEMixin, Llama):
    model_types = ("glm4_moe",)
    name = "glm4_moe"
    shared_hf = "mlp.shared_experts."
    shared_gate_hf = None
    router_bias_hf = "mlp.gate.e_score_correction_bias"

    # -- config ------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        n = self.cfg.get("n_routed_experts", "num_local_experts")
        if n is None:
            raise UnsupportedConfig("config.json has neither 'n_routed_experts' nor 'num_local_experts'")
        return int(n)

    @property
    def shared_expert(self) -> bool:
        return int(self.cfg.get("n_shared_experts", default=0)) > 0

    @property
    def qkv_bias(self) -> bool:
        return bool(self.cfg.get("attention_bias", default=False))

    @property
    def qk_norm(self) -> bool:
        return bool(self.cfg.get("use_qk_norm", default=False))

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= int(self.cfg.get("first_k_dense_replace", default=0))

    def check_unsupported(self):
        c = self.cfg
        if c.get("hidden_act", default="silu") != "silu":
            raise UnsupportedConfig(f"hidden_act={c.get('hidden_act')!r}: only 'silu' (SwiGLU) is mapped")
        check_sigmoid_router(c)

    def rope_settings(self) -> dict:
        out = super().rope_settings()
        rope = self.cfg.rope
        # transformers 5 keeps it in rope_parameters; 4.x checkpoints at the top level
        factor = rope.get("partial_rotary_factor", self.cfg.get("partial_rotary_factor",
                                                                 default=HF_PARTIAL_ROTARY_DEFAULT))
        rot = self.head_dim * float(factor)
        if rot != int(rot) or int(rot) % 2:
            raise UnsupportedConfig(f"partial_rotary_factor={factor}: head_dim {self.head_dim} x factor must be an "
                                    f"even number of rotated dimensions")
        return {**out, "rotary_percent": float(factor)}

    def moe_settings(self) -> dict:
        c = self.cfg
        out = super().moe_settings()
        groups = int(c.get("n_group", default=1))
        topk_group = int(c.get("topk_group", default=groups))
        grouped = 1 < groups and topk_group < groups
        shared = self.expert_ffn * int(c.get("n_shared_experts", default=0))
        out.update(
            moe_shared_expert_intermediate_size=shared or None,
            moe_shared_expert_gate=False,
            moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
            moe_router_num_groups=groups if grouped else None,
            moe_router_group_topk=topk_group if grouped else None,
            moe_router_topk_scaling_factor=float(c.get("routed_scaling_factor", default=1.0)),
            moe_router_pre_softmax=False,
            moe_router_dtype="fp32",  # transformers keeps the router and its bias in fp32
        )
        return out
