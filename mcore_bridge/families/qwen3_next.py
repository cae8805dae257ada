"""Qwen3-Next (``qwen3_next``: Qwen3NextForCausalLM, e.g. Qwen/Qwen3-Next-80B-A3B-Instruct).

A hybrid decoder (``gated_deltanet``): gated delta-net linear-attention layers (megatron-core's
``GatedDeltaNet``) interleaved with gated full-attention layers (``attention_output_gate``: HF's
``q_proj`` is twice as wide, query and sigmoid gate per head); q/k RMSNorm; partial rotary
(``partial_rotary_factor``, top level in 4.x configs, in ``rope_parameters`` in transformers 5);
Qwen3-MoE's softmax top-k router (``norm_topk_prob``) with a shared expert behind a sigmoid gate
(``shared_expert_gate``: megatron's ``moe_shared_expert_gate``); dense layers where
``mlp_only_layers`` / ``decoder_sparse_step`` say.

Norms: every RMSNorm of the model (layer norms, q/k norms, final norm) is ``(1 + w)`` with the
offset stored (transformers' Qwen3NextRMSNorm, computed in fp32): megatron's local spec cannot
build one (``WrappedTorchNorm`` asserts ``layernorm_zero_centered_gamma`` off), so they are Gemma's
``OffsetRMSNorm`` and the stored offset is copied as is. The delta-net's output norm is a plain-weight
RMSNorm (HF ``Qwen3NextRMSNormGated``, weight initialised to ones) gated by silu(z): megatron's
``out_norm`` + its gate, the same computation.

Multi-token prediction (``MTPMixin``): the published checkpoint stores one MTP layer under ``mtp.*``,
which transformers ignores on load and its config does not describe (no ``num_nextn_predict_layers``;
one layer is assumed, as vLLM's Qwen3NextMTP does, and a checkpoint without ``mtp.*`` tensors converts
without it): ``mtp.pre_fc_norm_embedding`` (megatron's ``enorm``), ``mtp.pre_fc_norm_hidden``
(``hnorm``), ``mtp.fc`` (``eh_proj``, applied to ``cat(embedding, hidden)``, vLLM's order too),
``mtp.layers.0.*`` (a gated full-attention MoE decoder layer, HF's names) and ``mtp.norm``
(``final_layernorm``); no copies of the embedding or head (the main model's are used). Its norms are
``(1 + w)`` like every norm here.
"""

from __future__ import annotations

from . import gated_deltanet as gdn
from .base import UnsupportedConfig
from .moe import MoEMixin
from .mtp import MTPMixin
from .qwen import Qwen3

HF_PARTIAL_ROTARY_DEFAULT = 0.25  # Qwen3NextConfig's default


class QwenNextMTP(MTPMixin):
    """MTPMixin's hooks for the MTP layer as Qwen3-Next and Qwen3.5 (dense and MoE) publish it:
    top-level ``mtp.*`` (``mtp.fc``, ``mtp.pre_fc_norm_embedding`` / ``_hidden``, ``mtp.layers.0.*``
    under the model's own decoder-layer names, ``mtp.norm``), ``(1 + w)`` norms, one full-attention
    layer with the model's MLP (MoE where the model is); no embedding or head copies."""

    def mtp_declared(self) -> int:
        n = int(self.cfg.get("num_nextn_predict_layers", default=self.cfg.get("mtp_num_hidden_layers", default=1)))
        if n > 1:
            raise UnsupportedConfig(f"{self.name}: {n} multi-token-prediction layers declared; the names of its "
                                    f"MTP layer (mtp.fc, mtp.norm, ...) are known for one layer only")
        return n

    def mtp_hf_prefix(self, k: int) -> str:
        return f"mtp.layers.{k}."

    def mtp_rule_layer(self, k: int) -> int:
        return self.num_layers - 1  # the MTP layer is a full-attention layer, as megatron builds it

    def mtp_hf_names(self, k: int) -> dict:
        return {"enorm": "mtp.pre_fc_norm_embedding.weight", "hnorm": "mtp.pre_fc_norm_hidden.weight",
                "eh_proj": "mtp.fc.weight", "final_norm": "mtp.norm.weight", "embed": None, "head": None}

    def mtp_norm(self):
        from .gemma_modules import OffsetRMSNorm

        return OffsetRMSNorm

    def mtp_reference_kwargs(self, n: int) -> dict:
        types = ["linear_attention" if x else "full_attention" for x in self.linear()]
        return {"num_hidden_layers": self.num_layers + n, "layer_types": types + ["full_attention"] * n,
                "key_mapping": {rf"^mtp\.layers\.{k}\.": self.hf_layer_prefix.replace("{L}", str(self.num_layers + k))
                                for k in range(n)}}

    def extend_settings(self, settings: dict) -> dict:
        if self.mtp_layers:
            last, moe = self.num_layers - 1, self.num_experts > 0
            if self.linear()[last] or self.is_moe_layer(last) != moe:
                kind = "linear-attention" if self.linear()[last] else "dense" if moe else "MoE"
                raise UnsupportedConfig(
                    f"{self.name}: the MTP layer is a full-attention {'MoE' if moe else 'dense'} layer, but "
                    f"megatron-core builds it from the spec of the last decoder layer ({last}), a {kind} layer; "
                    f"convert a copy of the checkpoint without the mtp.* tensors")
        return super().extend_settings(settings)


class Qwen3Next(gdn.DeltaNetRuntime, QwenNextMTP, MoEMixin, Qwen3):
    model_types = ("qwen3_next",)
    name = "qwen3_next"
    shared_expert = True
    lora_absent = {"router": "has no LoRA mapping yet (qwen3_next)", "gate": "has no LoRA mapping yet (qwen3_next)"}

    # -- config ------------------------------------------------------------------------------
    def linear(self) -> list[bool]:
        return gdn.linear_layers(self.cfg, self.num_layers)

    def layer_mixer(self, layer: int) -> str:
        return gdn.LINEAR if self.linear()[layer] else gdn.ATTENTION

    def layer_windows(self) -> list:
        if self.cfg.get("use_sliding_window", default=False):
            raise UnsupportedConfig("use_sliding_window=true: transformers' Qwen3-Next attention has no window "
                                    "(the field is ignored there); set it false")
        return [None] * self.num_layers

    def check_unsupported(self):
        super().check_unsupported()
        if self.cfg.get("attention_bias", default=False):
            raise UnsupportedConfig("attention_bias=true: megatron's gated linear_qkv would need the q/gate bias "
                                    "rows interleaved; Qwen3-Next checkpoints have none")

    def rope_settings(self) -> dict:
        out = super().rope_settings()
        factor = self.cfg.rope.get("partial_rotary_factor",
                                   self.cfg.get("partial_rotary_factor", default=HF_PARTIAL_ROTARY_DEFAULT))
        rot = self.head_dim * float(factor)
        if rot != int(rot) or int(rot) % 2:
            raise UnsupportedConfig(f"partial_rotary_factor={factor}: head_dim {self.head_dim} x factor must be an "
                                    f"even number of rotated dimensions")
        return {**out, "rotary_percent": float(factor)}

    def model_settings(self) -> dict:
        s = super().model_settings()
        s["config"].update(gdn.gdn_settings(self.cfg, self.linear()), attention_output_gate=True)
        return s

    def check_layout(self, layout) -> None:
        gdn.check_layout(self.architecture.config, layout)
        super().check_layout(layout)

    def check_lora(self) -> None:
        from ..errors import AdapterError

        raise AdapterError("LoRA on qwen3_next is not supported yet: the delta-net projections (in_proj_qkvz, "
                           "in_proj_ba) and the gated q_proj have no adapter mapping")

    # -- megatron modules ----------------------------------------------------------------------
    def layer_spec(self, config, vp_stage, pp_rank):
        from .gemma_modules import OffsetRMSNorm

        return gdn.hybrid_block_spec(config, vp_stage, pp_rank, self.linear(), norm=OffsetRMSNorm,
                                     qk_norm=OffsetRMSNorm)

    # -- weights -------------------------------------------------------------------------------
    def attention_rules(self):
        H, c = self.hf_layer_prefix, self.settings_config()
        return gdn.gdn_rules(H, c) + gdn.gated_attention_rules(H, c)
