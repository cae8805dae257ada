"""OLMoE (``olmoe``): a Llama-shaped MoE whose q/k RMSNorm spans the whole projection (all heads
together: ``q_norm.weight`` is ``[heads x head_dim]``), softmax top-k routing, renormalised or not
(``norm_topk_prob``), every layer sparse, no shared expert.

megatron-core's ``qk_layernorm`` normalises each head on its own, which computes something else (a
test shows it). The full-width norm is a small module put into megatron's own attention spec in
place of its per-head norm (``FullWidthRMSNorm``): it receives megatron's per-head
``[s, b, heads, head_dim]`` query/key, takes the mean square over all heads, summed over the
tensor-parallel ranks (each holds a contiguous block of heads, and the matching block of the
norm weight), and scales as HF does. Nothing else of megatron's attention changes.
"""

from __future__ import annotations

import copy
import pickle

import torch

from ..transforms import COLUMN
from .base import UnsupportedConfig, rule
from .llama import Llama
from .moe import MoEMixin

A = "decoder.layers.{L}.self_attention."


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: every rank's output depends on
    every rank's input."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class FullWidthRMSNorm(torch.nn.Module):
    """RMSNorm over all query (or key) heads of a token, as one vector of ``heads x head_dim``.

    Built by megatron's attention with ``hidden_size`` = head_dim; ``heads_field`` names the config
    field that counts the heads it sees. Under tensor parallelism each rank holds its own heads and
    the matching slice of the weight; the sum of squares is all-reduced over the TP group
    (differentiable: the gradient is all-reduced too)."""

    heads_field = "num_attention_heads"

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__()
        heads = getattr(config, self.heads_field, None) or config.num_attention_heads
        self.tp = int(config.tensor_model_parallel_size)
        if heads % self.tp:
            raise UnsupportedConfig(f"{self.heads_field}={heads} cannot be split over tp={self.tp}")
        self.full_width = heads * hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(heads // self.tp * hidden_size, dtype=config.params_dtype))
        # split over TP like a column-parallel output (not a sequence-parallel replica)
        self.weight.tensor_model_parallel = True
        self.weight.partition_dim = 0
        self.weight.partition_stride = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.float().flatten(-2)  # [s, b, heads_local * head_dim]
        squares = flat.pow(2).sum(-1, keepdim=True)
        if self.tp > 1:
            from megatron.core import parallel_state

            squares = _SumOverRanks.apply(squares, parallel_state.get_tensor_model_parallel_group())
        normed = flat * torch.rsqrt(squares / self.full_width + self.eps)
        return (self.weight * normed.to(x.dtype)).view_as(x)

    # The extra state TransformerEngine 2.x's op-based norms carry (a pickled empty dict without
    # FP8): this norm's checkpoint entries are then those a TE-spec q/k norm has, as the TE layout
    # writer (``te_layout``) writes them.
    def get_extra_state(self) -> torch.Tensor:
        return torch.frombuffer(bytearray(pickle.dumps({})), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        pass

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """megatron distributed checkpoints: the weight is split over TP along axis 0 (a plain
        module would be saved as a replica, and TP ranks hold different slices)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix,
                                                   {"weight": 0}, sharded_offsets)

    def extra_repr(self) -> str:
        return f"local {tuple(self.weight.shape)} of {self.full_width}, eps={self.eps}"


class FullWidthKeyRMSNorm(FullWidthRMSNorm):
    heads_field = "num_query_groups"


class Olmoe(MoEMixin, Llama):
    model_types = ("olmoe",)
    name = "olmoe"

    @property
    def expert_ffn(self) -> int:
        return int(self.cfg.require("intermediate_size"))  # OLMoE's experts use intermediate_size

    @property
    def qk_norm(self) -> bool:
        return True  # full width: see FullWidthRMSNorm

    def is_moe_layer(self, layer: int) -> bool:
        return True

    def check_unsupported(self):
        super().check_unsupported()
        c = self.cfg
        if c.get("clip_qkv") is not None:
            raise UnsupportedConfig(f"clip_qkv={c.get('clip_qkv')}: megatron-core's attention does not clamp "
                                    f"q/k/v; set it to null only if the model was trained without clamping")
        hidden, heads = int(c.require("hidden_size")), int(c.require("num_attention_heads"))
        if self.head_dim * heads != hidden:
            raise UnsupportedConfig(f"head_dim={self.head_dim}: transformers' OLMoE sizes its q/k norms from "
                                    f"hidden_size / num_attention_heads = {hidden // heads}")

    def layer_spec(self, config, vp_stage, pp_rank):
        """megatron's decoder block spec with the per-head q/k norms replaced by full-width ones."""
        spec = copy.deepcopy(super().layer_spec(config, vp_stage, pp_rank))
        for layer in spec.layer_specs:
            attn = layer.submodules.self_attention.submodules
            attn.q_layernorm, attn.k_layernorm = FullWidthRMSNorm, FullWidthKeyRMSNorm
        return spec

    def attention_rules(self):
        rows = [r for r in super().attention_rules() if "_layernorm." not in r.mcore]
        H = self.hf_layer_prefix + "self_attn."
        # each TP rank holds a contiguous block of heads: the matching block of the norm weight
        return rows + [rule(A + "q_layernorm.weight", H + "q_norm.weight", COLUMN),
                       rule(A + "k_layernorm.weight", H + "k_norm.weight", COLUMN)]
