"""Plain-torch stand-ins for GPU-only pieces megatron-core calls, used by ``compat``'s CPU
adaptations (which say when and why each is installed): megatron's causal masks without its literal
``device="cuda"``, and the ``fla`` kernels of the gated delta-net (Qwen3-Next, Qwen3.5)."""

from __future__ import annotations

import torch


def causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def window_mask(sq: int, skv: int, window_size) -> torch.Tensor:
    m = torch.ones(sq, skv, dtype=torch.bool)
    return ~torch.tril(torch.triu(m, diagonal=skv - sq - window_size[0]), diagonal=skv - sq + window_size[1])


def l2norm(x, dim: int = -1, eps: float = 1e-6, **_unused):
    """``fla.modules.l2norm.l2norm`` in plain torch: ``x / sqrt(sum(x^2) + eps)``, in fp32."""
    xf = x.float()
    return (xf * torch.rsqrt((xf * xf).sum(dim=dim, keepdim=True) + eps)).to(x.dtype)


def causal_conv1d(x, weight, bias=None, activation=None, initial_state=None, output_final_state=False,
                  cu_seqlens=None, **_unused):
    """``fla.modules.convolution.causal_conv1d`` (megatron-core 0.19) in plain torch: a depthwise
    causal convolution of ``x`` [b, s, d] with ``weight`` [d, w], then the activation."""
    if initial_state is not None or cu_seqlens is not None or output_final_state:
        raise NotImplementedError("CPU causal_conv1d: no initial/final state, no packed sequences")
    d, w = weight.shape
    y = torch.nn.functional.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=w - 1, groups=d)
    y = y[..., : x.shape[1]]
    if activation in ("silu", "swish"):
        y = torch.nn.functional.silu(y)
    elif activation is not None:
        raise NotImplementedError(f"CPU causal_conv1d: activation {activation!r}")
    return y.transpose(1, 2), None


def gated_delta_rule(torch_rule):
    """``fla.ops.gated_delta_rule.chunk_gated_delta_rule`` through megatron-core's own plain-torch
    chunked rule (``torch_chunk_gated_delta_rule``, both versions; what its deterministic mode runs)."""
    def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, cu_seqlens=None, **_unused):
        if scale is not None or cu_seqlens is not None:
            raise NotImplementedError("CPU gated delta rule: default scale only, no packed sequences")
        return torch_rule(q, k, v, g=g, beta=beta, initial_state=initial_state,
                          output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)

    return chunk_gated_delta_rule
