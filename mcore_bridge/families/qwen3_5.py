"""Qwen3.5 (``qwen3_5``) and Qwen3.5-MoE (``qwen3_5_moe``): natively vision-language hybrid models.

The language model interleaves gated delta-net layers (``layer_types`` ``linear_attention``,
megatron-core's ``GatedDeltaNet``) with gated full-attention layers (``full_attention``: an output
gate read from the second half of each head's ``q_proj`` rows, megatron's
``attention_output_gate``), every RMSNorm but the delta-net's gated output norm stored as an offset
from 1 (``(1 + w)``), partial rotary (default 0.25) with interleaved multimodal RoPE as Qwen3-VL.
The MoE variant has routed experts (stacked in transformers' module, ``experts.gate_up_proj
[E, 2F, H]``; saved by transformers 5 one tensor per expert, ``experts.{E}.gate_proj.weight``; both
storages read), always renormalised top-k, and a shared expert with a sigmoid gate, on every layer.

The vision tower is Qwen3-VL's without deepstack (``Qwen3_5VisionModel`` drops
``deepstack_merger_list``; ``vision_config`` has no ``deepstack_visual_indexes``): the merger's
output replaces the image/video token embeddings, nothing enters later language layers, so no
layer has to share the first pipeline stage with it. Same HF prefixes as Qwen3-VL under transformers 5
(``model.language_model.*``, ``model.visual.*``, ``lm_head``).

The megatron side is Qwen3-Next's (``gated_deltanet``: settings, hybrid block spec with the
delta-net in the linear layers, gated-attention rules, ``Rule.mixer``; the CPU delta rule is a
scoped adaptation in ``runtime/compat.py``). What differs is the delta-net's HF storage:
Qwen3-Next fuses ``in_proj_qkvz`` / ``in_proj_ba`` per key head, Qwen3.5 stores ``in_proj_qkv``
([q; k; v] over all heads), ``in_proj_z``, ``in_proj_b``, ``in_proj_a`` separately; megatron's
``in_proj`` holds ``[q_r; k_r; v_r; z_r; b_r; a_r]`` per tensor-parallel rank (``FusedBlocks`` over the four tensors).
``conv1d`` ([q; k; v] channels), ``A_log``, ``dt_bias``, ``norm`` and ``out_proj`` are stored as
Qwen3-Next's.

Multi-token prediction: the published checkpoints hold one MTP layer (``text_config``
``mtp_num_hidden_layers: 1``) stored as Qwen3-Next's, top-level ``mtp.*`` (``mtp.fc``,
``mtp.pre_fc_norm_embedding`` / ``_hidden``, ``mtp.layers.0.*``: a gated full-attention layer with
the model's MLP, dense or MoE, under the language layers' names; ``mtp.norm``), as vLLM's
``Qwen3_5MTP`` loads it; transformers ignores it. Converted through Qwen3-Next's MTPMixin hooks
(``qwen3_next.QwenNextMTP``) into megatron-core's ``MultiTokenPredictionBlock``; a checkpoint without
``mtp.*`` tensors converts as the main model alone.
"""

from __future__ import annotations

from ..transforms import FusedBlocks
from . import gated_deltanet as gdn
from .base import HFConfig, UnsupportedConfig, rule
from .moe import MoEMixin
from .qwen import Qwen3
from .qwen3_next import QwenNextMTP
from .qwen_vl import VisionLanguageMixin

L = "decoder.layers.{L}."
HF_PARTIAL_ROTARY_DEFAULT = 0.25  # Qwen3_5TextConfig's default (not 1.0) where the config is silent


class Qwen35Mixin(VisionLanguageMixin):
    """What Qwen3.5 adds to the Qwen3 vision-language model; the MoE variant shares it."""

    mrope_interleaved = True  # Qwen3_5TextRotaryEmbedding is Qwen3-VL's (t/h/w interleaved)

    # -- config ------------------------------------------------------------------------------
    def linear(self) -> list[bool]:
        """Linear-attention layers: ``layer_types``, else every ``full_attention_interval``-th
        layer (default 4) is full attention, as transformers fills it in."""
        return gdn.linear_layers(self.cfg, self.num_layers)

    def layer_mixer(self, layer: int) -> str:
        return gdn.LINEAR if self.linear()[layer] else gdn.ATTENTION

    def layer_windows(self) -> list:
        return [None] * self.num_layers  # layer_types name token mixers here, never windows

    @property
    def partial_rotary(self) -> float:
        return float(self.cfg.rope.get("partial_rotary_factor",
                                       self.cfg.get("partial_rotary_factor", default=HF_PARTIAL_ROTARY_DEFAULT)))

    @property
    def mrope_section(self) -> list[int]:
        section = self.cfg.rope.get("mrope_section")
        rotary = int(self.head_dim * self.partial_rotary)
        if not section or len(section) != 3 or 2 * sum(section) != rotary:
            raise UnsupportedConfig(f"rope mrope_section={section!r}: a 3-part section summing to half the "
                                    f"rotary dimension {rotary} (head_dim {self.head_dim} x partial_rotary_factor "
                                    f"{self.partial_rotary}) is needed")
        return [int(s) for s in section]

    def rope_settings(self) -> dict:
        out = super().rope_settings()
        if self.cfg.rope.get("mrope_interleaved") is False:
            raise UnsupportedConfig("rope mrope_interleaved=false: transformers' Qwen3.5 always interleaves "
                                    "t/h/w frequencies; a contiguous split is another model")
        return {**out, "rotary_percent": self.partial_rotary}

    def check_unsupported(self):
        super().check_unsupported()
        if self.cfg.get("attn_output_gate", default=True) is not True:
            raise UnsupportedConfig("attn_output_gate=false: transformers' Qwen3.5 attention always gates its "
                                    "output (q_proj holds 2 x head_dim rows per head)")

    def model_settings(self) -> dict:
        settings = super().model_settings()
        extra = gdn.gdn_settings(self.cfg, self.linear()) if any(self.linear()) else {}
        settings["config"].update(attention_output_gate=True, **extra)
        return settings

    def check_layout(self, layout) -> None:
        if any(self.linear()):
            gdn.check_layout(self.architecture.config, layout)
        super().check_layout(layout)

    # -- megatron model ------------------------------------------------------------------------
    decoder_block_spec = True  # per-layer specs: delta-net or gated attention

    def layer_spec(self, config, vp_stage, pp_rank):
        """Qwen3-Next's hybrid block spec; every norm but the delta-net's output norm is ``(1 + w)``."""
        from .gemma_modules import OffsetRMSNorm

        return gdn.hybrid_block_spec(config, vp_stage, pp_rank, self.linear(), norm=OffsetRMSNorm,
                                     qk_norm=OffsetRMSNorm)

    # -- weights -----------------------------------------------------------------------------
    def attention_rules(self):
        H, c = self.hf_layer_prefix, self.settings_config()
        rules = gdn.gated_attention_rules(H, c)
        if not any(self.linear()):
            return rules
        G = H + "linear_attn."
        qk = c["linear_key_head_dim"] * c["linear_num_key_heads"]
        v, nv = c["linear_value_head_dim"] * c["linear_num_value_heads"], c["linear_num_value_heads"]
        in_proj = rule(L + "self_attention.in_proj.weight", [G + f"in_proj_{p}.weight" for p in ("qkv", "z", "b", "a")],
                       FusedBlocks(((qk, qk, v), (v,), (nv,), (nv,))), mixer=gdn.LINEAR)
        # conv1d, A_log, dt_bias, norm, out_proj: stored as Qwen3-Next's
        return [in_proj] + [r for r in gdn.gdn_rules(H, c) if not r.mcore.endswith("in_proj.weight")] + rules


class Qwen35(gdn.DeltaNetRuntime, QwenNextMTP, Qwen35Mixin, Qwen3):
    model_types = ("qwen3_5",)
    name = "qwen3_5"
    vision_class = "qwen3_5.modeling_qwen3_5.Qwen3_5VisionModel"
    model_class = "qwen3_5.modeling_qwen3_5.Qwen3_5Model"
    check_lora = VisionLanguageMixin.check_lora  # refused as a vision-language model first, MTP or not


class Qwen35MoE(gdn.DeltaNetRuntime, QwenNextMTP, Qwen35Mixin, MoEMixin, Qwen3):
    """Every layer is sparse (the config has no ``decoder_sparse_step`` / ``mlp_only_layers``)."""

    model_types = ("qwen3_5_moe",)
    name = "qwen3_5_moe"
    vision_class = "qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeVisionModel"
    model_class = "qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeModel"
    check_lora = VisionLanguageMixin.check_lora
    shared_expert = True

    def __init__(self, raw_config: dict):
        super().__init__(raw_config)
        if self.cfg.get("intermediate_size") is None:
            # the published configs have none (Qwen3_5MoeTextConfig defines no dense MLP size): no layer
            # has a dense MLP, so megatron's ffn_hidden_size is used by none; the expert size stands in
            self.cfg = HFConfig({**self.cfg.raw, "intermediate_size": self.cfg.require("moe_intermediate_size")})

    @property
    def norm_topk_prob(self) -> bool:
        return True  # Qwen3_5MoeTopKRouter always renormalises its top-k softmax weights

    def is_moe_layer(self, layer: int) -> bool:
        return True
