"""megatron-core specs for Qwen3.5 (imported when the model is built).

Every RMSNorm of the language model -- input, pre-MLP, q/k and final -- stores its weight as an
offset from 1 (transformers' ``Qwen3_5RMSNorm``: ``x / rms(x) * (1 + w)`` in fp32). megatron's
``layernorm_zero_centered_gamma`` means the same, but the local spec's torch norm refuses it, so
the specs get Gemma 3's ``OffsetRMSNorm`` (``gemma_modules``) in those places.
"""

from __future__ import annotations

import dataclasses

from .gemma_modules import OffsetRMSNorm

_NORMS = ("input_layernorm", "pre_mlp_layernorm")
_QK_NORMS = ("q_layernorm", "k_layernorm")


def _offset_layer(spec):
    sub = spec.submodules
    changes = {n: OffsetRMSNorm for n in _NORMS if getattr(sub, n, None) is not None}
    attn = sub.self_attention
    if dataclasses.is_dataclass(attn) and attn.submodules is not None:
        qk = {n: OffsetRMSNorm for n in _QK_NORMS if getattr(attn.submodules, n, None) is not None}
        if qk:
            changes["self_attention"] = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, **qk))
    return dataclasses.replace(spec, submodules=dataclasses.replace(sub, **changes))


def offset_norm_spec(block):
    """A decoder block spec (``TransformerBlockSubmodules``) with every norm an ``OffsetRMSNorm``."""
    return dataclasses.replace(block, layer_specs=[_offset_layer(s) for s in block.layer_specs],
                               layer_norm=OffsetRMSNorm)
