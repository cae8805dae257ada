"""Qwen3.5 (``qwen3_5``) and Qwen3.5-MoE (``qwen3_5_moe``): natively vision-language hybrid models.

The language model interleaves gated delta-net layers (``layer_types`` ``linear_attention``,
megatron-core's ``GatedDeltaNet``) with gated full-attention layers (``full_attention``: an output
gate read from the second half of each head's ``q_proj`` rows, megatron's
``attention_output_gate``), every RMSNorm but the delta-net's gated output norm stored as an offset
from 1 (``(1 + w)``), partial rotary (default 0.25) with interleaved multimodal RoPE as Qwen3-VL.
The MoE variant has stacked routed experts (``mlp.experts.gate_up_proj [E, 2F, H]``, gate rows
first), always renormalised top-k, and a shared expert with a sigmoid gate, on every layer.

The vision tower is Qwen3-VL's without deepstack (``Qwen3_5VisionModel`` drops
``deepstack_merger_list``; ``vision_config`` has no ``deepstack_visual_indexes``): the merger's
output replaces the image/video token embeddings, nothing enters later language layers, so no
layer has to share the first pipeline stage with it. Same HF prefixes as Qwen3-VL under transformers 5
(``model.language_model.*``, ``model.visual.*``, ``lm_head``).

Weights (HF -> megatron), per layer kind (``layer_kind``):
  full_attention: ``q_proj`` [q_h; gate_h] + ``k_proj`` + ``v_proj`` -> ``linear_qkv`` [q, gate, k, v]
    per query group (``GatedQKV``); ``q_norm``/``k_norm``/``o_proj`` as Qwen3;
  linear_attention: ``in_proj_qkv`` [q; k; v] + ``in_proj_z`` + ``in_proj_b`` + ``in_proj_a`` ->
    ``in_proj`` [q_r; k_r; v_r; z_r; b_r; a_r] (``ColumnBlocks``); ``conv1d`` [q; k; v] channels
    likewise; ``A_log``, ``dt_bias`` split by value head; ``norm`` -> ``out_norm``; ``out_proj`` (row).

What is missing here (refused at build, naming it): a megatron-core ``GatedDeltaNet`` that runs
without the ``fla`` Triton kernels (the CPU delta-rule adaptation is issue 19 item 1, Qwen3-Next);
the multi-token-prediction head (``mtp.*`` tensors, which transformers ignores as well).
"""

from __future__ import annotations

import dataclasses

from ..transforms import COLUMN, REPLICATED, ROW, ColumnBlocks, GatedQKV
from .base import Layers, UnsupportedConfig, rule
from .moe import MoEMixin
from .qwen import Qwen3
from .qwen_vl import VisionLanguageMixin

L = "decoder.layers.{L}."
A = L + "self_attention."
LINEAR, FULL = "linear_attention", "full_attention"


class Qwen35Mixin(VisionLanguageMixin):
    """What Qwen3.5 adds to the Qwen3 vision-language model; the MoE variant shares it."""

    mrope_interleaved = True  # Qwen3_5TextRotaryEmbedding is Qwen3-VL's (t/h/w interleaved)

    # -- config ------------------------------------------------------------------------------
    @property
    def layer_types(self) -> list[str]:
        """HF's ``layer_types``, or transformers' default from ``full_attention_interval`` (4)."""
        n = self.num_layers
        types = self.cfg.get("layer_types")
        if types is None:
            every = int(self.cfg.get("full_attention_interval", default=4))
            types = [LINEAR if (i + 1) % every else FULL for i in range(n)]
        if len(types) != n:
            raise UnsupportedConfig(f"layer_types has {len(types)} entries for num_hidden_layers={n}")
        other = sorted({t for t in types if t not in (LINEAR, FULL)})
        if other:
            raise UnsupportedConfig(f"layer_types {other}: Qwen3.5 layers are '{LINEAR}' (gated delta-net) "
                                    f"or '{FULL}' (gated attention)")
        return list(types)

    def layer_kind(self, layer: int) -> Layers:
        """The attention kind: Qwen3.5's MLP is the same on every layer (dense, or MoE on all)."""
        return Layers(self.layer_types[layer])

    def layer_windows(self) -> list:
        return [None] * self.num_layers  # no sliding windows (layer_types are attention kinds here)

    @property
    def partial_rotary(self) -> float:
        # transformers' Qwen3_5TextConfig defaults it to 0.25 (not 1.0) where the config is silent
        return float(self.cfg.rope.get("partial_rotary_factor", self.cfg.get("partial_rotary_factor", default=0.25)))

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

    def delta_net_settings(self) -> dict:
        c, types = self.cfg, self.layer_types
        if LINEAR not in types:
            return {}
        settings = dict(experimental_attention_variant="gated_delta_net",
                        linear_attention_freq=[1 if t == LINEAR else 0 for t in types],
                        linear_conv_kernel_dim=int(c.get("linear_conv_kernel_dim", default=4)),
                        linear_key_head_dim=int(c.get("linear_key_head_dim", default=128)),
                        linear_value_head_dim=int(c.get("linear_value_head_dim", default=128)),
                        linear_num_key_heads=int(c.get("linear_num_key_heads", default=16)),
                        linear_num_value_heads=int(c.get("linear_num_value_heads", default=32)))
        if settings["linear_num_value_heads"] % settings["linear_num_key_heads"]:
            raise UnsupportedConfig(f"linear_num_value_heads={settings['linear_num_value_heads']} is not a multiple "
                                    f"of linear_num_key_heads={settings['linear_num_key_heads']}")
        return settings

    def model_settings(self) -> dict:
        settings = super().model_settings()
        settings["config"].update(attention_output_gate=True, **self.delta_net_settings())
        return settings

    # -- megatron model ------------------------------------------------------------------------
    def megatron_config_class(self) -> type:
        """Called when the model is built: refuse linear-attention layers while megatron-core's
        ``GatedDeltaNet`` cannot run here."""
        linear = [i for i, t in enumerate(self.layer_types) if t == LINEAR]
        if linear:
            raise UnsupportedConfig(
                f"layer_types '{LINEAR}' (layers {linear}): megatron-core's GatedDeltaNet needs the fla "
                f"Triton kernels (flash-linear-attention, GPU) and this bridge has no CPU delta-rule "
                f"adaptation for it yet (issue 19 item 1, Qwen3-Next): only Qwen3.5 configs whose layers are "
                f"all '{FULL}' can be built")
        return super().megatron_config_class()

    decoder_block_spec = True  # layer_spec returns a block spec (per-layer specs, (1 + w) final norm)

    # -- weights -----------------------------------------------------------------------------
    def check_tensors(self, names) -> None:
        mtp = sorted(n for n in names if n.startswith("mtp."))
        if mtp:
            raise UnsupportedConfig(f"{len(mtp)} multi-token-prediction tensors ({mtp[0]}, ...; "
                                    f"mtp_num_hidden_layers={self.cfg.get('mtp_num_hidden_layers')}): Qwen3.5's "
                                    f"MTP head is not mapped (transformers ignores it too); drop the mtp.* tensors "
                                    f"to convert the main model")

    def attention_rules(self):
        H = self.hf_layer_prefix
        c = self.settings_config()
        S, LA = H + "self_attn.", H + "linear_attn."
        qkv = GatedQKV(c["num_attention_heads"], c["num_query_groups"], c["kv_channels"])
        full = [
            rule(A + "linear_qkv.weight", [S + f"{p}_proj.weight" for p in "qkv"], qkv, when=FULL),
            rule(A + "linear_proj.weight", S + "o_proj.weight", ROW, when=FULL),
            rule(A + "q_layernorm.weight", S + "q_norm.weight", REPLICATED, when=FULL),
            rule(A + "k_layernorm.weight", S + "k_norm.weight", REPLICATED, when=FULL),
        ]
        if LINEAR not in self.layer_types:
            return full
        qk = c["linear_key_head_dim"] * c["linear_num_key_heads"]
        v = c["linear_value_head_dim"] * c["linear_num_value_heads"]
        nv = c["linear_num_value_heads"]
        return full + [
            rule(A + "in_proj.weight", [LA + f"in_proj_{p}.weight" for p in ("qkv", "z", "b", "a")],
                 ColumnBlocks(((qk, qk, v), (v,), (nv,), (nv,))), when=LINEAR),
            rule(A + "conv1d.weight", LA + "conv1d.weight", ColumnBlocks(((qk, qk, v),)), when=LINEAR),
            rule(A + "A_log", LA + "A_log", COLUMN, when=LINEAR),
            rule(A + "dt_bias", LA + "dt_bias", COLUMN, when=LINEAR),
            rule(A + "out_norm.weight", LA + "norm.weight", REPLICATED, when=LINEAR),
            rule(A + "out_proj.weight", LA + "out_proj.weight", ROW, when=LINEAR),
        ]


class Qwen35(Qwen35Mixin, Qwen3):
    model_types = ("qwen3_5",)
    name = "qwen3_5"
    vision_class = "qwen3_5.modeling_qwen3_5.Qwen3_5VisionModel"
    model_class = "qwen3_5.modeling_qwen3_5.Qwen3_5Model"

    def layer_spec(self, config, vp_stage, pp_rank):
        from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

        from .qwen3_5_modules import offset_norm_spec

        layer = Qwen3.layer_spec(self, config, vp_stage, pp_rank)
        n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
        return offset_norm_spec(TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=None))


class Qwen35MoE(Qwen35Mixin, MoEMixin, Qwen3):
    """Every layer is sparse (the config has no ``decoder_sparse_step`` / ``mlp_only_layers``)."""

    model_types = ("qwen3_5_moe",)
    name = "qwen3_5_moe"
    vision_class = "qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeVisionModel"
    model_class = "qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeModel"
    shared_expert = True

    @property
    def norm_topk_prob(self) -> bool:
        return True  # Qwen3_5MoeTopKRouter always renormalises its top-k softmax weights

    def is_moe_layer(self, layer: int) -> bool:
        return True

    def layer_spec(self, config, vp_stage, pp_rank):
        from .qwen3_5_modules import offset_norm_spec

        return offset_norm_spec(MoEMixin.layer_spec(self, config, vp_stage, pp_rank))

    def mlp_rules(self):
        """MoEMixin's MoE rules on every layer (the layer kind here is the attention kind, never
        ``dense``: the parent's dense-MLP rules stay declared and never apply)."""
        return [dataclasses.replace(r, when=Layers.ALL) if r.when == Layers.MOE else r for r in super().mlp_rules()]
