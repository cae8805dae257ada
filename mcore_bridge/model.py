"""Build megatron-core GPT model chunks for a family and a layout (local spec, no TransformerEngine)."""

from __future__ import annotations

import torch

from .families.base import Family
from .layout import ParallelLayout, padded_vocab_size

ACTIVATIONS = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}


def transformer_config(family: Family, layout: ParallelLayout, dtype: torch.dtype, device: str):
    from megatron.core.transformer import TransformerConfig

    kw = dict(family.model_settings()["config"])
    kw["activation_func"] = ACTIVATIONS[kw.pop("activation")]
    first, last = layout.first_stage_layers, layout.last_stage_layers
    if layout.pp == 2 and first is not None and last is not None:
        # Same split (validated: first + last == num_layers), but megatron-core's layer offset
        # divides by the number of middle stages (0 here) under vpp: pass only the first size.
        last = None
    return TransformerConfig(
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
    )


def build_model(family: Family, layout: ParallelLayout, dtype: torch.dtype = torch.float32,
                device: str = "cpu", parallel_output: bool = True) -> list:
    """This rank's model chunks (one per virtual pipeline stage). Needs ``runtime.dist.setup``."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    settings = family.model_settings()
    layout.validate(**family.layout_dims())
    config = transformer_config(family, layout, dtype, device)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", **settings["spec"])
    model_kw = dict(settings["model"])
    model_kw["vocab_size"] = padded_vocab_size(model_kw["vocab_size"], layout.tp)
    pp_rank = ps.get_pipeline_model_parallel_rank()
    chunks = []
    for vp in range(layout.vpp):
        chunk = GPTModel(config, spec, pre_process=layout.is_first(pp_rank, vp),
                         post_process=layout.is_last(pp_rank, vp), parallel_output=parallel_output,
                         vp_stage=vp if layout.vpp > 1 else None, **model_kw)
        if device == "cuda":
            chunk.cuda(torch.cuda.current_device())
        expected = list(layout.chunk_layers(family.num_layers, pp_rank, vp))
        actual = [layer.layer_number - 1 for layer in chunk.decoder.layers]
        if actual != expected:
            raise RuntimeError(f"megatron placed layers {actual} on pp={pp_rank} vpp={vp}, the bridge "
                               f"expected {expected}: layout arithmetic disagrees with this megatron-core")
        chunks.append(chunk.eval())
    return chunks
