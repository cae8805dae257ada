"""megatron-core modules for Gemma 3, as small subclasses (imported when a Gemma model is built).

What megatron-core's GPT layer lacks for Gemma 3, measured on 0.16.1 and 0.19.2:
  * ``(1 + w)`` RMSNorm: megatron's ``layernorm_zero_centered_gamma`` is the same meaning of the
    stored weight, but the local spec's norm (``WrappedTorchNorm``: torch's RMSNorm) asserts it off
    and the fused one needs Apex. ``OffsetRMSNorm`` is torch's RMSNorm holding the offset, computed
    as transformers' Gemma3RMSNorm does (fp32, then back to the input's dtype);
  * post-attention / post-MLP norms (sandwich norms): ``GemmaSelfAttention`` / ``GemmaMLP`` normalise
    their output (after the row-parallel reduction: whole hidden vectors, also under sequence
    parallelism) before the residual add;
  * one RoPE base per layer kind: sliding layers (``local_rope_layers``) rotate with their own
    ``RotaryEmbedding`` (``rope_local_base_freq``, unscaled) instead of the model's global one
    (``Gemma3GPT`` hands it to their attention);
  * the embedding scaled by sqrt(hidden): ``ScaledEmbedding``, by the scale rounded to the
    embedding's dtype as transformers does (bf16: sqrt(1152) = 33.94 becomes 34.0).
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP


class OffsetRMSNorm(torch.nn.RMSNorm):
    """RMSNorm whose weight is stored as an offset from 1: ``x / rms(x) * (1 + w)``."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        torch.nn.init.zeros_(self.weight)
        # a per-token norm: under sequence parallelism its grads are partial sums, as for megatron's norms
        self.weight.sequence_parallel = config.sequence_parallel

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Replicated over tensor parallelism, as megatron's default for a plain module (megatron's
        MLP asks each child for this method: a post-MLP norm inside it needs it for dist checkpoints)."""
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, {},
                                                   sharded_offsets, dp_cp_group=metadata["dp_cp_group"],
                                                   tp_group=parallel_state.get_tensor_model_parallel_group())

    def forward(self, x):
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


def post_norm(config) -> OffsetRMSNorm:
    return OffsetRMSNorm(config, config.hidden_size, eps=config.layernorm_epsilon)


class GemmaSelfAttention(SelfAttention):
    """megatron's SelfAttention + a norm on its output; on sliding layers ``Gemma3GPT`` gives it a
    ``local_rope`` that replaces the model's (global) rotary embedding."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.post_layernorm = post_norm(config)
        self.local_rope = None
        self.mask_channel = None  # vision-language: which of the model's [B, 2, S, S] masks is this layer's

    def forward(self, *args, **kwargs):
        if self.mask_channel is not None and kwargs.get("attention_mask") is not None:
            # contiguous: megatron's fused masked softmax (GPU, half precision) reads the mask as laid out
            kwargs["attention_mask"] = kwargs["attention_mask"][:, self.mask_channel:self.mask_channel + 1].contiguous()
        emb = kwargs.get("rotary_pos_emb")
        if self.local_rope is not None and emb is not None:
            if isinstance(emb, tuple) or kwargs.get("packed_seq_params") is not None:
                raise NotImplementedError("Gemma 3 local RoPE: packed sequences / separate q,k embeddings")
            kwargs["rotary_pos_emb"] = self.local_rope(emb.size(0)).to(emb.dtype)
        out, bias = super().forward(*args, **kwargs)
        return self.post_layernorm(out), bias


class GemmaMLP(MLP):
    """megatron's MLP + a norm on its output."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.post_layernorm = post_norm(config)

    def forward(self, *args, **kwargs):
        out, bias = super().forward(*args, **kwargs)
        return self.post_layernorm(out), bias


class ScaledEmbedding(LanguageModelEmbedding):
    """Token embeddings times sqrt(hidden_size), the factor rounded to the embeddings' dtype."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        scale = torch.tensor(self.config.hidden_size ** 0.5, dtype=self.word_embeddings.weight.dtype)
        return out * scale.to(device=out.device, dtype=out.dtype)


class Gemma3GPT(GPTModel):
    """GPTModel with Gemma's scaled embedding on the first stage and the local RoPE base
    (``local_rotary_base``) on the sliding layers (``local_rope_layers``, global indices)."""

    def __init__(self, config, transformer_layer_spec, *args, local_rotary_base: float,
                 local_rope_layers: tuple = (), **kwargs):
        super().__init__(config, transformer_layer_spec, *args, **kwargs)
        if self.pre_process:
            self.embedding.__class__ = ScaledEmbedding  # same module and weights, scaled output
        for layer in self.decoder.layers:
            if layer.layer_number - 1 in local_rope_layers:  # layer_number: global, from 1
                layer.self_attention.local_rope = RotaryEmbedding(
                    kv_channels=config.kv_channels, rotary_percent=1.0, rotary_base=local_rotary_base,
                    use_cpu_initialization=config.use_cpu_initialization)


def _with_module(spec, cls):
    """``spec`` building ``cls`` instead of the megatron class it names: a ``ModuleSpec``
    (megatron-core 0.16), or a ``functools.partial`` of the class's builder classmethod
    (0.19.2 specs its MLP as ``partial(MLP.as_mlp_submodule, submodules=...)``)."""
    import dataclasses
    import functools

    if dataclasses.is_dataclass(spec):
        return dataclasses.replace(spec, module=cls)
    if isinstance(spec, functools.partial) and isinstance(getattr(spec.func, "__self__", None), type):
        if not issubclass(cls, spec.func.__self__):
            raise TypeError(f"{cls.__name__} does not extend {spec.func.__self__.__name__}")
        return functools.partial(getattr(cls, spec.func.__name__), *spec.args, **spec.keywords)
    raise TypeError(f"megatron spec {spec!r}: neither a ModuleSpec nor a class builder")


def layer_block_spec(config, vp_stage, pp_rank, arbitrary_mask: bool = False):
    """megatron's local GPT layer spec with the Gemma modules in place, every norm an OffsetRMSNorm;
    ``arbitrary_mask``: attention takes the model's mask (``AttnMaskType.arbitrary``), not causal."""
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=True)
    sub = spec.submodules
    attn = sub.self_attention
    attn = dataclasses.replace(_with_module(attn, GemmaSelfAttention), submodules=dataclasses.replace(
        attn.submodules, q_layernorm=OffsetRMSNorm, k_layernorm=OffsetRMSNorm))
    if arbitrary_mask:
        from megatron.core.transformer.enums import AttnMaskType

        attn = dataclasses.replace(attn, params={**(attn.params or {}), "attn_mask_type": AttnMaskType.arbitrary})
    mlp = _with_module(sub.mlp, GemmaMLP)
    layer = dataclasses.replace(spec, submodules=dataclasses.replace(
        sub, input_layernorm=OffsetRMSNorm, pre_mlp_layernorm=OffsetRMSNorm, self_attention=attn, mlp=mlp))
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=OffsetRMSNorm)
