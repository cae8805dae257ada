"""Llama-like dense decoders: Llama 2/3.x and Mistral (and the base of the Qwen families)."""

from __future__ import annotations

import torch

from ..transforms import GATED_MLP, QKV, REPLICATED, ROW, VOCAB
from .base import Family, UnsupportedConfig, rule

# megatron's RotaryEmbedding hard-codes Llama 3.x scaling's shape; only the factor is a parameter.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}

L = "decoder.layers.{L}."


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
        if c.get("sliding_window") and c.get("use_sliding_window", default=True):
            raise UnsupportedConfig(
                f"sliding_window={c.get('sliding_window')}: megatron-core's local attention has no "
                f"sliding window, so sequences longer than the window would differ from HF")

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
        return {"config": config, "model": model}

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

