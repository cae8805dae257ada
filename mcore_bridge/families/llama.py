"""Llama-like dense decoders: Llama 2/3.x and Mistral (and the base of the Qwen families)."""

from __future__ import annotations

import torch

from ..transforms import GATED_MLP, QKV, REPLICATED, ROW, VOCAB
from .base import Family, UnsupportedConfig, rule

# megatron's RotaryEmbedding hard-codes Llama 3.x scaling's shape; only the factor is a parameter.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}

L = "decoder.layers.{L}."


def windows_from_layer_types(cfg, num_layers: int, window, default_sliding) -> list:
    """Per-layer windows from HF ``layer_types`` (or ``default_sliding(i)`` where the config has
    none); other layer types (chunked, linear attention...) are refused by name."""
    types = cfg.get("layer_types")
    if types is None:
        types = ["sliding_attention" if window is not None and default_sliding(i) else "full_attention"
                 for i in range(num_layers)]
    if len(types) != num_layers:
        raise UnsupportedConfig(f"layer_types has {len(types)} entries for num_hidden_layers={num_layers}")
    other = sorted({t for t in types if t not in ("sliding_attention", "full_attention")})
    if other:
        raise UnsupportedConfig(f"layer_types {other}: only 'full_attention' and 'sliding_attention' layers "
                                f"are mapped to megatron-core's attention")
    if window is None:
        return [None] * num_layers
    return [int(window) if t == "sliding_attention" else None for t in types]


def window_settings(windows: list, cfg=None) -> dict:
    """megatron-core config fields for per-layer windows.

    HF's ``sliding_window=w`` lets a token see the w latest tokens, itself included (measured:
    transformers 5, eager masks of Mistral/Qwen2/Gemma 3). megatron-core's ``window_size=(left,
    right)`` lets token i see keys i-left..i+right (``get_sliding_window_causal_mask``, local
    DotProductAttention, 0.16.1 and 0.19.2), so HF's w is ``(w - 1, 0)``. Interleaved full layers
    are ``window_attn_skip_freq``: a per-layer list, 1 where the layer slides."""
    sizes = sorted({w for w in windows if w is not None})
    if not sizes:
        return {}
    if len(sizes) > 1:
        raise UnsupportedConfig(f"sliding windows of several sizes {sizes} across layers: megatron-core has "
                                f"one window_size for the whole model")
    if sizes[0] < 1:
        raise UnsupportedConfig(f"sliding_window={sizes[0]}: a window must hold at least the token itself")
    out = {"window_size": (sizes[0] - 1, 0)}
    if any(w is None for w in windows):
        out["window_attn_skip_freq"] = [0 if w is None else 1 for w in windows]
    return out


class Llama(Family):
    model_types = ("llama", "mistral")
    name = "llama"

    # -- config ------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        c = self.cfg
        return int(c.get("head_dim", default=c.require("hidden_size") // c.require("num_attention_heads")))

    @property
    def qkv_bias(self) -> bool:
        return False

    @property
    def qk_norm(self) -> bool:
        return False

    def check_unsupported(self):
        c = self.cfg
        if c.get("hidden_act", default="silu") != "silu":
            raise UnsupportedConfig(f"hidden_act={c.get('hidden_act')!r}: only 'silu' (SwiGLU) is mapped")
        if c.get("attention_bias", default=False) or c.get("mlp_bias", default=False):
            raise UnsupportedConfig("attention_bias/mlp_bias=true: megatron's add_bias_linear would "
                                    "also add biases the checkpoint does not have")

    def rope_settings(self) -> dict:
        rope = self.cfg.rope
        kind = rope.get("rope_type", "default")
        out = {"rotary_base": float(rope.get("rope_theta", 10000.0)),
               "rotary_percent": float(rope.get("partial_rotary_factor", 1.0))}
        if kind == "default":
            return out
        if kind == "llama3":
            for key, expected in MEGATRON_LLAMA3_ROPE.items():
                if float(rope.get(key, expected)) != expected:
                    raise UnsupportedConfig(
                        f"rope llama3 {key}={rope.get(key)}: megatron-core fixes it at {expected}; "
                        f"the converted model would compute different rotary frequencies")
            return {**out, "rope_scaling": True, "rope_scaling_factor": float(rope["factor"])}
        raise UnsupportedConfig(f"rope_type={kind!r} is not supported by megatron-core's GPT rotary "
                                f"embedding (supported: default, llama3)")

    def model_settings(self) -> dict:
        self.check_unsupported()
        c = self.cfg
        config = dict(
            num_layers=self.num_layers,
            hidden_size=int(c.require("hidden_size")),
            num_attention_heads=int(c.require("num_attention_heads")),
            num_query_groups=int(c.get("num_key_value_heads", default=c.require("num_attention_heads"))),
            ffn_hidden_size=int(c.require("intermediate_size")),
            kv_channels=self.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=float(c.get("rms_norm_eps", default=1e-6)),
            gated_linear_unit=True,
            activation_func=torch.nn.functional.silu,
            add_bias_linear=False,
            add_qkv_bias=self.qkv_bias,
            qk_layernorm=self.qk_norm,
        )
        model = dict(
            vocab_size=int(c.require("vocab_size")),
            max_sequence_length=int(c.get("max_position_embeddings", default=4096)),
            position_embedding_type="rope",
            share_embeddings_and_output_weights=self.tied,
            **self.rope_settings(),
        )
        config.update(window_settings(self.layer_windows(), self.cfg))
        return {"config": config, "model": model}

    # -- sliding windows -----------------------------------------------------------------------
    def sliding_window(self):
        """HF's window (a token sees the ``sliding_window`` latest tokens, itself included), or None.
        transformers' Llama has no window: a ``sliding_window`` in a ``llama`` config is ignored there."""
        return None if self.cfg.get("model_type") == "llama" else self.cfg.get("sliding_window")

    def layer_windows(self) -> list:
        """Each layer's window (None: full attention). HF's ``layer_types`` where the config lists
        them, else every layer slides (Mistral, Mixtral)."""
        return windows_from_layer_types(self.cfg, self.num_layers, self.sliding_window(),
                                        lambda i: True)

    # -- weights -----------------------------------------------------------------------------
    def rules(self):
        """Embeddings, final norm and output, then per layer: its norms, ``attention_rules`` and
        ``mlp_rules`` (the two hooks subclasses override)."""
        p, H = self.hf_prefix, self.hf_layer_prefix
        rows = [
            rule("embedding.word_embeddings.weight", p + "embed_tokens.weight", VOCAB),
            rule("decoder.final_layernorm.weight", p + "norm.weight", REPLICATED),
            # Tied: the last pipeline stage keeps its own copy of the embedding as output layer.
            rule("output_layer.weight", p + "embed_tokens.weight" if self.tied else "lm_head.weight",
                 VOCAB, export=not self.tied),
            rule(L + "input_layernorm.weight", H + "input_layernorm.weight", REPLICATED),
        ]
        rows += self.attention_rules()
        rows.append(rule(L + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight", REPLICATED))
        rows += self.mlp_rules()
        return rows

    def mlp_rules(self):
        H = self.hf_layer_prefix
        return [
            rule(L + "mlp.linear_fc1.weight", [H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"], GATED_MLP),
            rule(L + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight", ROW),
        ]

    def attention_rules(self):
        H = self.hf_layer_prefix
        c = self.settings_config()
        qkv = QKV(c["num_attention_heads"], c["num_query_groups"], c["kv_channels"])
        qkv_names = [H + f"self_attn.{p}_proj.weight" for p in "qkv"]
        rows = [
            rule(L + "self_attention.linear_qkv.weight", qkv_names, qkv),
            rule(L + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight", ROW),
        ]
        if self.qkv_bias:
            rows.append(rule(L + "self_attention.linear_qkv.bias",
                             [H + f"self_attn.{p}_proj.bias" for p in "qkv"], qkv))
        if self.qk_norm:
            rows += [rule(L + "self_attention.q_layernorm.weight", H + "self_attn.q_norm.weight", REPLICATED),
                     rule(L + "self_attention.k_layernorm.weight", H + "self_attn.k_norm.weight", REPLICATED)]
        return rows

    def settings_config(self):
        return self.architecture.config

