"""Every adaptation megatron-core needs to run here, in one place.

megatron-core assumes CUDA and TransformerEngine in a handful of spots. Each adaptation below
says why it exists and when it applies; ``apply(device)`` installs exactly the ones the current
process needs and is idempotent. Nothing is patched at import time.

Conditions:
  * ``cpu``   -- the process runs megatron on the CPU (gloo), no CUDA device is used.
  * ``no_te`` -- TransformerEngine is not installed (CPU *and* GPU machines here).
"""

from __future__ import annotations

import os

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
    """no_te: the local spec's WrappedTorchNorm asserts ``not sequence_parallel`` although a
    per-token norm is correct on sequence-sharded activations; build it without the flag and tag
    its parameters ``sequence_parallel`` so training reduces their grads as TE's norm would."""
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


def apply(device: str) -> None:
    """Install the adaptations this process needs for ``device`` ("cpu" or "cuda")."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron wraps helpers in torch.compile
    wanted = ["no_te"]
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
    "cpu": [_cpu_cuda_stubs, _cpu_rng_tracker, _enter_cpu_mode],
    "no_te": [_no_te_only(_torch_norm_sequence_parallel)],
}
