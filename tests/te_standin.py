"""A stand-in for TransformerEngine's Python API, used ONLY to obtain the sharded-state-dict keys and
shapes of megatron-core's TransformerEngine-spec models -- never for numerics (nothing here computes).

TransformerEngine cannot be installed here (its torch extension has no binary wheel), so
megatron-core's TE wrappers (``megatron/core/extensions/transformer_engine.py``: TELinear,
TELayerNormColumnParallelLinear, TEColumnParallelLinear, TERowParallelLinear, TEGroupedLinear,
TEDotProductAttention, TENorm ...) are defined on top of ``te.pytorch.*`` base classes that do not
exist. ``te_spec()`` puts a small fake ``transformer_engine`` package into ``sys.modules`` whose base
classes register the parameters TransformerEngine 2.x registers (same names, same per-rank shapes,
an ``_extra_state`` like TE's: an empty uint8 tensor for modules, a pickled ``{}`` for the op-based
norms), executes megatron-core's OWN extension module and TE spec provider against it (fresh module
objects, the installed ones are not modified), and points megatron's spec builders at them for the
duration of the context. So megatron's own wrappers, layer specs, TransformerLayer/MLP/MoE/MLA code
and their ``sharded_state_dict`` methods produce the keys; only the leaf parameter registration is
ours. Everything is restored on exit.
"""

from __future__ import annotations

import contextlib
import importlib.util
import pickle
import sys
import types
from unittest import mock

import torch

TE_VERSION = "2.9.0"  # the TE release emulated (op-based norms with _extra_state; TEGroupedLinear)


def _shape(n, tp):
    assert n % tp == 0, (n, tp)
    return n // tp


class _Module(torch.nn.Module):
    """Base of TE's modules (``TransformerEngineBaseModule``): non-FP8 extra state is an empty uint8
    tensor (``get_extra_state``), and FP8 bookkeeping megatron's wrappers read."""

    def __init__(self):
        super().__init__()
        self.fp8_meta = {"fp8_checkpoint": False, "recipe": None}
        self.fp8 = self.fp8_calibration = self.fp8_parameters = False

    def get_extra_state(self):
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state):
        pass

    def _param(self, name, *shape, dtype=None, device=None):
        self.register_parameter(name, torch.nn.Parameter(torch.empty(*shape, dtype=dtype, device="cpu")))


class Linear(_Module):
    def __init__(self, in_features, out_features, *, tp_size=1, bias=True, parallel_mode=None,
                 params_dtype=None, tp_group=None, sequence_parallel=False, **_):
        super().__init__()
        self.in_features, self.out_features, self.use_bias = in_features, out_features, bias
        self.tp_size, self.tp_group, self.parallel_mode = tp_size, tp_group, parallel_mode
        self.sequence_parallel = sequence_parallel
        out = _shape(out_features, tp_size) if parallel_mode == "column" else out_features
        inp = _shape(in_features, tp_size) if parallel_mode == "row" else in_features
        self._register(inp, out, params_dtype)

    def _register(self, inp, out, dtype):
        self._param("weight", out, inp, dtype=dtype)
        if self.use_bias:
            self._param("bias", out, dtype=dtype)


class LayerNormLinear(Linear):
    def __init__(self, in_features, out_features, *, normalization="LayerNorm", **kw):
        self.normalization = normalization
        super().__init__(in_features, out_features, **kw)

    def _register(self, inp, out, dtype):
        self._param("layer_norm_weight", inp, dtype=dtype)
        if self.normalization != "RMSNorm":
            self._param("layer_norm_bias", inp, dtype=dtype)
        super()._register(inp, out, dtype)


class GroupedLinear(_Module):
    def __init__(self, num_gemms, in_features, out_features, *, tp_size=1, bias=True, parallel_mode=None,
                 params_dtype=None, **_):
        super().__init__()
        self.num_gemms, self.use_bias = num_gemms, bias
        self.in_features, self.out_features = in_features, out_features
        out = _shape(out_features, tp_size) if parallel_mode == "column" else out_features
        inp = _shape(in_features, tp_size) if parallel_mode == "row" else in_features
        for i in range(num_gemms):
            self._param(f"weight{i}", out, inp, dtype=params_dtype)
        if bias:
            for i in range(num_gemms):
                self._param(f"bias{i}", out, dtype=params_dtype)


class DotProductAttention(_Module):
    def __init__(self, num_attention_heads=None, *args, softmax_type="vanilla", tp_size=1, params_dtype=None,
                 **kwargs):
        super().__init__()
        if softmax_type == "learnable":  # TE's learnable softmax offset: one per local head
            self.softmax_offset = torch.nn.Parameter(torch.empty(num_attention_heads // tp_size, dtype=params_dtype))


class _NormOp(torch.nn.Module):
    """TE 2.x's op-based norms (``transformer_engine.pytorch.ops.BasicOperation``): extra state is a
    pickled dict of quantizer state, ``{}`` without FP8."""

    def __init__(self, hidden_size=None, eps=1e-5, params_dtype=None, normalized_shape=None, **_):
        super().__init__()
        n = hidden_size or normalized_shape
        self.weight = torch.nn.Parameter(torch.empty(n, dtype=params_dtype))
        if self.has_bias:
            self.bias = torch.nn.Parameter(torch.empty(n, dtype=params_dtype))

    def get_extra_state(self):
        return torch.frombuffer(bytearray(pickle.dumps({})), dtype=torch.uint8)

    def set_extra_state(self, state):
        pass


class RMSNorm(_NormOp):
    has_bias = False


class LayerNorm(_NormOp):
    has_bias = True


def _fake_te() -> dict:
    """``sys.modules`` entries of the fake package: the classes above where megatron subclasses or
    instantiates TE, MagicMock for whatever else megatron touches at import (recipes, fp8 state)."""
    root = types.ModuleType("transformer_engine")
    root.__version__ = TE_VERSION
    pt = types.ModuleType("transformer_engine.pytorch")
    for cls in (Linear, LayerNormLinear, GroupedLinear, DotProductAttention, RMSNorm, LayerNorm):
        setattr(pt, cls.__name__, cls)
    pt.LayerNormMLP = mock.MagicMock(name="LayerNormMLP")
    pt.ops = mock.MagicMock(name="ops")
    pt.distributed = types.ModuleType("transformer_engine.pytorch.distributed")
    pt.distributed.CudaRNGStatesTracker = type("CudaRNGStatesTracker", (), {})
    pt.distributed.checkpoint = mock.MagicMock(name="checkpoint")
    fp8 = types.ModuleType("transformer_engine.pytorch.fp8")
    fp8.FP8GlobalStateManager, fp8.fp8_autocast, fp8.fp8_model_init = mock.MagicMock(), mock.MagicMock(), mock.MagicMock()
    pt.fp8 = fp8
    common = types.ModuleType("transformer_engine.common")
    recipe = types.ModuleType("transformer_engine.common.recipe")
    recipe.DelayedScaling = type("DelayedScaling", (), {"__init__": lambda self, *a, **k: None})
    for name in ("Format", "MXFP8BlockScaling", "Float8CurrentScaling", "Float8BlockScaling", "Recipe",
                 "NVFP4BlockScaling"):
        setattr(recipe, name, mock.MagicMock(name=name))
    common.recipe = recipe
    root.pytorch, root.common = pt, common
    router = types.ModuleType("transformer_engine.pytorch.router")  # fused MoE kernels, imported by name
    for name in ("fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss", "fused_topk_with_score_function"):
        setattr(router, name, mock.MagicMock(name=name))
    return {"transformer_engine": root, "transformer_engine.pytorch.router": router, "transformer_engine.pytorch": pt,
            "transformer_engine.pytorch.fp8": fp8, "transformer_engine.pytorch.distributed": pt.distributed,
            "transformer_engine.common": common, "transformer_engine.common.recipe": recipe}


def _exec_copy(module_name: str, alias: str) -> types.ModuleType:
    """A fresh module object executed from ``module_name``'s source file (the installed module is
    left as it is)."""
    spec = importlib.util.find_spec(module_name)
    mod = importlib.util.module_from_spec(importlib.util.spec_from_file_location(alias, spec.origin))
    sys.modules[alias] = mod  # dataclasses look their module up (te_spec's patch.dict removes it again)
    mod.__spec__.loader.exec_module(mod)
    return mod


EXT = "megatron.core.extensions.transformer_engine"
PROVIDER = "megatron.core.extensions.transformer_engine_spec_provider"


@contextlib.contextmanager
def te_spec():
    """Within: megatron-core builds TransformerEngine-spec models on the stand-in (see the module
    docstring). Yields the fresh extension module."""
    import megatron.core.utils as mutils
    from megatron.core.models.gpt import gpt_layer_specs

    real_ext = importlib.import_module(EXT)
    saved_version = mutils._te_version
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(sys.modules, _fake_te()))
        mutils._te_version = None
        stack.callback(setattr, mutils, "_te_version", saved_version)
        ext = _exec_copy(EXT, "mcore_bridge_te_standin_ext")
        # megatron modules that imported TE wrappers at their import (gpt_layer_specs, MLA's
        # isinstance/identity checks, moe specs ...) see the stand-in-based wrappers instead
        names = [n for n in dir(real_ext) if n.startswith("TE") or n in ("HAVE_TE",)]
        stack.enter_context(mock.patch.dict(sys.modules, {EXT: ext}))
        provider = _exec_copy(PROVIDER, "mcore_bridge_te_standin_provider")
        stack.enter_context(mock.patch.dict(sys.modules, {PROVIDER: provider}))
        for mname, mod in list(sys.modules.items()):
            if not mname.startswith("megatron.") or mod is None or mname in (EXT, PROVIDER):
                continue
            # the installed wrappers, or None where a module's own `import transformer_engine` failed
            hits = [n for n in names if n != "HAVE_TE" and n in vars(mod) and hasattr(ext, n)
                    and (vars(mod)[n] is getattr(real_ext, n, object()) or vars(mod)[n] is None)]
            for n in hits:
                stack.enter_context(mock.patch.object(mod, n, getattr(ext, n)))
            if hits and "HAVE_TE" in vars(mod):
                stack.enter_context(mock.patch.object(mod, "HAVE_TE", True))
        stack.enter_context(mock.patch.object(gpt_layer_specs, "TESpecProvider", provider.TESpecProvider,
                                              create=True))
        stack.enter_context(mock.patch.object(gpt_layer_specs, "TENorm", ext.TENorm, create=True))
        yield ext
