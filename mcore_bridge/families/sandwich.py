"""Sandwich norms: a norm on the attention output and one on the MLP output, each applied before its
residual add (GLM-4-0414 ``post_self_attn_layernorm`` / ``post_mlp_layernorm``; Gemma 2/3 the
same places). megatron-core's ``TransformerLayer`` has only the pre-norms, so ``SandwichLayer`` adds
the two modules and normalises the sublayer output inside the layer's own bias-dropout-add step:

    h = residual + post_attn_norm(attention(input_norm(x)))
    y = h + post_mlp_norm(mlp(pre_mlp_norm(h)))

Parameters: ``decoder.layers.{L}.post_self_attn_layernorm.weight`` and
``decoder.layers.{L}.post_mlp_layernorm.weight``. Everything else is megatron's layer.
"""

from __future__ import annotations

import dataclasses


def _normed_bda(get_bda, norm):
    """megatron's bias-dropout-add factory with ``norm`` applied to the sublayer output first (its
    bias added before the norm, as the HF layer normalises the projection's whole output)."""

    def factory(training, fused):
        bda = get_bda(training, fused)

        def apply(x_with_bias, residual, prob):
            x, bias = x_with_bias
            if bias is not None:
                x = x + bias
            return bda((norm(x), None), residual, prob)

        return apply

    return factory


def post_norm_spec(base_spec):
    """The norm of the layer's pre-norms, as a standalone module: the local spec's input norm; a
    TransformerEngine spec fuses both pre-norms into the following linears (``IdentityOp`` there),
    so its standalone ``TENorm`` (same normalization, read from the config)."""
    from megatron.core.transformer.identity_op import IdentityOp

    sub = base_spec.submodules
    for norm in (sub.input_layernorm, sub.pre_mlp_layernorm):
        if norm is not IdentityOp:
            return norm
    from megatron.core.extensions.transformer_engine import TENorm

    return TENorm


def sandwich_layer_spec(base_spec, norm=None):
    """``base_spec`` (megatron's ``ModuleSpec`` of a ``TransformerLayer``) with its module swapped for
    ``SandwichLayer`` and the two post norms of spec ``norm`` (default ``post_norm_spec``) added."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    layer_cls = sandwich_layer_class()
    sub = base_spec.submodules
    norm = post_norm_spec(base_spec) if norm is None else norm
    fields = {f.name: getattr(sub, f.name) for f in dataclasses.fields(sub)}
    submodules = layer_cls.Submodules(**fields, post_self_attn_layernorm=norm, post_mlp_layernorm=norm)
    return ModuleSpec(module=layer_cls, submodules=submodules, params=dict(base_spec.params or {}))


_CLASS = None


def sandwich_layer_class():
    """The ``TransformerLayer`` subclass (built on first use: megatron is imported only then)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    @dataclasses.dataclass
    class SandwichLayerSubmodules(TransformerLayerSubmodules):
        post_self_attn_layernorm: object = IdentityOp
        post_mlp_layernorm: object = IdentityOp

    class SandwichLayer(TransformerLayer):
        """megatron's ``TransformerLayer`` plus norms of the attention and MLP outputs."""

        Submodules = SandwichLayerSubmodules

        def __init__(self, config, submodules, *args, **kwargs):
            super().__init__(config, submodules, *args, **kwargs)
            for name in ("post_self_attn_layernorm", "post_mlp_layernorm"):
                setattr(self, name, build_module(getattr(submodules, name), config=self.config,
                                                 hidden_size=self.config.hidden_size,
                                                 eps=self.config.layernorm_epsilon))
            self.self_attn_bda = _normed_bda(self.self_attn_bda, self.post_self_attn_layernorm)
            self.mlp_bda = _normed_bda(self.mlp_bda, self.post_mlp_layernorm)

    _CLASS = SandwichLayer
    return _CLASS
