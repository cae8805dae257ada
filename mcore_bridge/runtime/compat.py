"""Every adaptation megatron-core needs to run here, in one place.

megatron-core assumes CUDA and TransformerEngine in a handful of spots. Each adaptation below
says why it exists and when it applies; ``apply(device)`` installs exactly the ones the current
process needs and is idempotent. Nothing is patched at import time.

Conditions:
  * ``cpu``   -- the process runs megatron on the CPU (gloo), no CUDA device is used.
  * ``no_te`` -- TransformerEngine is not installed (CPU *and* GPU machines here).
  * ``no_grouped_gemm`` -- the CUDA-only ``grouped_gemm`` package is not installed (legacy
    GroupedMLP experts only).
"""

from __future__ import annotations

import os
import types

import torch
from torch.overrides import TorchFunctionMode

_APPLIED: set[str] = set()


def _is_cuda(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int)  # an int device index means a CUDA ordinal


class _CudaToCpu(TorchFunctionMode):
    """cpu: megatron creates tensors with literal ``device="cuda"`` (causal mask in
    transformer/utils.py, token counters in pipeline schedules) and calls ``Tensor.cuda()``
    (tied embeddings under PP). Redirect those to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _cpu_rng_tracker():
    """cpu: the model-parallel RNG tracker snapshots CUDA generator state; on CPU the CPU
    generator plays that role (dropout is off for conversion, so only the bookkeeping matters)."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    def add(self, name, seed):
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    mrandom.CudaRNGStatesTracker.add = add


def _torch_norm_sequence_parallel():
    """no_te (megatron-core 0.16 and 0.19.2): the local spec's WrappedTorchNorm asserts
    ``not sequence_parallel`` although a per-token norm is correct on sequence-sharded activations;
    build it without the flag and tag its parameters ``sequence_parallel`` so training reduces their
    grads as TE's norm would."""
    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__
    if getattr(original_new, "_mcore_bridge", False):
        return

    def __new__(cls, config, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, *args, **kwargs)
        plain = _shallow_replace(config, sequence_parallel=False)
        norm = original_new(cls, plain, *args, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    __new__._mcore_bridge = True
    torch_norm.WrappedTorchNorm.__new__ = staticmethod(__new__)


def _shallow_replace(config, **changes):
    """Copy a TransformerConfig without re-running its (expensive, validating) __post_init__."""
    import copy

    new = copy.copy(config)
    for k, v in changes.items():
        object.__setattr__(new, k, v)
    return new


def _cpu_cuda_stubs():
    """cpu: ``torch.cuda.current_device()`` is used as an allocation device and
    ``torch.cuda.synchronize()`` after p2p ops; make them name the CPU / do nothing."""
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None


def _router_gemm_without_te():
    """no_te: megatron-core 0.16's router GEMM tests ``te_general_gemm is not None``, a name only
    bound when TransformerEngine imports -- every MoE forward dies with NameError (GPU too).
    Feature-detected: 0.19 binds the name to None itself, so nothing is set there."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _mla_without_te():
    """no_te: multi_latent_attention's ``HAVE_TE`` is true when TransformerEngine is absent (its
    extension module imports against a mock), so an ``isinstance(..., TELinear)`` check crashes.
    megatron-core 0.16 needs it; 0.19 already computes ``HAVE_TE = False`` (setting it is a no-op)."""
    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.HAVE_TE = False


def _local_attention_for_mla():
    """no_te: MLA passes ``k_channels`` / ``v_channels`` to the core attention; the local
    DotProductAttention takes neither and sizes its output as kv_channels x heads, while MLA's
    output is v_head_dim x heads. Accept them and size the output by ``v_channels``.
    Needed on megatron-core 0.16 and 0.19.2 alike (neither local DotProductAttention takes them)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    original = DotProductAttention.__init__
    if getattr(original, "_mcore_bridge", False):
        return

    def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
        original(self, *args, **kwargs)
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    __init__._mcore_bridge = True
    DotProductAttention.__init__ = __init__


def _gmm(a, b, batch_sizes, trans_b=False):
    """``grouped_gemm.ops.gmm`` in plain torch: rows of ``a`` in consecutive groups, group i times
    ``b[i]`` (or its transpose). Differentiable."""
    outs, start = [], 0
    for i, n in enumerate(batch_sizes.tolist()):
        outs.append(a[start:start + n] @ (b[i].t() if trans_b else b[i]))
        start += n
    return torch.cat(outs) if outs else a.new_zeros(0, b.shape[1] if trans_b else b.shape[2])


def _grouped_gemm_fallback():
    """no_grouped_gemm: the legacy GroupedMLP asserts the CUDA-only ``grouped_gemm`` package at
    construction and calls ``ops.gmm`` in its forward; give it the torch version above.
    Feature-detected: megatron-core 0.16 has ``moe.grouped_gemm_util``; 0.19 removed it (and the
    legacy GroupedMLP with it), so there is nothing to adapt there."""
    import importlib.util

    if importlib.util.find_spec("megatron.core.transformer.moe.grouped_gemm_util") is None:
        return
    from megatron.core.transformer.moe import grouped_gemm_util as gg

    if gg.grouped_gemm is None:
        ops = types.SimpleNamespace(gmm=_gmm)
        gg.grouped_gemm = types.SimpleNamespace(ops=ops)
        gg.ops = ops


def _cpu_alltoall_dispatcher():
    """cpu: the all-to-all token dispatcher creates a CUDA stream for its device-to-host copies and,
    on GPU, turns the all-to-all split sizes into host numbers on it; on CPU no stream exists and
    the sizes would stay tensors. Skip the stream and convert them as the GPU path does."""
    from megatron.core.transformer.moe import token_dispatcher as td

    cls = td.MoEAlltoAllTokenDispatcher
    cls.cuda_dtoh_stream = "cpu"  # anything but None: __init__ then creates no torch.cuda.Stream

    def _maybe_dtoh_and_synchronize(self, point, tokens_per_expert=None):
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            for attr in ("input_splits", "output_splits", "output_splits_tp"):
                value = getattr(self, attr)
                if torch.is_tensor(value):
                    setattr(self, attr, value.numpy())  # what the GPU path leaves there
        return tokens_per_expert

    cls._maybe_dtoh_and_synchronize = _maybe_dtoh_and_synchronize


def _gloo_uneven_gather_scatter():
    """cpu: with expert-TP > 1 and EP > 1 the dispatcher all-gathers / reduce-scatters token runs
    of different lengths per rank; gloo only does equal sizes. Pad to the longest run for the
    gather; reduce the whole buffer and keep this rank's run for the scatter."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_uneven(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None:
            return gather(input_, group, None, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        longest = max(sizes)
        padded = input_.new_zeros((longest,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        out = gather(padded, group)
        return torch.cat([out[i * longest: i * longest + n] for i, n in enumerate(sizes)])

    def scatter_uneven(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None:
            return scatter(input_, group, None, use_global_buffer)
        sizes = [int(n) for n in input_split_sizes]
        full = input_.contiguous().clone()
        dist.all_reduce(full, group=group)
        r = dist.get_rank(group)
        start = sum(sizes[:r])
        return full[start:start + sizes[r]].contiguous()

    mappings._gather_along_first_dim = gather_uneven
    mappings._reduce_scatter_along_first_dim = scatter_uneven


def apply(device: str) -> None:
    """Install the adaptations this process needs for ``device`` ("cpu" or "cuda")."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron wraps helpers in torch.compile
    wanted = ["no_te", "no_grouped_gemm"]
    if device == "cpu":
        wanted.append("cpu")
    for cond in wanted:
        if cond in _APPLIED:
            continue
        for fn in _ADAPTATIONS[cond]:
            fn()
        _APPLIED.add(cond)


def _enter_cpu_mode():
    mode = _CudaToCpu()
    mode.__enter__()  # stays active for the life of the process (CPU runs only)


def _has_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def _no_te_only(fn):
    def run():
        if not _has_te():
            fn()

    run.__doc__ = fn.__doc__
    return run


_ADAPTATIONS = {
    "cpu": [_cpu_cuda_stubs, _cpu_rng_tracker, _enter_cpu_mode, _cpu_alltoall_dispatcher,
            _gloo_uneven_gather_scatter],
    "no_te": [_no_te_only(_torch_norm_sequence_parallel), _no_te_only(_router_gemm_without_te),
              _no_te_only(_mla_without_te), _no_te_only(_local_attention_for_mla)],
    "no_grouped_gemm": [_grouped_gemm_fallback],
}
