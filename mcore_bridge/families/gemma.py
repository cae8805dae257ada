"""Gemma 3 text (``gemma3_text``: Gemma3ForCausalLM, e.g. google/gemma-3-1b-it).

Mapped onto megatron-core's GPT model with small subclasses (``gemma_modules``): sandwich norms
(HF ``post_attention_layernorm`` / ``post_feedforward_layernorm`` after attention / MLP,
``pre_feedforward_layernorm`` is megatron's ``pre_mlp_layernorm``), ``(1 + w)`` RMSNorm everywhere
(layers, q/k norms, final norm; the stored weight is the offset on both sides, so it is copied as
is), the embedding scaled by sqrt(hidden), GeGLU with the tanh GELU, ``query_pre_attn_scalar`` as
megatron's ``softmax_scale``, sliding layers (``layer_types`` / ``sliding_window_pattern``) as
``window_size`` + ``window_attn_skip_freq`` with the local RoPE base (``rope_local_base_freq``) and
the global layers' base (``rope_theta``, linear scaling as megatron's position interpolation).
"""

from __future__ import annotations

import torch

from ..transforms import GATED_MLP, QKV, REPLICATED, ROW, VOCAB
from .base import UnsupportedConfig, rule
from .llama import L, Llama, windows_from_layer_types


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``gelu_pytorch_tanh``."""
    return torch.nn.functional.gelu(x, approximate="tanh")


class Gemma3Text(Llama):
    model_types = ("gemma3_text",)
    name = "gemma3_text"
    decoder_block_spec = True  # a block spec: the final norm is Gemma's too

    @property
    def tied(self) -> bool:
        return bool(self.cfg.get("tie_word_embeddings", default=True))  # Gemma3TextConfig's default

    @property
    def qk_norm(self) -> bool:
        return True

    def check_unsupported(self):
        c = self.cfg
        act = c.get("hidden_activation", "hidden_act", default="gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise UnsupportedConfig(f"hidden_activation={act!r}: only 'gelu_pytorch_tanh' (GeGLU, tanh) is mapped")
        for field in ("attn_logit_softcapping", "final_logit_softcapping"):
            if c.get(field) is not None:
                raise UnsupportedConfig(f"{field}={c.get(field)}: megatron-core's GPT model has no logit "
                                        f"soft-capping (tanh); the converted model would compute other logits")
        if c.get("use_bidirectional_attention", default=False):
            raise UnsupportedConfig("use_bidirectional_attention=true: megatron-core's local attention is causal")
        if c.get("attention_bias", default=False):
            raise UnsupportedConfig("attention_bias=true: Gemma 3 checkpoints have no attention biases")

    # -- rope: global (full attention) and local (sliding) layers --------------------------------
    def _rope_params(self) -> tuple[dict, dict]:
        """(global, local) RoPE parameters, from transformers 5's per-layer-type ``rope_parameters``
        or 4.x's ``rope_theta`` + ``rope_scaling`` (global) and ``rope_local_base_freq`` (local)."""
        raw = self.cfg.raw
        params = raw.get("rope_parameters") or {}
        if "full_attention" in params or "sliding_attention" in params:
            glob = dict(params.get("full_attention") or {})
            loc = dict(params.get("sliding_attention") or {})
        else:
            glob = {**(raw.get("rope_scaling") or {}), **params}
            loc = {}
        glob.setdefault("rope_theta", raw.get("rope_theta") if raw.get("rope_theta") is not None else 1e6)
        loc.setdefault("rope_theta", raw.get("rope_local_base_freq") if raw.get("rope_local_base_freq") is not None
                       else 1e4)
        for p in (glob, loc):
            p["rope_type"] = p.get("rope_type") or p.get("type") or "default"
        return glob, loc

    def rope_settings(self) -> dict:
        glob, loc = self._rope_params()
        if loc["rope_type"] != "default":
            raise UnsupportedConfig(f"sliding-layer rope_type={loc['rope_type']!r}: only unscaled RoPE is mapped "
                                    f"for Gemma 3's local layers")
        out = {"rotary_base": float(glob["rope_theta"]), "rotary_percent": 1.0}
        if glob["rope_type"] == "linear":
            # HF divides the inverse frequencies by the factor; megatron divides the positions
            out["seq_len_interpolation_factor"] = float(glob["factor"])
        elif glob["rope_type"] != "default":
            raise UnsupportedConfig(f"rope_type={glob['rope_type']!r} on the global layers: supported are "
                                    f"default and linear (megatron-core's seq_len_interpolation_factor)")
        return out

    def local_rotary_base(self) -> float:
        return float(self._rope_params()[1]["rope_theta"])

    def layer_windows(self) -> list:
        pattern = int(self.cfg.get("sliding_window_pattern", default=6))  # every pattern-th layer is global
        return windows_from_layer_types(self.cfg, self.num_layers, self.cfg.get("sliding_window", default=4096),
                                        lambda i: bool((i + 1) % pattern))

    def local_layers(self) -> list[int]:
        pattern = int(self.cfg.get("sliding_window_pattern", default=6))
        types = self.cfg.get("layer_types") or [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(self.num_layers)]
        return [i for i, t in enumerate(types) if t == "sliding_attention"]

    def model_settings(self) -> dict:
        s = super().model_settings()
        c = self.cfg
        s["config"].update(
            activation_func=gelu_tanh,
            softmax_scale=float(c.get("query_pre_attn_scalar", default=256)) ** -0.5,
        )
        s["config"]["layernorm_epsilon"] = float(c.get("rms_norm_eps", default=1e-6))
        s["model"].update(max_sequence_length=int(c.get("max_position_embeddings", default=131072)),
                          local_rotary_base=self.local_rotary_base(), local_rope_layers=tuple(self.local_layers()))
        return s

    # -- megatron modules ------------------------------------------------------------------------
    def layer_spec(self, config, vp_stage, pp_rank):
        from .gemma_modules import layer_block_spec

        return layer_block_spec(config, vp_stage, pp_rank)

    def megatron_model_class(self):
        from .gemma_modules import Gemma3GPT

        return Gemma3GPT

    # -- weights ---------------------------------------------------------------------------------
    def rules(self):
        p, H = self.hf_prefix, self.hf_layer_prefix
        c = self.settings_config()
        qkv = QKV(c["num_attention_heads"], c["num_query_groups"], c["kv_channels"])
        return [
            rule("embedding.word_embeddings.weight", p + "embed_tokens.weight", VOCAB),
            rule("decoder.final_layernorm.weight", p + "norm.weight", REPLICATED),
            rule("output_layer.weight", p + "embed_tokens.weight" if self.tied else "lm_head.weight",
                 VOCAB, export=not self.tied),
            rule(L + "input_layernorm.weight", H + "input_layernorm.weight", REPLICATED),
            rule(L + "self_attention.linear_qkv.weight", [H + f"self_attn.{x}_proj.weight" for x in "qkv"], qkv),
            rule(L + "self_attention.q_layernorm.weight", H + "self_attn.q_norm.weight", REPLICATED),
            rule(L + "self_attention.k_layernorm.weight", H + "self_attn.k_norm.weight", REPLICATED),
            rule(L + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight", ROW),
            rule(L + "self_attention.post_layernorm.weight", H + "post_attention_layernorm.weight", REPLICATED),
            rule(L + "pre_mlp_layernorm.weight", H + "pre_feedforward_layernorm.weight", REPLICATED),
            rule(L + "mlp.linear_fc1.weight", [H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"], GATED_MLP),
            rule(L + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight", ROW),
            rule(L + "mlp.post_layernorm.weight", H + "post_feedforward_layernorm.weight", REPLICATED),
        ]
