"""LoRA on megatron-core's parallel linears: our own small layer, in PEFT's naming.

Why not PEFT's megatron LoRA (``LoraParallelLinear``): measured on peft 0.21 (FACTS.md) it crashes
unpatched, uses the dense TP group for expert layers (wrong logits under expert-TP), leaves the
sequence-parallel gradients of its replicated halves unreduced, cannot be saved by megatron's
``sharded_state_dict`` and mutates the model config. Each of those would need a patch into PEFT's
internals; the layer below is shorter than those patches together, and keeps PEFT's names
(``X.base_layer``, ``X.lora_A.default``, ``X.lora_B.default``) so adapters look familiar.

The LoRA branch runs in the same parallel regime as the linear it wraps, with the same group
(the expert-TP group for experts), so forward *and* gradients equal the unsharded computation:

  column (A replicated [r, in], B split by rows like the weight):
    no SP  : h = x A^T, its gradient all-reduced (copy_to)       -> y_r = h B_r^T
    SP     : h_s = x_s A'^T, gathered over the sequence          -> y_r = h B_r^T   (A' : grad all-reduced)
    expert : h = x A'^T (tokens already on every expert-TP rank) -> y_r = h B_r^T   (partial dx, like the base)
  row (A split by columns like the weight, B replicated [out, r]):
    no SP  : h = all-reduce(x_r A_r^T)                           -> y = h B^T
    SP     : h_s = reduce-scatter(x_r A_r^T) over the sequence   -> y_s = h_s B'^T  (B' : grad all-reduced)
    expert : y_r = (x_r A_r^T) B'^T, a partial sum that the token dispatcher reduces like the base output

``A'`` means the parameter passes through an identity whose backward all-reduces its gradient over
the group: each rank's gradient of a replicated factor is then a partial sum that must be added up.
A fused module can carry per-projection factors (``blocks`` > 1): A stacks the projections' A,
B is block-structured (projection i's rows only see columns i*r:(i+1)*r); the off-block part is
masked in the forward, so training keeps it exactly zero and export stays exact.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ADAPTER = "default"


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; the gradient is summed over ``group`` in backward."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def _summed_grad(t, group, size):
    return _AllReduceGrad.apply(t, group) if size > 1 else t


def linear_kind(module) -> str | None:
    """"column", "row" or None (not a megatron parallel linear LoRA can wrap)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row"
    return None


class LoraLinear(nn.Module):
    """Wraps one megatron Column/RowParallelLinear; returns ``(base + lora, bias)`` like it.

    ``blocks`` > 1 (fused modules with one A per projection): ``block_rows[i]`` is the projection
    that local output row i belongs to, in the weight's local row order (q/k/v interleaved per
    query group); None for a single shared A.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 blocks: int = 1, block_rows: torch.Tensor | None = None, swiglu: bool = False):
        super().__init__()
        kind = linear_kind(base)
        if kind is None:
            raise TypeError(f"LoRA wraps megatron Column/RowParallelLinear, not {type(base).__name__}")
        if kind == "column" and getattr(base, "gather_output", False):
            raise TypeError("LoRA on a column-parallel linear with gather_output=True is not supported")
        self.base_layer = base
        self.kind, self.r, self.blocks, self.swiglu = kind, r, blocks, swiglu
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        group = base.tp_group
        self.group, self.group_size = group, group.size() if group is not None else 1
        self.expert_comm = bool(getattr(base, "explicit_expert_comm", False))
        self.sequence_parallel = bool(base.sequence_parallel) and not self.expert_comm and self.group_size > 1
        weight = base.weight
        out_local, in_local = weight.shape
        in_a = in_local if kind == "row" else base.input_size
        out_b = out_local if kind == "column" else base.output_size
        rank = r * blocks
        kw = dict(dtype=weight.dtype, device=weight.device)
        self.lora_A = nn.ModuleDict({ADAPTER: nn.Linear(in_a, rank, bias=False, **kw)})
        self.lora_B = nn.ModuleDict({ADAPTER: nn.Linear(rank, out_b, bias=False, **kw)})
        self.lora_dropout = nn.ModuleDict({ADAPTER: nn.Dropout(dropout) if dropout > 0 else nn.Identity()})
        nn.init.kaiming_uniform_(self.lora_A[ADAPTER].weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B[ADAPTER].weight)
        if blocks > 1:  # block_rows[i]: the projection (0..blocks-1) local output row i belongs to
            mask = (block_rows[:, None] == torch.arange(rank, device=block_rows.device)[None, :] // r)
            self.register_buffer("block_mask", mask.to(**kw), persistent=False)
        else:
            self.block_mask = None

    merged_checkpoint = False  # set by ``lora.merged_checkpoint``: sharded_state_dict saves W + delta

    def __getattr__(self, name):  # megatron code reads attributes of the linear it built
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base_layer"], name)

    @property
    def A(self) -> torch.Tensor:
        return self.lora_A[ADAPTER].weight

    @property
    def B(self) -> torch.Tensor:
        b = self.lora_B[ADAPTER].weight
        return b * self.block_mask if self.block_mask is not None else b

    def delta(self) -> torch.Tensor:
        """This rank's shard of scale * B @ A in fp32, shaped like the base weight shard."""
        return (self.B.float() @ self.A.float()) * self.scaling

    def forward(self, x, *args, **kwargs):
        out, bias = self.base_layer(x, *args, **kwargs)
        return out + self._lora(x).to(out.dtype), bias

    def _lora(self, x):
        from megatron.core.tensor_parallel import mappings as mp

        g, size = self.group, self.group_size
        x = self.lora_dropout[ADAPTER](x).to(self.A.dtype)
        if self.kind == "column":
            if self.expert_comm:
                h = x @ _summed_grad(self.A, g, size).t()
            elif self.sequence_parallel:
                h = mp.gather_from_sequence_parallel_region(x @ _summed_grad(self.A, g, size).t(), group=g)
            else:  # every rank computes the same h; its gradient is the sum of the ranks' parts
                h = x @ self.A.t()
                h = mp.copy_to_tensor_model_parallel_region(h, group=g) if size > 1 else h
            return (h @ self.B.t()) * self.scaling
        h = x @ self.A.t()
        if self.expert_comm:
            return (h @ _summed_grad(self.B, g, size).t()) * self.scaling
        if self.sequence_parallel:
            h = mp.reduce_scatter_to_sequence_parallel_region(h, group=g)
            return (h @ _summed_grad(self.B, g, size).t()) * self.scaling
        if size > 1:
            h = mp.reduce_from_tensor_model_parallel_region(h, group=g)
        return (h @ self.B.t()) * self.scaling

    # -- megatron distributed checkpoints -------------------------------------------------------
    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The base linear's entries under its unwrapped keys, plus the factors sharded like the
        weight they modify (B of a gated fc1 through megatron's swiglu factory, so it reshards)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        out = self.base_layer.sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.merged_checkpoint:  # the base weight with the adapter merged in, and no factors
            with torch.no_grad():  # (a gated fc1's swiglu factory is applied by the MLP, after this)
                out[prefix + "weight"].data = (self.base_layer.weight.float() + self.delta()).to(
                    self.base_layer.weight.dtype)
            return out
        for name, factor, axis in (("lora_A", self.lora_A, 1 if self.kind == "row" else None),
                                   ("lora_B", self.lora_B, 0 if self.kind == "column" else None)):
            key = f"{name}.{ADAPTER}.weight"
            sd = make_sharded_tensors_for_checkpoint(
                {key: factor[ADAPTER].weight}, prefix, {key: axis} if axis is not None else {}, sharded_offsets,
                tp_group=self.group, dp_cp_group=(metadata or {}).get("dp_cp_group"))
            if name == "lora_B" and self.swiglu:
                from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

                full = prefix + key
                sd[full] = apply_swiglu_sharded_factory(sd[full], sharded_offsets)
            out.update(sd)
        return out


class RouterLora:
    """LoRA on megatron's MoE router (``TopKRouter``), whose weight is used by its ``gating``
    method rather than by a parallel linear: the factors become the router's submodules
    (``mlp.router.lora_A.default.weight``) and ``gating`` adds ``scale * (x A^T) B^T`` to the
    logits before top-k. The router and its factors are replicated; under sequence parallelism
    each rank routes its own tokens, so the factors' gradients are summed over the TP group."""

    def __init__(self, router: nn.Module, r: int, alpha: float, rslora: bool = False):
        from megatron.core import parallel_state as ps

        weight = router.weight
        kw = dict(dtype=weight.dtype, device=weight.device)
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        router.lora_A = nn.ModuleDict({ADAPTER: nn.Linear(weight.shape[1], r, bias=False, **kw)})
        router.lora_B = nn.ModuleDict({ADAPTER: nn.Linear(r, weight.shape[0], bias=False, **kw)})
        nn.init.kaiming_uniform_(router.lora_A[ADAPTER].weight, a=math.sqrt(5))
        nn.init.zeros_(router.lora_B[ADAPTER].weight)
        self.router = router
        sp = bool(router.config.sequence_parallel)
        self.group = ps.get_tensor_model_parallel_group() if sp else None
        self.group_size = self.group.size() if self.group is not None else 1
        original = router.gating

        def gating(x):
            logits = original(x)
            a = _summed_grad(self.A, self.group, self.group_size)
            b = _summed_grad(self.B, self.group, self.group_size)
            return logits + ((x.to(a.dtype) @ a.t()) @ b.t() * self.scaling).to(logits.dtype)

        router.gating = gating
        object.__setattr__(router, "_lora", self)  # not a submodule: its factors are the router's

    @property
    def A(self) -> torch.Tensor:
        return self.router.lora_A[ADAPTER].weight

    @property
    def B(self) -> torch.Tensor:
        return self.router.lora_B[ADAPTER].weight

    def delta(self) -> torch.Tensor:
        return (self.B.float() @ self.A.float()) * self.scaling
