"""Mixture-of-experts decoders on the Llama/Qwen attention: Mixtral, Qwen2-MoE, Qwen3-MoE.

What they add to their dense parents: a router (``gate``), routed experts stored one tensor per
expert on disk, optionally a shared expert with a sigmoid gate (Qwen2-MoE), and, for Qwen, a
choice of which layers are sparse (``decoder_sparse_step``, ``mlp_only_layers``).
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

from ..transforms import GATED_MLP, REPLICATED, ROW
from .base import Layers, UnsupportedConfig, rule
from .llama import Llama
from .qwen import Qwen2, Qwen3

L = "decoder.layers.{L}."
EXPERT = L + "mlp.experts.local_experts.{E}."


class MoEMixin:
    """Shared MoE settings and rules. Subclasses name their HF fields and module paths."""

    router_hf = "mlp.gate.weight"
    # LoRA on the router only when named; PEFT adapts it as a parameter (routers are not Linear
    # modules), under transformers 5's in-memory name
    lora_named_only = MappingProxyType({"router": "mlp.gate.weight"})
    expert_hf = ("mlp.experts.{E}.gate_proj.weight", "mlp.experts.{E}.up_proj.weight",
                 "mlp.experts.{E}.down_proj.weight")
    # the same experts stacked [E, ...] (see ``stacked``): gate_up_proj and down_proj
    stacked_hf = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    per_expert_storage = True  # False: HF knows only the stacked storage (export never writes per expert)
    shared_expert = False
    shared_hf = "mlp.shared_expert."  # HF module of the shared expert(s)
    shared_gate_hf = "mlp.shared_expert_gate.weight"  # sigmoid gate on the shared expert, or None
    router_bias_hf = None  # routing-only bias (DeepSeek's e_score_correction_bias)
    # megatron-core registers the routing bias as a float32 buffer whatever the model's dtype
    # (``TopKRouter.expert_bias``): an fp32 bias beside bf16 weights keeps the model bf16
    fp32_in_megatron = ("mlp.router.expert_bias",)
    # module paths transformers 5 builds under other names than the checkpoint's (PEFT adapters
    # name modules as built): on-disk prefix -> in-memory prefix
    hf_module_renames: dict[str, str] = {}

    # -- config ------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        n = self.cfg.get("num_experts", "num_local_experts")  # transformers 5 saves the second
        if n is None:
            raise UnsupportedConfig("config.json has neither 'num_experts' nor 'num_local_experts'")
        return int(n)

    @property
    def expert_ffn(self) -> int:
        return int(self.cfg.require("moe_intermediate_size"))

    @property
    def norm_topk_prob(self) -> bool:
        return bool(self.cfg.get("norm_topk_prob", default=False))

    def is_moe_layer(self, layer: int) -> bool:
        c = self.cfg
        step = int(c.get("decoder_sparse_step", default=1))
        return layer not in (c.get("mlp_only_layers") or []) and (layer + 1) % step == 0

    def moe_settings(self) -> dict:
        c = self.cfg
        topk = int(c.require("num_experts_per_tok"))
        if topk > self.num_experts:
            raise UnsupportedConfig(f"num_experts_per_tok={topk} exceeds the {self.num_experts} experts")
        shared = int(c.get("shared_expert_intermediate_size", default=0)) if self.shared_expert else 0
        return dict(
            num_moe_experts=self.num_experts,
            moe_router_topk=topk,
            moe_ffn_hidden_size=self.expert_ffn,
            moe_shared_expert_intermediate_size=shared or None,
            moe_shared_expert_gate=bool(shared),
            moe_router_score_function="softmax",
            # softmax over all experts then top-k (no renormalisation) == pre-softmax; softmax over
            # the top-k logits == top-k of the full softmax renormalised (norm_topk_prob).
            moe_router_pre_softmax=not self.norm_topk_prob,
            moe_layer_freq=[1 if self.is_moe_layer(i) else 0 for i in range(self.num_layers)],
        )

    def model_settings(self) -> dict:
        settings = super().model_settings()
        settings["config"].update(self.moe_settings())
        if not any(self.is_moe_layer(i) for i in range(self.num_layers)):
            raise UnsupportedConfig("no layer of this MoE config is sparse (decoder_sparse_step / "
                                    "mlp_only_layers): convert it as a dense model")
        return settings

    decoder_block_spec = True

    def layer_spec(self, config, vp_stage, pp_rank):
        """Per-layer specs: dense and MoE layers mixed, from ``config.moe_layer_freq``."""
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        return get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                          normalization=self.architecture.config["normalization"],
                                          vp_stage=vp_stage, pp_rank=pp_rank)

    # -- weights -----------------------------------------------------------------------------
    def mlp_rules(self):
        """The parent's dense MLP on dense layers; router, experts and shared experts on MoE layers."""
        H, moe_ = self.hf_layer_prefix, Layers.MOE
        dense = [dataclasses.replace(r, when=Layers.DENSE) for r in super().mlp_rules()]
        gate, up, down = (H + n for n in self.expert_hf)
        moe = [rule(L + "mlp.router.weight", H + self.router_hf, REPLICATED, when=moe_)]
        if self.router_bias_hf:
            moe.append(rule(L + "mlp.router.expert_bias", H + self.router_bias_hf, REPLICATED, when=moe_))
        moe += [
            rule(EXPERT + "linear_fc1.weight", [gate, up], GATED_MLP, when=moe_),
            rule(EXPERT + "linear_fc2.weight", down, ROW, when=moe_),
        ]
        if self.shared_expert:
            s = H + self.shared_hf
            moe += [
                rule(L + "mlp.shared_experts.linear_fc1.weight", [s + "gate_proj.weight", s + "up_proj.weight"],
                     GATED_MLP, when=moe_),
                rule(L + "mlp.shared_experts.linear_fc2.weight", s + "down_proj.weight", ROW, when=moe_),
            ]
            if self.shared_gate_hf:
                moe.append(rule(L + "mlp.shared_experts.gate_weight", H + self.shared_gate_hf, REPLICATED,
                                when=moe_))
        return dense + moe


class Mixtral(MoEMixin, Llama):
    model_types = ("mixtral",)
    name = "mixtral"
    router_hf = "block_sparse_moe.gate.weight"
    hf_module_renames = {".block_sparse_moe.gate.": ".mlp.gate."}
    expert_hf = ("block_sparse_moe.experts.{E}.w1.weight", "block_sparse_moe.experts.{E}.w3.weight",
                 "block_sparse_moe.experts.{E}.w2.weight")

    @property
    def expert_ffn(self) -> int:
        return int(self.cfg.require("intermediate_size"))

    @property
    def norm_topk_prob(self) -> bool:
        return True  # Mixtral always renormalises its top-k softmax weights

    def is_moe_layer(self, layer: int) -> bool:
        return True


class Qwen2MoE(MoEMixin, Qwen2):
    model_types = ("qwen2_moe",)
    name = "qwen2_moe"
    shared_expert = True

    @property
    def qkv_bias(self) -> bool:
        return bool(self.cfg.get("qkv_bias", default=True))


class Qwen3MoE(MoEMixin, Qwen3):
    model_types = ("qwen3_moe",)
    name = "qwen3_moe"
