"""Hybrid decoders with gated delta-net linear attention (Qwen3-Next; Qwen3.5 builds on it).

Reusable pieces, each independent of one family:

* ``linear_layers(cfg, n)``: which layers are linear attention, from HF ``layer_types`` or
  ``full_attention_interval`` (every interval-th layer is full attention);
* ``gdn_settings(cfg, linear)``: megatron-core's config fields for the delta-net
  (``experimental_attention_variant="gated_delta_net"``, ``linear_attention_freq`` as a per-layer
  list, 1 = linear, and the ``linear_*`` head sizes);
* ``gdn_rules(H, c)`` / ``gated_attention_rules(H, c)``: the weight rules of the two token mixers
  (``Rule.mixer`` "linear" / "attention", so each applies only to its layers);
* ``hybrid_block_spec(...)``: megatron's decoder block spec with the delta-net in the linear layers.
  megatron's own hybrid spec (``experimental_attention_variant_module_specs``) asserts
  TransformerEngine, so the local spec is assembled here from the same modules;
* the CPU path of the delta-net (``fla`` Triton kernels -> plain torch) is a scoped adaptation in
  ``runtime/compat.py`` (``_gated_delta_net_on_cpu``).

Layouts, measured against megatron-core 0.16.1 and 0.19.2 (``GatedDeltaNet``) and transformers 5
(``Qwen3NextGatedDeltaNet``):

* megatron's ``in_proj`` (column-parallel) holds per TP rank ``[q; k; v; z; beta; alpha]`` of the
  rank's heads (its ``sharded_state_dict`` splits it so); HF's ``in_proj_qkvz`` groups rows per key
  head ``[q_h, k_h, v_h (ratio heads), z_h (ratio heads)]`` and ``in_proj_ba`` per key head
  ``[b (ratio), a (ratio)]``, ratio = value heads / key heads: ``GroupedRows`` over the key heads;
* ``conv1d.weight`` [q; k; v channels, 1, kernel]: HF stores it over all heads ``[q_all; k_all; v_all]``,
  megatron per rank ``[q_r; k_r; v_r]``: ``FusedBlocks``;
* ``A_log``, ``dt_bias`` [value heads]: split by heads; ``out_proj``: row-parallel; ``out_norm``
  (HF ``norm``, an RMSNorm with a plain weight, gated by silu(z)): replicated;
* gated attention (``attention_output_gate``): megatron's ``linear_qkv`` holds per query group
  ``[queries; gates; k; v]``, HF's ``q_proj`` per head ``[query_h; gate_h]``: ``GroupedRows`` over
  the query groups, per group.

Padding: megatron-core's ``GatedDeltaNet`` ignores ``attention_mask`` (0.16.1 and 0.19.2; only
packed THD ``cu_seqlens`` separate samples, on 0.19.2, and 0.16.1 refuses those), transformers'
delta-net zeroes padded positions first (``apply_mask_to_padding_states``): a left-padded batch
differs on its real tokens, right padding does not (tests/test_gdn_padding.py). verify runs every
sample alone, unpadded and unmasked on both sides.
"""

from __future__ import annotations

from ..transforms import COLUMN, REPLICATED, ROW, FusedBlocks, GroupedRows
from .base import UnsupportedConfig, rule

L = "decoder.layers.{L}."
LINEAR, ATTENTION = "linear", "attention"


def linear_layers(cfg, num_layers: int) -> list[bool]:
    """True for each linear-attention layer: HF ``layer_types`` where listed, else every
    ``full_attention_interval``-th layer (1-based) is full attention (transformers' Qwen3NextConfig)."""
    types = cfg.get("layer_types")
    if types is None:
        interval = int(cfg.get("full_attention_interval", default=4))
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)]
    if len(types) != num_layers:
        raise UnsupportedConfig(f"layer_types has {len(types)} entries for num_hidden_layers={num_layers}")
    other = sorted({t for t in types if t not in ("linear_attention", "full_attention")})
    if other:
        raise UnsupportedConfig(f"layer_types {other}: only 'linear_attention' (gated delta-net) and "
                                f"'full_attention' layers are mapped")
    return [t == "linear_attention" for t in types]


def gdn_settings(cfg, linear: list[bool]) -> dict:
    """megatron-core config fields of the delta-net layers."""
    kh, vh = int(cfg.require("linear_num_key_heads")), int(cfg.require("linear_num_value_heads"))
    if vh % kh:
        raise UnsupportedConfig(f"linear_num_value_heads={vh} is not a multiple of linear_num_key_heads={kh}")
    if cfg.get("hidden_act", default="silu") != "silu":
        raise UnsupportedConfig(f"hidden_act={cfg.get('hidden_act')!r}: megatron's delta-net uses the model's "
                                f"activation (silu) for its conv and output gate; only 'silu' is mapped")
    return dict(
        experimental_attention_variant="gated_delta_net",
        linear_attention_freq=[1 if x else 0 for x in linear],
        linear_conv_kernel_dim=int(cfg.get("linear_conv_kernel_dim", default=4)),
        linear_key_head_dim=int(cfg.require("linear_key_head_dim")),
        linear_value_head_dim=int(cfg.require("linear_value_head_dim")),
        linear_num_key_heads=kh,
        linear_num_value_heads=vh,
    )


def in_proj_transform(c) -> GroupedRows:
    """HF ``in_proj_qkvz`` + ``in_proj_ba`` -> megatron ``in_proj`` (see the module docstring)."""
    kh, vh = c["linear_num_key_heads"], c["linear_num_value_heads"]
    dk, dv, ratio = c["linear_key_head_dim"], c["linear_value_head_dim"], vh // kh
    return GroupedRows(groups=kh, sections=((dk, dk, ratio * dv, ratio * dv), (ratio, ratio)),
                       order=((0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)), per_group=False)


def conv_transform(c) -> FusedBlocks:
    qk = c["linear_num_key_heads"] * c["linear_key_head_dim"]
    return FusedBlocks(((qk, qk, c["linear_num_value_heads"] * c["linear_value_head_dim"]),))


def gated_qkv_transform(c) -> GroupedRows:
    """HF ``q_proj`` (per head [query; gate]) + ``k_proj`` + ``v_proj`` -> megatron's gated ``linear_qkv``."""
    d, groups = c["kv_channels"], c["num_query_groups"]
    qg = c["num_attention_heads"] // groups
    order = tuple((0, 2 * h) for h in range(qg)) + tuple((0, 2 * h + 1) for h in range(qg)) + ((1, 0), (2, 0))
    return GroupedRows(groups=groups, sections=((d,) * (2 * qg), (d,), (d,)), order=order, per_group=True)


def gdn_rules(H: str, c) -> list:
    """Rules of a delta-net layer: megatron ``self_attention.*`` <- HF ``{H}linear_attn.*``."""
    A, G = L + "self_attention.", H + "linear_attn."
    return [
        rule(A + "in_proj.weight", [G + "in_proj_qkvz.weight", G + "in_proj_ba.weight"], in_proj_transform(c),
             mixer=LINEAR),
        rule(A + "conv1d.weight", G + "conv1d.weight", conv_transform(c), mixer=LINEAR),
        rule(A + "A_log", G + "A_log", COLUMN, mixer=LINEAR),
        rule(A + "dt_bias", G + "dt_bias", COLUMN, mixer=LINEAR),
        rule(A + "out_norm.weight", G + "norm.weight", REPLICATED, mixer=LINEAR),
        rule(A + "out_proj.weight", G + "out_proj.weight", ROW, mixer=LINEAR),
    ]


def gated_attention_rules(H: str, c) -> list:
    """Rules of a gated full-attention layer with q/k norms."""
    A, S = L + "self_attention.", H + "self_attn."
    return [
        rule(A + "linear_qkv.weight", [S + f"{p}_proj.weight" for p in "qkv"], gated_qkv_transform(c),
             mixer=ATTENTION),
        rule(A + "linear_proj.weight", S + "o_proj.weight", ROW, mixer=ATTENTION),
        rule(A + "q_layernorm.weight", S + "q_norm.weight", REPLICATED, mixer=ATTENTION),
        rule(A + "k_layernorm.weight", S + "k_norm.weight", REPLICATED, mixer=ATTENTION),
    ]


class DeltaNetRuntime:
    """Family mixin: at float32 the delta-net runs megatron's own plain-torch path. megatron-core
    (0.16.1 and 0.19.2) runs fla's Triton ``chunk_gated_delta_rule`` and ``causal_conv1d`` whenever
    fla is importable, and Triton's ``tl.dot`` on float32 operands computes in TF32: on an H200 the
    kernel is 1.45e-3 (relative) from the fp32 torch rule at Qwen3-Next's shapes
    (reports/gpu-h200/published-session29.md), beyond fp32 verification. ``deterministic_mode`` is
    megatron's own switch to its torch chunked rule and ``F.conv1d`` (it also reads the embedding by
    indexing instead of ``F.embedding``: same values); verify's fp32 reference runs transformers' torch
    rule likewise (``verify.forward.reference_torch_paths``). bf16 / fp16 models keep the kernel path,
    and so do packed (THD) sequences at any dtype: megatron's torch rule takes no ``cu_seqlens``."""

    def runtime_config(self, dtype, packed: bool = False) -> dict:
        import torch

        return {"deterministic_mode": True} if dtype == torch.float32 and not packed else {}

    def check_packing(self, dtype) -> None:
        """megatron's ``GatedDeltaNet`` takes packed (THD) sequences only through fla's kernels, with
        ``cu_seqlens``: 0.16.1 raises ``NotImplementedError`` for any ``packed_seq_params``; 0.19.2
        needs fla (and not ``deterministic_mode``: ``runtime_config`` keeps the kernel path when
        packed, at fp32 too)."""
        from megatron.core.ssm import gated_delta_net as gdn_module

        if not hasattr(gdn_module.GatedDeltaNet, "_resolve_cu_seqlens"):  # the THD path of newer megatron-core
            raise UnsupportedConfig(
                f"--packing: this megatron-core's GatedDeltaNet does not take packed sequences (its forward "
                f"raises 'GDN does not support packed sequence'); {self.name}'s linear-attention layers need "
                f"megatron-core 0.19+ with fla, or train without --packing")
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: F401
        except ImportError:
            raise UnsupportedConfig(
                f"--packing: {self.name}'s delta-net keeps packed sequences apart only with fla's kernels "
                f"(flash-linear-attention, GPU), which are not importable here; train without --packing")


def check_layout(c, layout) -> None:
    """Layouts megatron's delta-net cannot run: CP (0.16.1: not implemented; 0.19.2 has its own
    all-to-alls, not exercised here), TP beyond the linear heads."""
    if getattr(layout, "cp", 1) > 1:
        raise UnsupportedConfig(f"cp={layout.cp}: context parallelism of the gated delta-net layers is not "
                                f"supported (megatron-core 0.16.1 GatedDeltaNet: 'TODO: support CP'); use cp=1")
    for field in ("linear_num_key_heads", "linear_num_value_heads"):
        if c[field] % layout.tp:
            raise UnsupportedConfig(f"tp={layout.tp} does not divide {field}={c[field]}: megatron's delta-net "
                                    f"splits its heads over tensor parallelism")


def gdn_module_spec():
    """The delta-net with the local (no TransformerEngine) modules: column-parallel ``in_proj``,
    torch RMSNorm ``out_norm`` (a plain weight, as HF's gated norm), row-parallel ``out_proj``."""
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return ModuleSpec(module=GatedDeltaNet, submodules=GatedDeltaNetSubmodules(
        in_proj=ColumnParallelLinear, out_norm=WrappedTorchNorm, out_proj=RowParallelLinear))


def hybrid_block_spec(config, vp_stage, pp_rank, linear: list[bool], norm=None, qk_norm=None):
    """megatron's local decoder block spec (dense / MoE layers from ``moe_layer_freq``) with the
    delta-net as the token mixer of the ``linear`` layers; ``norm`` replaces the layer and final norms,
    ``qk_norm`` the attention's q/k norms (``(1 + w)`` norms for Qwen3-Next), where given."""
    import copy
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules, get_num_layers_to_build,
                                                             get_transformer_layer_offset)

    # the dense / MoE pattern of every layer; 0.19.2 asserts no experimental attention variant there
    # (the token mixer is replaced below), so it reads a copy without it
    plain = copy.copy(config)
    object.__setattr__(plain, "experimental_attention_variant", None)
    specs = get_gpt_decoder_layer_specs(plain, use_transformer_engine=False, normalization="RMSNorm")
    gdn = gdn_module_spec()
    out = []
    for i, spec in enumerate(specs):
        sub = spec.submodules
        attn = sub.self_attention
        if linear[i]:
            attn = gdn
        elif qk_norm is not None:
            attn = dataclasses.replace(attn, submodules=dataclasses.replace(
                attn.submodules, q_layernorm=qk_norm, k_layernorm=qk_norm))
        changes = dict(self_attention=attn)
        if norm is not None:
            changes.update(input_layernorm=norm, pre_mlp_layernorm=norm)
        out.append(dataclasses.replace(spec, submodules=dataclasses.replace(sub, **changes)))
    if config.pipeline_model_parallel_layout is not None:
        from megatron.core.transformer.enums import LayerType

        ids = config.pipeline_model_parallel_layout.get_layer_id_list(layer_type=LayerType.decoder,
                                                                      vp_stage=vp_stage, pp_rank=pp_rank)
    else:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        ids = range(offset, offset + get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank))
    if norm is None:
        from megatron.core.transformer.torch_norm import WrappedTorchNorm as norm
    return TransformerBlockSubmodules(layer_specs=[out[i] for i in ids], layer_norm=norm)
