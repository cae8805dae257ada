"""Build megatron-core GPT model chunks for a family and a layout (local spec, no TransformerEngine)."""

from __future__ import annotations

import torch

from .families.base import Family
from .layout import ParallelLayout, padded_vocab_size
from .errors import UsageError
from .lora import is_lora_param


def transformer_config(family: Family, layout: ParallelLayout, dtype: torch.dtype, device: str,
                       grouped: bool = False, training=None):
    """``training``: ``train_options.TrainOptions`` (recomputation, MoE training options), set
    over the execution defaults; megatron-core validates them (its refusal -> ``UsageError``)."""
    arch = family.architecture
    kw = dict(arch.config)
    first, last = layout.first_stage_layers, layout.last_stage_layers
    if layout.pp == 2 and first is not None and last is not None:
        # Same split (validated: first + last == num_layers), but megatron-core's layer offset
        # divides by the number of middle stages (0 here) under vpp: pass only the first size.
        last = None
    runtime = moe_runtime(kw, layout, grouped)
    runtime.update(family.runtime_config(dtype, packed=bool(training is not None and training.packed)))
    if training is not None:
        runtime.update(training.config_kwargs(moe=bool(kw.get("num_moe_experts"))))
    try:
        return _config(arch, kw, layout, dtype, device, first, last, runtime)
    except (ValueError, AssertionError, ImportError) as e:
        if training is None:
            raise
        raise UsageError(f"training options {', '.join(training.set_fields())}: megatron-core refused the "
                         f"config: {type(e).__name__}: {e}") from e


def _config(arch, kw, layout, dtype, device, first, last, runtime):
    return arch.config_class()(
        **kw,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        sequence_parallel=layout.sp,
        num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Weights come from the checkpoint: skip random init; anything not loaded is an error.
        perform_initialization=False,
        use_cpu_initialization=device == "cpu",
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **runtime,
    )


def moe_runtime(kw: dict, layout: ParallelLayout, grouped: bool) -> dict:
    """Megatron MoE settings that are about execution, not the model: conversion and verification
    run without auxiliary losses or token dropping, so routing equals the HF model's."""
    if not kw.get("num_moe_experts"):
        return {}
    return dict(expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp,
                moe_token_dispatcher_type="alltoall", moe_grouped_gemm=grouped,
                moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None,
                moe_permute_fusion=False, moe_expert_capacity_factor=None)


def local_grouped_experts_available() -> bool:
    """Whether megatron-core's local (non-TransformerEngine) spec can build grouped-GEMM experts.

    megatron-core 0.16 builds its legacy ``GroupedMLP`` for ``moe_grouped_gemm=True``. Later
    releases (0.19.2 measured) removed that class: their local spec ignores the flag and always
    builds ``SequentialMLP`` (grouped experts there are ``TEGroupedMLP``, TransformerEngine only).
    Feature-detected by the class, not by a version string."""
    from megatron.core.transformer.moe import experts

    return hasattr(experts, "GroupedMLP")


def _check_grouped_experts(family: Family, grouped: bool) -> None:
    if grouped and family.num_experts and family.architecture.config.get("add_bias_linear"):
        raise UsageError(
            f"grouped_experts=True: {family.name}'s experts have biases, and megatron-core's grouped-GEMM "
            f"experts have none (GroupedMLP asserts add_bias_linear=False); build with "
            f"grouped_experts=False (CLI: drop --moe-grouped-gemm)")
    if grouped and family.num_experts and not local_grouped_experts_available():
        import megatron.core

        raise UsageError(
            f"grouped_experts=True: megatron-core {getattr(megatron.core, '__version__', '?')} has no "
            f"grouped-GEMM experts without TransformerEngine (its local spec has no legacy GroupedMLP and "
            f"would silently build SequentialMLP); build with grouped_experts=False (CLI: drop "
            f"--moe-grouped-gemm), or use megatron-core 0.16")


def _check_experts_built(chunk, grouped: bool) -> None:
    """What megatron built is what was asked for: a spec that ignores ``moe_grouped_gemm`` must not
    pass for grouped experts (the weights would load and verify, testing nothing grouped)."""
    for layer in chunk.decoder.layers:
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        if experts is None:
            continue
        is_sequential = hasattr(experts, "local_experts")
        if is_sequential == grouped:
            raise RuntimeError(f"layer {layer.layer_number}: megatron built {type(experts).__name__} "
                               f"experts, asked for {'grouped' if grouped else 'sequential'} experts")


# Measured on megatron-core 0.16.1 (tests/test_guest.py builds one at cp=2 and sees it assert).
CP_ATTENTION = ("megatron-core's local spec has no context-parallel attention: its core attention, "
                "megatron.core.transformer.dot_product_attention.DotProductAttention, asserts "
                "context_parallel_size == 1 (\"Context parallelism is only supported by TEDotProductAttention\")")


def forward_unsupported(layout: ParallelLayout) -> str | None:
    """Why a forward of the bridge's models cannot run at ``layout``, or None when it can."""
    if layout.cp > 1:
        return (f"forward verification at cp={layout.cp} is not supported: {CP_ATTENTION}. Loading, exporting "
                f"and syncing at cp > 1 work (the weights do not depend on cp); verify the model at cp=1")
    return None


def build_model(family: Family, layout: ParallelLayout, dtype: torch.dtype = torch.float32,
                device: str = "cpu", parallel_output: bool = True, grouped_experts: bool = False,
                training=None) -> list:
    """This rank's model chunks (one per virtual pipeline stage). Needs ``runtime.dist.setup``.
    ``grouped_experts``: MoE experts as one grouped-GEMM module per layer instead of SequentialMLP
    (megatron-core 0.16's legacy GroupedMLP in the local spec; refused where the local spec has none,
    see ``local_grouped_experts_available``).

    At cp > 1 the chunks are built with ``context_parallel_size=1`` in their config (the local
    spec cannot build CP attention, see ``CP_ATTENTION``): they hold the same weights as CP-built
    ones, the parallel state has the CP groups, and their forward is refused (``forward_unsupported``).

    ``training``: ``train_options.TrainOptions`` (recomputation, MoE options, frozen parts)."""
    from megatron.core import parallel_state as ps

    arch = family.architecture
    layout.validate(**family.layout_dims())
    family.check_layout(layout)
    grouped_experts = grouped_experts or bool(training is not None and training.moe_grouped_gemm)
    if training is not None:
        from .train_options import check_freeze

        check_freeze(family, training.freeze)
    _check_grouped_experts(family, grouped_experts)
    config = transformer_config(family, layout, dtype, device, grouped_experts, training)
    model_kw = dict(arch.model)
    model_kw["vocab_size"] = padded_vocab_size(model_kw["vocab_size"], layout.tp)
    model_class = arch.model_class()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    chunks = []
    for vp in range(layout.vpp):
        vp_stage = vp if layout.vpp > 1 else None
        spec = arch.layer_spec(config, vp_stage, pp_rank)
        chunk = model_class(config, spec, pre_process=layout.is_first(pp_rank, vp),
                            post_process=layout.is_last(pp_rank, vp), parallel_output=parallel_output,
                            vp_stage=vp_stage, **model_kw, **arch.chunk_kwargs(config, spec, vp_stage, pp_rank))
        if device == "cuda":
            chunk.cuda(torch.cuda.current_device())
        expected = list(layout.chunk_layers(family.num_layers, pp_rank, vp))
        actual = [layer.layer_number - 1 for layer in chunk.decoder.layers]
        if actual != expected:
            raise RuntimeError(f"megatron placed layers {actual} on pp={pp_rank} vpp={vp}, the bridge "
                               f"expected {expected}: layout arithmetic disagrees with this megatron-core")
        _check_experts_built(chunk, grouped_experts)
        chunks.append(chunk.eval())
    if training is not None and training.freeze:
        from .train_options import freeze

        freeze(chunks, training.freeze)
    return chunks


def param_views(models, family: Family, layout: ParallelLayout, lora: bool = False) -> dict:
    """(chunk, name) -> tensor for every weight of this rank's chunks, in local-spec names; with
    ``lora`` only the LoRA factors instead (base weights of wrapped linears keep their plain names).

    megatron-core's legacy GroupedMLP keeps all local experts of a layer in two tensors (read by
    its forward as ``weight1.view(E_local, hidden, -1)``, ``weight2.view(E_local, -1, hidden)``);
    they are presented here as per-expert views in SequentialMLP's names and orientation, so the
    family tables need no second spelling. Writing into a view writes the parameter.
    """
    out = {}
    n_local = family.num_experts // layout.ep if family.num_experts else 0
    hidden = None
    for chunk, m in enumerate(models):
        for name, t in m.state_dict(keep_vars=True).items():
            if not isinstance(t, torch.Tensor) or name.endswith("_extra_state"):
                continue
            if is_lora_param(name) != lora:
                continue
            name = name.replace(".base_layer.", ".")
            if name.endswith(("mlp.experts.weight1", "mlp.experts.weight2")):
                hidden = hidden or family.architecture.config["hidden_size"]
                prefix, which = name.rsplit(".", 1)
                fc = "linear_fc1" if which == "weight1" else "linear_fc2"
                d = t.detach()
                grouped = d.view(n_local, hidden, -1) if which == "weight1" else d.view(n_local, -1, hidden)
                for j in range(n_local):
                    out[(chunk, f"{prefix}.local_experts.{j}.{fc}.weight")] = grouped[j].t()
                continue
            out[(chunk, name)] = t
    return out
