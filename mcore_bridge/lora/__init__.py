"""LoRA adapters: megatron-side layer (``layer``), their mapping to PEFT's names (``spec``), PEFT
files (``peft_io``), and ``apply_lora`` which wraps a built model's targeted linears."""

from __future__ import annotations

import contextlib
import re
import zlib
from collections.abc import Mapping

import torch

from .layer import ADAPTER, LoraLinear, RouterLora
from .spec import AdapterError, AdapterFamily, LoraSpec, factor_transforms

__all__ = ["ADAPTER", "AdapterError", "AdapterFamily", "LoraLinear", "LoraSpec", "MergedState", "apply_lora",
           "factor_hf_shapes", "is_lora_param", "base_hf_name"]

_LORA = re.compile(r"\.lora_[AB]\.")


def is_lora_param(name: str) -> bool:
    return bool(_LORA.search(name))


def base_hf_name(factor_name: str) -> str:
    """``m.lora_A.weight`` -> ``m.weight``."""
    return _LORA.sub(".", factor_name)


def factor_hf_shapes(name: str, r: int, base_shape) -> tuple[int, int]:
    """HF shape of a LoRA factor of a weight of ``base_shape`` [out, in]."""
    return (r, base_shape[1]) if ".lora_A." in name else (base_shape[0], r)


def _init(seed_key: str, shape, bound: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(seed_key.encode()))
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).mul_(bound).float()


def _init_factors(module, rule, item, groups, hf_tensors, spec, random_b, per_projection):
    """Seeded factors in HF space, sharded like the parameters (see ``apply_lora``)."""
    _, tp, tp_rank = groups.split(rule)
    base_shapes = [tuple(hf_tensors[n][0]) for n in item.unit.hf_names]
    a_t, b_t = factor_transforms(rule, per_projection)
    names = [n_.replace(".weight", "") for n_ in item.unit.hf_names]
    params = (module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight) if isinstance(module, LoraLinear) \
        else (module.A, module.B)  # the raw factors (a LoraLinear's B property is masked)
    with torch.no_grad():
        for param, t, which in ((params[0], a_t, "A"), (params[1], b_t, "B")):
            pieces = []
            for m, s in zip(names, base_shapes):
                shape = (spec.r, s[1]) if which == "A" else (s[0], spec.r)
                key = names[0] if which == "A" and not per_projection else m  # shared A: one seed
                if which == "B" and not random_b:
                    pieces.append(torch.zeros(shape))
                else:
                    pieces.append(_init(f"{key}.lora_{which}", shape, shape[1] ** -0.5))
            param.copy_(t.split(pieces, tuple(param.shape), tp, tp_rank))


def apply_lora(models, family, items, groups, hf_tensors: dict, spec: LoraSpec, random_b: bool = False,
               freeze_base: bool = True) -> list[LoraLinear]:
    """Wrap this rank's targeted linears in ``LoraLinear``. ``items``: this rank's ``plan.LocalItem``
    of the base weights; ``groups``: ``export.Groups``; ``hf_tensors``: HF name -> (shape, dtype).

    Factors are initialised in HF space from a seed per tensor and then sharded, so every layout
    starts from the same adapter: A uniform in +-1/sqrt(in) (PEFT's default), B zero (or, with
    ``random_b``, uniform in +-1/sqrt(r): a non-trivial adapter for tests)."""
    targeted = {r.mcore for r in AdapterFamily(family, spec).targeted()}
    wrapped = []
    for item in items:
        rule = item.unit.rule
        module_path = item.param[: -len(".weight")]
        if rule.mcore not in targeted:
            continue
        per_projection = spec.per_projection and not rule.expert  # experts: one A (see peft_io)
        if rule.transform.parallel_mode == "replicated":  # a replicated weight (the MoE router)
            module = RouterLora(models[item.chunk].get_submodule(module_path), spec.r, spec.alpha, spec.rslora)
            _init_factors(module, rule, item, groups, hf_tensors, spec, random_b, False)
            wrapped.append(module)
            continue
        try:
            base = models[item.chunk].get_submodule(module_path)
        except AttributeError:
            raise AdapterError(f"{module_path}: not a module LoRA can wrap (grouped experts keep all experts "
                               f"in one tensor: build the model without grouped_experts)") from None
        _, tp, tp_rank = groups.split(rule)
        base_shapes = [tuple(hf_tensors[n][0]) for n in item.unit.hf_names]
        n = len(base_shapes)
        blocks, block_rows = 1, None
        if per_projection and n > 1 and rule.transform.tp_split:
            labels = [torch.full((s[0], 1), float(i)) for i, s in enumerate(base_shapes)]
            block_rows = rule.transform.split(labels, (base.weight.shape[0], 1), tp, tp_rank)[:, 0]
            blocks = n
        module = LoraLinear(base, spec.r, spec.alpha, spec.dropout, spec.rslora, blocks,
                            block_rows.to(base.weight.device) if block_rows is not None else None,
                            swiglu=rule.transform.swiglu)
        _init_factors(module, rule, item, groups, hf_tensors, spec, random_b, per_projection)
        parent_path, _, name = module_path.rpartition(".")
        setattr(models[item.chunk].get_submodule(parent_path), name, module)
        wrapped.append(module)
    if freeze_base:
        for m in models:
            for pname, p in m.named_parameters():
                p.requires_grad_(is_lora_param(pname))
    return wrapped


class MergedState(Mapping):
    """A weights view ((chunk, name) -> shard) in which each LoRA-wrapped weight reads as
    ``W + scale * B @ A``, computed in fp32 from this rank's shards when asked for and cast to
    ``dtype`` (default: the weight's). The model's own parameters are never modified."""

    def __init__(self, state: dict, models, dtype: torch.dtype | None = None):
        self.state, self.dtype = state, dtype
        self.modules = {(c, f"{name}.weight"): lora_of(mod) for c, m in enumerate(models)
                        for name, mod in m.named_modules() if lora_of(mod) is not None}

    def __getitem__(self, key):
        t = self.state[key]
        module = self.modules.get(key)
        if module is None:
            return t
        with torch.no_grad():
            return (t.detach().float() + module.delta()).to(self.dtype or t.dtype)

    def __iter__(self):
        return iter(self.state)

    def __len__(self):
        return len(self.state)


def lora_of(module):
    """The LoRA that modifies ``module``'s weight: the module itself (``LoraLinear``), a router's
    ``RouterLora``, or None."""
    return module if isinstance(module, LoraLinear) else getattr(module, "_lora", None)


@contextlib.contextmanager
def merged_checkpoint(models):
    """Within it, the chunks' ``sharded_state_dict`` holds merged weights (new tensors; the factors
    are left out by the caller): nothing is added to or subtracted from the model's weights."""
    modules = [m for chunk in models for m in chunk.modules() if isinstance(m, LoraLinear)]
    routers = [m for chunk in models for m in chunk.modules() if isinstance(getattr(m, "_lora", None), RouterLora)]
    for m in modules:
        m.merged_checkpoint = True
    for r in routers:
        r.sharded_state_dict = _merged_router_state(r)  # an instance attribute, deleted below
    try:
        yield
    finally:
        for m in modules:
            m.merged_checkpoint = False
        for r in routers:
            del r.sharded_state_dict


def _merged_router_state(router):
    plain = type(router).sharded_state_dict.__get__(router)

    def sharded_state_dict(prefix="", sharded_offsets=(), metadata=None):
        out = plain(prefix, sharded_offsets, metadata)
        with torch.no_grad():
            out[prefix + "weight"].data = (router.weight.float() + router._lora.delta()).to(router.weight.dtype)
        return out

    return sharded_state_dict


def only_factors(state: dict, keep: bool = True) -> dict:
    """A (nested) sharded state dict reduced to the LoRA factors (``keep=False``: without them)."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out[k] = only_factors(v, keep)
        elif is_lora_param(k) == keep:
            out[k] = v
    return out
