"""Phi-3 / Phi-4 (``phi3``): a Llama-shaped decoder whose checkpoint stores the attention input as one
fused ``self_attn.qkv_proj`` ([q; k; v] rows) and the MLP input as one ``mlp.gate_up_proj``
([gate; up] rows). The fused transforms read each rank's rows of those tensors and write them back
fused. A ``sliding_window`` is megatron's ``window_size`` on every layer. LongRoPE (Phi-3-mini-128k,
Phi-4-mini) is refused: megatron-core's rotary embedding has no
per-dimension rescaling factors. Partial rotary (``partial_rotary_factor``) maps onto
``rotary_percent`` (both rotate the first dims, halves not interleaved).
"""

from __future__ import annotations

from ..transforms import FUSED_GATED_MLP, ROW, FusedQKV
from .base import UnsupportedConfig, rule
from .llama import L, Llama


class Phi3(Llama):
    model_types = ("phi3",)
    name = "phi3"

    @property
    def partial_rotary(self) -> float:
        """HF reads it from ``rope_parameters`` or, in older configs, the top level."""
        return float(self.cfg.rope.get("partial_rotary_factor",
                                       self.cfg.get("partial_rotary_factor", default=1.0)))

    def check_unsupported(self):
        """``sliding_window`` (Phi-3-mini-4k: 2047) is HF's Mistral-style window on every layer:
        ``Llama.layer_windows`` maps it to megatron's ``window_size=(w - 1, 0)``."""
        self.check_unsupported_common()

    def check_unsupported_common(self):
        c = self.cfg
        if c.get("hidden_act", default="silu") != "silu":
            raise UnsupportedConfig(f"hidden_act={c.get('hidden_act')!r}: only 'silu' (SwiGLU) is mapped")
        if c.get("attention_bias", default=False) or c.get("mlp_bias", default=False):
            raise UnsupportedConfig("attention_bias/mlp_bias=true: the HF Phi-3 model has no biases on its "
                                    "projections; a config asking for them is not a Phi-3 checkpoint")

    def rope_settings(self) -> dict:
        rope = self.cfg.rope
        kind = rope.get("rope_type", "default")
        if kind in ("longrope", "su", "yarn"):  # transformers maps Phi-3's "su"/"yarn" to longrope
            raise UnsupportedConfig(
                f"rope_scaling.type={kind!r} (LongRoPE: per-dimension short_factor/long_factor rescaling "
                f"and an attention factor): megatron-core's rotary embedding cannot express it; the "
                f"converted model would rotate with plain RoPE frequencies instead")
        if kind != "default":
            raise UnsupportedConfig(f"rope_scaling.type={kind!r}: Phi-3 defines default RoPE or longrope only")
        return {"rotary_base": float(rope.get("rope_theta", 10000.0)), "rotary_percent": self.partial_rotary}

    def attention_rules(self):
        H = self.hf_layer_prefix
        c = self.settings_config()
        qkv = FusedQKV(c["num_attention_heads"], c["num_query_groups"], c["kv_channels"])
        return [rule(L + "self_attention.linear_qkv.weight", H + "self_attn.qkv_proj.weight", qkv),
                rule(L + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight", ROW)]

    def mlp_rules(self):
        H = self.hf_layer_prefix
        return [rule(L + "mlp.linear_fc1.weight", H + "mlp.gate_up_proj.weight", FUSED_GATED_MLP),
                rule(L + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight", ROW)]
