"""gpt-oss (``gpt_oss``): openai/gpt-oss-20b and -120b.

What it adds to a Llama-shaped MoE decoder, and the megatron-core setting each maps to:

- attention sinks (``self_attn.sinks`` [heads]): ``softmax_type="learnable"``, whose
  ``core_attention.softmax_offset`` is one extra logit per head in the softmax, dropped after it;
- sliding-window layers (``layer_types``, ``sliding_window`` W): ``window_size=(W - 1, 0)`` (a
  query sees itself and the W - 1 keys before it, as HF's mask) on the layers that
  ``window_attn_skip_freq`` (a per-layer list) marks;
- yarn RoPE with HF's ``truncate`` flag: ``position_embedding_type="yarn"`` and the ``yarn_*``
  fields (``gpt_oss_megatron.YarnTransformerConfig`` declares them);
- clamped SwiGLU ``(clamp(up, -l, l) + 1) * g * sigmoid(1.702 g)``, ``g = clamp(gate, max=l)``:
  megatron's GLU with ``activation_func=quick_gelu`` (x * sigmoid(1.702 x)),
  ``activation_func_clamp_value=l`` and ``glu_linear_offset=1``;
- biases on q/k/v/o, router and experts: ``add_bias_linear`` / ``add_qkv_bias`` (megatron's router
  then has a real linear bias, ``router.bias``);
- router: softmax over the top-k logits (``moe_router_pre_softmax=False``);
- experts stacked ``gate_up_proj`` [E, H, 2F] with gate/up interleaved along 2F (gate at even
  positions), ``down_proj`` [E, F, H], and their biases stacked [E, 2F] / [E, H]: viewed per expert
  through ``stacked`` (``stacked_gate_up = INTERLEAVED``, ``stacked_bias_hf``).
"""

from __future__ import annotations

import math

from ..stacked import INTERLEAVED
from ..transforms import COLUMN, GATED_MLP, REPLICATED
from .base import Layers, UnsupportedConfig, rule
from .llama import Llama
from .moe import EXPERT, MoEMixin

L = "decoder.layers.{L}."
QUICK_GELU_ALPHA = 1.702  # megatron's quick_gelu: x * sigmoid(1.702 x)
LAYER_TYPES = ("sliding_attention", "full_attention")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class GptOss(MoEMixin, Llama):
    model_types = ("gpt_oss",)
    name = "gpt_oss"
    router_hf = "mlp.router.weight"
    router_linear_bias_hf = "mlp.router.bias"
    # per-expert names of the views over the stacked tensors (the checkpoint has only the stacks)
    expert_hf = ("mlp.experts.{E}.gate_proj.weight", "mlp.experts.{E}.up_proj.weight",
                 "mlp.experts.{E}.down_proj.weight")
    expert_bias_hf = ("mlp.experts.{E}.gate_proj.bias", "mlp.experts.{E}.up_proj.bias",
                      "mlp.experts.{E}.down_proj.bias")
    stacked_hf = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    stacked_bias_hf = ("mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj_bias")
    stacked_gate_up = INTERLEAVED
    per_expert_storage = False  # transformers' GptOssExperts has only the stacked parameters

    # -- config ------------------------------------------------------------------------------
    @property
    def qkv_bias(self) -> bool:
        return True

    @property
    def expert_ffn(self) -> int:
        return int(self.cfg.require("intermediate_size"))

    @property
    def norm_topk_prob(self) -> bool:
        return True  # softmax over the top-k router logits

    def is_moe_layer(self, layer: int) -> bool:
        return True

    @property
    def layer_types(self) -> list[str]:
        """HF's per-layer attention kinds (transformers' default when the config has none)."""
        n = self.num_layers
        kinds = self.cfg.get("layer_types")
        if kinds is None:
            kinds = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
        kinds = list(kinds)
        if len(kinds) != n:
            raise UnsupportedConfig(f"layer_types has {len(kinds)} entries for num_hidden_layers={n}")
        for i, k in enumerate(kinds):
            if k not in LAYER_TYPES:
                raise UnsupportedConfig(f"layer_types[{i}]={k!r}: gpt-oss layers are one of {LAYER_TYPES}")
        return kinds

    def check_unsupported(self):
        c = self.cfg
        if not c.get("attention_bias", default=True):
            raise UnsupportedConfig("attention_bias=false: megatron's add_bias_linear, which gives the "
                                    "experts and the router their biases, would add an o_proj bias too")
        alpha = float(c.get("swiglu_alpha", default=QUICK_GELU_ALPHA))
        if alpha != QUICK_GELU_ALPHA:
            raise UnsupportedConfig(
                f"swiglu_alpha={alpha}: megatron's clamped GLU uses quick_gelu, x * sigmoid(1.702 x); "
                f"another alpha would compute a different activation")
        if c.get("swiglu_limit") is None:
            raise UnsupportedConfig("config.json has no 'swiglu_limit' (the clamp of the experts' SwiGLU)")
        kinds = self.layer_types
        if "sliding_attention" in kinds and not c.get("sliding_window"):
            raise UnsupportedConfig("layer_types has sliding_attention layers but sliding_window is unset")

    def window_settings(self) -> dict:
        kinds = self.layer_types
        if "sliding_attention" not in kinds:
            return {}
        w = int(self.cfg.require("sliding_window"))
        if w < 1:
            raise UnsupportedConfig(f"sliding_window={w}: must be at least 1")
        # megatron: key j is visible from query i when i - window_size[0] <= j <= i + window_size[1]
        return dict(window_size=(w - 1, 0),
                    window_attn_skip_freq=[1 if k == "sliding_attention" else 0 for k in kinds])

    def rope_settings(self) -> dict:
        rope = self.cfg.rope
        if rope.get("rope_type", "default") != "yarn":
            return super().rope_settings()
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise UnsupportedConfig(f"partial_rotary_factor={rope['partial_rotary_factor']} with yarn: "
                                    f"megatron's YarnRotaryEmbedding rotates the whole head")
        factor = rope.get("factor")
        if factor is None:
            raise UnsupportedConfig("rope yarn without 'factor': megatron's yarn needs the scaling factor")
        factor = float(factor)
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
        both = bool(mscale) and bool(mscale_all)  # HF uses them only when both are non-zero
        expected = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if both else _yarn_mscale(factor)
        given = rope.get("attention_factor")
        if given is not None and float(given) != expected:
            raise UnsupportedConfig(
                f"rope yarn attention_factor={given}: megatron derives it from factor/mscale "
                f"({expected}); an explicit other value cannot be expressed")
        return dict(rotary_base=float(rope.get("rope_theta", 10000.0)), rotary_percent=1.0)

    def yarn_config(self) -> dict:
        rope = self.cfg.rope
        if rope.get("rope_type", "default") != "yarn":
            return {}
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
        both = bool(mscale) and bool(mscale_all)
        return dict(
            yarn_rotary_scaling_factor=float(rope["factor"]),
            yarn_original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 4096)),
            yarn_beta_fast=float(rope.get("beta_fast") or 32.0),  # HF: `or 32`, `or 1`
            yarn_beta_slow=float(rope.get("beta_slow") or 1.0),
            yarn_mscale=float(mscale) if both else None,
            yarn_mscale_all_dim=float(mscale_all) if both else None,
            yarn_correction_range_round_to_int=bool(rope.get("truncate", True)),
        )

    def model_settings(self) -> dict:
        from megatron.core.activations import quick_gelu

        settings = super().model_settings()
        if self.cfg.rope.get("rope_type", "default") == "yarn":
            settings["model"]["position_embedding_type"] = "yarn"
        settings["config"].update(
            add_bias_linear=True,
            add_qkv_bias=True,
            softmax_type="learnable",
            activation_func=quick_gelu,
            glu_linear_offset=1.0,
            activation_func_clamp_value=float(self.cfg.require("swiglu_limit")),
            layernorm_epsilon=float(self.cfg.get("rms_norm_eps", default=1e-5)),
            **self.window_settings(),
            **self.yarn_config(),
        )
        return settings

    def megatron_config_class(self) -> type:
        from .gpt_oss_megatron import YarnTransformerConfig

        return YarnTransformerConfig

    def check_layout(self, layout) -> None:
        """Expert biases: megatron-core (0.16.1 and 0.19.2) asserts expert-TP 1 for them."""
        from ..layout import LayoutError

        if layout.etp != 1:
            raise LayoutError(
                f"{self.name}: the experts have biases, which megatron-core supports only at expert-tensor-"
                f"parallel size 1 (its TransformerConfig asserts 'Bias in Moe is only supported when "
                f"ETP==1'); this layout has etp={layout.etp}" + (" (etp defaults to tp)" if layout.etp == layout.tp
                                                                 else "") + ": use --etp 1")

    # -- weights -----------------------------------------------------------------------------
    def attention_rules(self):
        H = self.hf_layer_prefix
        return super().attention_rules() + [
            rule(L + "self_attention.linear_proj.bias", H + "self_attn.o_proj.bias", REPLICATED),
            # one sink per head: split over tp with the heads
            rule(L + "self_attention.core_attention.softmax_offset", H + "self_attn.sinks", COLUMN),
        ]

    def mlp_rules(self):
        H, moe_ = self.hf_layer_prefix, Layers.MOE
        rows = super().mlp_rules()  # (its dense-layer rules never apply: every layer is MoE)
        gate, up, down = (H + n for n in self.expert_bias_hf)
        return rows + [
            rule(L + "mlp.router.bias", H + self.router_linear_bias_hf, REPLICATED, when=moe_),
            rule(EXPERT + "linear_fc1.bias", [gate, up], GATED_MLP, when=moe_),
            rule(EXPERT + "linear_fc2.bias", down, REPLICATED, when=moe_),
        ]

