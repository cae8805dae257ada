"""GLM-4-0414 dense (``glm4``): Llama-shaped attention with q/k/v biases, plus

* sandwich norms: ``post_self_attn_layernorm`` and ``post_mlp_layernorm`` normalise the attention
  and MLP outputs before their residual adds (``sandwich.SandwichLayer``); HF's
  ``post_attention_layernorm`` is the pre-MLP norm, as in Llama;
* partial rotary: the first ``partial_rotary_factor`` (default 0.5) of each head's dims rotate, in
  interleaved pairs (HF ``rotate_half`` on even/odd lanes with ``repeat_interleave``d cos/sin) =
  megatron's ``rotary_percent`` with ``rotary_interleaved=True``;
* the MLP input fused in the checkpoint (``mlp.gate_up_proj``, [gate; up] rows).

HF's defaults differ from Llama's: ``head_dim`` 128, ``attention_bias`` true, ``partial_rotary_factor``
0.5 when the config leaves them out.
"""

from __future__ import annotations

from ..transforms import FUSED_GATED_MLP, REPLICATED, ROW
from .base import UnsupportedConfig, rule
from .llama import L, Llama
from .sandwich import sandwich_layer_spec


class Glm4(Llama):
    model_types = ("glm4",)
    name = "glm4"

    @property
    def head_dim(self) -> int:
        return int(self.cfg.get("head_dim", default=128))

    @property
    def qkv_bias(self) -> bool:
        return bool(self.cfg.get("attention_bias", default=True))

    @property
    def partial_rotary(self) -> float:
        return float(self.cfg.rope.get("partial_rotary_factor",
                                       self.cfg.get("partial_rotary_factor", default=0.5)))

    def check_unsupported(self):
        c = self.cfg
        if c.get("hidden_act", default="silu") != "silu":
            raise UnsupportedConfig(f"hidden_act={c.get('hidden_act')!r}: only 'silu' (SwiGLU) is mapped")

    def rope_settings(self) -> dict:
        rope = self.cfg.rope
        kind = rope.get("rope_type", "default")
        if kind != "default":
            raise UnsupportedConfig(f"rope_scaling.type={kind!r}: GLM-4's interleaved partial RoPE is mapped "
                                    f"without scaling only")
        return {"rotary_base": float(rope.get("rope_theta", 10000.0)), "rotary_percent": self.partial_rotary}

    def model_settings(self) -> dict:
        s = super().model_settings()
        s["config"]["rotary_interleaved"] = True
        return s

    def layer_spec(self, config, vp_stage, pp_rank):
        base = super().layer_spec(config, vp_stage, pp_rank)
        return sandwich_layer_spec(base)

    def rules(self):
        H = self.hf_layer_prefix
        return super().rules() + [
            rule(L + "post_self_attn_layernorm.weight", H + "post_self_attn_layernorm.weight", REPLICATED),
            rule(L + "post_mlp_layernorm.weight", H + "post_mlp_layernorm.weight", REPLICATED),
        ]

    def mlp_rules(self):
        H = self.hf_layer_prefix
        return [rule(L + "mlp.linear_fc1.weight", H + "mlp.gate_up_proj.weight", FUSED_GATED_MLP),
                rule(L + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight", ROW)]
