"""Every adaptation megatron-core needs to run here, in one place, installed only inside a scope.

megatron-core assumes CUDA and TransformerEngine in a handful of spots. Each adaptation below
says why it exists (its docstring) and when it applies (its condition). ``with scope(device):``
installs exactly the ones the current process needs and, on exit, restores every attribute it
patched and leaves the ``TorchFunctionMode`` it entered: a host process (a trainer, an RL loop)
that calls the library is unchanged afterwards. Scopes nest: an inner scope installs only what
the outer ones have not. Nothing is patched at import time and no environment variable is set.

Conditions:
  * ``local_spec`` -- always: the bridge builds its models with megatron's local spec.
  * ``cpu``   -- the process runs megatron on the CPU (gloo), no CUDA device is used.
  * ``no_te`` -- TransformerEngine is not installed (CPU *and* GPU machines here).
  * ``no_grouped_gemm`` -- the CUDA-only ``grouped_gemm`` package is not installed (legacy
    GroupedMLP experts only).
On GPU with TransformerEngine and grouped_gemm installed, the scope installs only ``local_spec``'s.

Each patching adaptation declares what it patches (``@_patches``); the scope snapshots those
attributes before installing it and puts them back on exit, and refuses an adaptation that
changed an attribute of those owners it did not declare. Version-dependent ones are feature-
detected in their bodies (they look for the attribute / module they adapt).

Caveat -- forward passes run by the host. Some adaptations matter at forward time, not only while
the bridge builds, loads or exports: without TransformerEngine megatron-core 0.16's MoE router
reads ``te_general_gemm`` in every forward (``_router_gemm_without_te``), and on CPU the
CUDA-to-CPU redirection, the RNG tracker, the all-to-all dispatcher and the gloo gathers are used
by every forward. A host that runs a forward of such a model *outside* our scope gets megatron's
own behaviour there; that is the host's business: it can wrap its forward in
``with compat.scope(device):`` itself (the CLI and the verification workers keep one scope open
for their whole run).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import sys
import types

import torch
from torch.overrides import TorchFunctionMode

from . import cpu_kernels


def _patches(*targets: str):
    """Declare what an adaptation patches: ``"module:attr,attr"`` or ``"module:Class.attr,attr"``."""
    def mark(fn):
        fn._targets = targets
        return fn
    return mark


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


@_patches("megatron.core.transformer.utils:get_default_causal_mask,get_sliding_window_causal_mask",
          "megatron.core.fusions.fused_softmax:get_default_causal_mask,get_sliding_window_causal_mask")
def _cpu_causal_masks():
    """cpu: megatron builds its causal and sliding-window masks with a literal ``device="cuda"``
    (0.16.1 and 0.19.2). ``_CudaToCpu`` redirects that, except while torch runs a backward pass
    (torch disables function modes there): a layer that activation recomputation replays rebuilds
    its mask there and fails. The same masks, built on the CPU."""
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    for module in (utils, fused_softmax):
        module.get_default_causal_mask = cpu_kernels.causal_mask
        module.get_sliding_window_causal_mask = cpu_kernels.window_mask


@_patches("megatron.core.tensor_parallel.random:_get_cuda_rng_state,_set_cuda_rng_state",
          "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.add")
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


@_patches("megatron.core.transformer.torch_norm:WrappedTorchNorm.__new__")
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


class _NoStream:
    """cpu: what ``torch.cuda.current_stream()`` returns on CPU: every wait is already satisfied."""

    def wait_event(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def synchronize(self):
        pass


@_patches("torch.cuda:current_device,synchronize,current_stream")
def _cpu_cuda_stubs():
    """cpu: ``torch.cuda.current_device()`` is used as an allocation device and
    ``torch.cuda.synchronize()`` after p2p ops; make them name the CPU / do nothing. megatron-core
    0.19's DDP (``start_grad_sync``) also waits on ``torch.cuda.current_stream()`` (0.16 does not)."""
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NoStream()


@_patches("megatron.core.transformer.moe.moe_utils:te_general_gemm")
def _router_gemm_without_te():
    """no_te: megatron-core 0.16's router GEMM tests ``te_general_gemm is not None``, a name only
    bound when TransformerEngine imports -- every MoE forward dies with NameError (GPU too).
    Feature-detected: 0.19 binds the name to None itself, so nothing is set there."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


@_patches("megatron.core.transformer.multi_latent_attention:HAVE_TE")
def _mla_without_te():
    """no_te: multi_latent_attention's ``HAVE_TE`` is true when TransformerEngine is absent (its
    extension module imports against a mock), so an ``isinstance(..., TELinear)`` check crashes.
    megatron-core 0.16 needs it; 0.19 already computes ``HAVE_TE = False`` (setting it is a no-op)."""
    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.HAVE_TE = False


@_patches("megatron.core.transformer.dot_product_attention:DotProductAttention.__init__")
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


@_patches("megatron.core.transformer.moe.grouped_gemm_util:grouped_gemm,ops")
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


@_patches("megatron.core.transformer.moe.token_dispatcher:MoEAlltoAllTokenDispatcher.cuda_dtoh_stream,"
          "_maybe_dtoh_and_synchronize")
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


@_patches("megatron.core.tensor_parallel.mappings:_gather_along_first_dim,_reduce_scatter_along_first_dim")
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


@_patches("megatron.core.ssm.gated_delta_net:HAVE_FLA,l2norm,chunk_gated_delta_rule,causal_conv1d_fn",
          "megatron.core.ssm.gated_delta_net.common:HAVE_FLA,l2norm,chunk_gated_delta_rule,causal_conv1d",
          "megatron.core.ssm.gated_delta_net.gdn:chunk_gated_delta_rule,causal_conv1d")
def _gated_delta_net_on_cpu():
    """cpu: megatron-core's GatedDeltaNet (Qwen3-Next's linear attention) refuses to build without
    the ``fla`` package (``HAVE_FLA``) and calls its Triton kernels (GPU only): the L2 norm of q/k,
    the chunked gated delta rule and (0.19) the causal conv1d. On CPU they become plain torch:
    megatron's own ``torch_chunk_gated_delta_rule`` (shown equal to transformers' torch path,
    tests/test_qwen3_next.py), and the two small functions of ``cpu_kernels``; the CUDA-only ``causal_conv1d``
    package (0.16) is set aside so megatron runs its ``nn.Conv1d``. Feature-detected: 0.16 has one
    module ``ssm/gated_delta_net.py``, 0.19.2 a package (``common`` + ``gdn``); whatever module is
    absent is skipped. A GDN module built inside the scope keeps the rule it was built with (0.19
    binds it at construction), so build and run such models inside it (as the bridge does)."""
    for name in ("megatron.core.ssm.gated_delta_net", "megatron.core.ssm.gated_delta_net.common",
                 "megatron.core.ssm.gated_delta_net.gdn"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "__path__"):  # 0.19.2's package: re-exports only, read by nobody
            continue
        torch_rule = getattr(mod, "torch_chunk_gated_delta_rule")
        if not name.endswith(".gdn"):  # the module whose __init__ / forward read these
            mod.HAVE_FLA = True
            mod.l2norm = cpu_kernels.l2norm  # 0.16 leaves the name unbound without fla
        mod.chunk_gated_delta_rule = cpu_kernels.gated_delta_rule(torch_rule)
        if name.endswith((".common", ".gdn")):
            mod.causal_conv1d = cpu_kernels.causal_conv1d
        else:
            mod.causal_conv1d_fn = None


@_patches("megatron.core.models.common.language_module.language_module:LanguageModule._set_attention_backend")
def _keep_attention_env():
    """local_spec: megatron's ``LanguageModule.__init__`` writes TransformerEngine's backend switches
    (NVTE_FLASH_ATTN, NVTE_FUSED_ATTN, NVTE_UNFUSED_ATTN) into ``os.environ`` and asserts when the
    process already holds other values (a host that chose a TE backend). The bridge's models use
    the local spec, which never reads them: building one leaves the environment alone."""
    from megatron.core.models.common.language_module import language_module

    if hasattr(language_module.LanguageModule, "_set_attention_backend"):
        language_module.LanguageModule._set_attention_backend = lambda self: None


def _cpu_mode():
    """cpu: the CUDA-to-CPU redirection above (``_CudaToCpu``), active while the scope is."""
    return _CudaToCpu()


def _eager_compile():
    """cpu: megatron wraps fused helpers in ``torch.compile`` (``megatron.core.jit.jit_fuser``);
    compiling them on CPU costs seconds per shape and gains nothing for a conversion: run them
    eagerly (``torch.compiler.set_stance("force_eager")``), inside the scope only. torch.compile
    itself keeps working, so megatron's helpers and the host's own functions compile elsewhere."""
    if torch.compile is _compile_nothing and "torch._dynamo" not in sys.modules:
        return contextlib.nullcontext()  # under compile_off with nothing compiled yet: nothing to keep eager
    return torch.compiler.set_stance("force_eager")


@functools.lru_cache(maxsize=None)
def _has_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _has_grouped_gemm() -> bool:
    return importlib.util.find_spec("grouped_gemm") is not None


def conditions(device: str) -> list[str]:
    """The conditions that hold for a run on ``device`` ("cpu" or "cuda") in this process."""
    found = ["local_spec"]
    if device == "cpu":
        found.append("cpu")
    if not _has_te():
        found.append("no_te")
    if not _has_grouped_gemm():
        found.append("no_grouped_gemm")
    return found


# condition -> adaptations, in install order. A function with ``_targets`` (``@_patches``) patches
# those attributes; one without returns a context manager entered for the scope's duration.
_ADAPTATIONS = {
    "local_spec": [_keep_attention_env],
    "cpu": [_cpu_cuda_stubs, _cpu_rng_tracker, _cpu_mode, _eager_compile, _cpu_alltoall_dispatcher,
            _gloo_uneven_gather_scatter, _gated_delta_net_on_cpu, _cpu_causal_masks],
    "no_te": [_torch_norm_sequence_parallel, _router_gemm_without_te, _mla_without_te, _local_attention_for_mla],
    "no_grouped_gemm": [_grouped_gemm_fallback],
}

_MISSING = object()
_CHECKED: set = set()
_ACTIVE: list[str] = []  # conditions installed by the scopes now open (outermost first)


_OWNERS: dict = {}  # adaptation -> its resolved owners (modules and classes do not move)


def _owners(fn) -> list[tuple[object, list[str]]]:
    """(object, attribute names) an adaptation declared; owners megatron-core lacks are left out
    (the adaptation's body feature-detects them too)."""
    if fn in _OWNERS:
        return _OWNERS[fn]
    out = _OWNERS[fn] = []
    for target in getattr(fn, "_targets", ()):
        module, _, rest = target.partition(":")
        path, _, names = rest.rpartition(".")
        try:
            owner = importlib.import_module(module)
        except ModuleNotFoundError:
            continue
        for part in filter(None, path.split(".")):
            owner = getattr(owner, part, None)
        if owner is not None:
            out.append((owner, names.split(",")))
    return out


def _install(fn, stack: contextlib.ExitStack) -> None:
    if not hasattr(fn, "_targets"):
        stack.enter_context(fn())
        return
    owners = _owners(fn)
    for owner, names in owners:  # restored in reverse install order, after the later adaptations'
        for name in names:
            stack.callback(_restore, owner, name, vars(owner).get(name, _MISSING))
    if fn in _CHECKED:
        fn()
        return
    before = [(owner, dict(vars(owner))) for owner, _ in owners]
    fn()
    _CHECKED.add(fn)  # the first install in a process checks the declaration
    declared = {(id(o), n) for o, names in owners for n in names}
    for owner, old in before:
        now = vars(owner)
        stray = [n for n in set(old) | set(now) if old.get(n, _MISSING) is not now.get(n, _MISSING)
                 and (id(owner), n) not in declared]
        if stray:
            raise RuntimeError(f"compat.{fn.__name__} changed {getattr(owner, '__name__', owner)}."
                               f"{', '.join(sorted(stray))} without declaring it in @_patches: it "
                               f"would not be restored")


def _restore(owner, name: str, value) -> None:
    if value is _MISSING:
        if name in vars(owner):
            delattr(owner, name)
    else:
        setattr(owner, name, value)


@contextlib.contextmanager
def scope(device: str):
    """Install the adaptations a run on ``device`` ("cpu" or "cuda") needs, for the duration of
    the ``with`` block; on exit every patched attribute is restored and the CPU mode is left.
    Nestable: an inner scope installs only the conditions no enclosing scope has installed."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"compat.scope: device must be 'cpu' or 'cuda', got {device!r}")
    wanted = [c for c in conditions(device) if c not in _ACTIVE]
    with contextlib.ExitStack() as stack:
        for cond in wanted:
            for fn in _ADAPTATIONS[cond]:
                _install(fn, stack)
        _ACTIVE.extend(wanted)
        try:
            yield wanted
        finally:
            del _ACTIVE[len(_ACTIVE) - len(wanted):]


def active() -> list[str]:
    """The conditions installed by the scopes now open."""
    return list(_ACTIVE)


def scoped_iter(iterable, device: str):
    """Iterate ``iterable`` (a generator of ours) inside ``scope(device)``, leaving the scope
    while the caller holds each item: the host's code between items runs outside it."""
    it = iter(iterable)
    while True:
        with scope(device):
            try:
                item = next(it)
            except StopIteration:
                return
        yield item


def _compile_nothing(model=None, **kwargs):
    return model if model is not None else (lambda fn: fn)


@contextlib.contextmanager
def compile_off():
    """For processes the library owns -- the CLI, the verification workers, the test pool -- never
    entered by library entry points (a host keeps its torch.compile): ``torch.compile`` returns the
    function unchanged while the block runs. megatron decorates its fused helpers with it when its
    modules are imported (``megatron.core.jit.jit_fuser``); the first decoration imports
    TorchInductor (seconds of start-up) for helpers a conversion runs eagerly anyway. Helpers
    decorated inside the block stay plain functions for the life of the process."""
    original = torch.compile
    torch.compile = _compile_nothing
    try:
        yield
    finally:
        torch.compile = original
