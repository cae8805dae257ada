"""PEFT adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensors are named as PEFT saves them, ``base_model.model.<module>.lora_{A,B}.weight``; inside the
bridge the prefix is dropped and routed experts are seen one module per expert
(``mlp.experts.{e}.gate_proj.lora_A.weight``), like the weights. On disk the experts take one of
two forms:
  * ``parameters`` (default; transformers 5 keeps experts as stacked parameters, which PEFT
    targets through ``target_parameters``): per MoE layer ``mlp.experts[.base_layer].lora_A``
    ``[E*r, in]`` (expert-major rows) and ``lora_B`` ``[out, r*E]`` (column ``k*E + e``: rank-major),
    gate_up wrapped inside down when both are targeted, hence ``base_layer``. PEFT 0.21 rewrites
    ``gate_proj/up_proj/down_proj`` in ``target_modules`` of some MoE model types into expert
    parameters (doubling the gate_up rank), so the other MLP linears are named as
    ``target_parameters`` ``gate_proj.weight``...: same tensors, no rewrite.
  * ``modules``: one module per expert, as transformers 4 built them (what most adapters trained
    before transformers 5 hold).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from .. import hf_io as hfio
from ..errors import UsageError
from .spec import ALL_LINEAR, AdapterError, LoraSpec

PARAMETERS, MODULES = "parameters", "modules"
EXPERT_FORMATS = (PARAMETERS, MODULES)
MLP_KINDS = ("linear_fc1", "linear_fc2")
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."

# adapter_config.json settings the bridge cannot carry, with what would be lost.
_REFUSED = {
    "use_dora": "DoRA (weight-decomposed LoRA) adds a magnitude vector megatron's layer does not have",
    "modules_to_save": "modules_to_save holds full trained copies of whole modules, not LoRA factors",
    "layers_to_transform": "LoRA on only some layers (layers_to_transform)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights)",
    "trainable_token_indices": "trainable token embeddings",
}


def is_adapter_dir(path) -> bool:
    return (Path(path) / CONFIG).exists()


def read_config(path) -> dict:
    path = Path(path)
    file = path / CONFIG
    if not file.exists():
        raise AdapterError(f"--adapters {path}: no {CONFIG} (not a PEFT adapter directory)")
    cfg = hfio.read_json(file)
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"{file}: peft_type={cfg.get('peft_type')!r}; only LoRA adapters convert")
    for key, what in _REFUSED.items():
        if cfg.get(key) not in (None, False, {}, [], ""):
            raise AdapterError(f"{file}: {key}={cfg[key]!r}: {what} cannot be represented in megatron's LoRA")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{file}: bias={cfg['bias']!r}: trained biases are not part of a LoRA the bridge maps")
    return cfg


def _expert_param(p: str) -> str | None:
    """"linear_fc1"/"linear_fc2" for a target_parameters entry naming stacked experts, else None."""
    last = p.rsplit(".", 1)[-1]
    return {"gate_up_proj": "linear_fc1", "down_proj": "linear_fc2"}.get(last) if "experts" in p or p == last else None


def spec_from_config(cfg: dict, per_projection: bool = False) -> LoraSpec:
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        if targets != ALL_LINEAR:
            raise AdapterError(f"target_modules={targets!r}: a regular expression; list the module names")
        targets = [targets]
    params = cfg.get("target_parameters") or []
    experts = None
    if params:  # transformers-5 form: experts (and maybe other linears) named as parameters
        experts = tuple(sorted({k for p in params if (k := _expert_param(p))}))
        for p in params:
            if _expert_param(p):
                continue
            if not p.endswith(".weight"):
                raise AdapterError(f"target_parameters entry {p!r}: not a linear weight or stacked experts")
            targets = [*targets, p[: -len(".weight")].rsplit(".", 1)[-1]]
    return LoraSpec(r=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", 8)),
                    dropout=float(cfg.get("lora_dropout", 0.0)), rslora=bool(cfg.get("use_rslora", False)),
                    targets=tuple(sorted(set(targets))), per_projection=per_projection, expert_targets=experts)


class Adapter:
    """An adapter's tensors in memory under the bridge's HF names (the checkpoint interface the
    loader reads: ``names``, ``info(n).shape``, ``read(n, region)``)."""

    def __init__(self, path: Path, config: dict, tensors: dict[str, torch.Tensor]):
        self.path, self.config, self.tensors = path, config, tensors

    def names(self):
        return list(self.tensors)

    def info(self, name):
        t = self.tensors[name]
        return hfio.TensorInfo(name, self.path / WEIGHTS, t.dtype, tuple(t.shape), t.numel() * t.element_size())

    def read(self, name, region=None):
        t = self.tensors[name]
        return t if region is None else t[region]

    def close(self):
        pass


def open_adapter(path, base_family) -> tuple[LoraSpec, Adapter]:
    """The adapter's spec and tensors under the bridge's HF names for the model ``base_family``."""
    from .spec import AdapterFamily

    adapter = _read(path)
    adapter.tensors = renamed(adapter.tensors, base_family, to_file=False)
    spec = spec_from_config(adapter.config)
    if spec.expert_targets is None and not any(_PER_EXPERT.search(n) for n in adapter.names()):
        spec = dataclasses.replace(spec, expert_targets=())  # a transformers-5 adapter without experts
    adapter.tensors = unstack_experts(adapter.tensors, AdapterFamily(base_family, spec))
    return spec, adapter


_PER_EXPERT = re.compile(r"\.experts\.\d+\.")


def _read(path) -> Adapter:
    path = Path(path)
    cfg = read_config(path)
    file = path / WEIGHTS
    if not file.exists():
        pickled = path / "adapter_model.bin"
        hint = (f"; {pickled.name} is a pickle: re-save it with safetensors" if pickled.exists() else "")
        raise AdapterError(f"{path}: no {WEIGHTS}{hint}")
    ckpt = hfio.HFCheckpoint(path, files=[file], config=cfg)
    tensors = {}
    for name in ckpt.names():
        short = name[len(PREFIX):] if name.startswith(PREFIX) else name
        short = short.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        tensors[short] = ckpt.read(name).clone()
    ckpt.close()
    return Adapter(path, cfg, tensors)


def _expert_rules(family) -> dict[str, tuple]:
    """kind -> (A rule, B rule) of the routed experts' LoRA factors in an ``AdapterFamily``."""
    out: dict[str, list] = {}
    for r in family.rules():
        if r.expert:
            kind = r.mcore.split(".lora_")[0].rsplit(".", 1)[-1]
            out.setdefault(kind, [None, None])[0 if ".lora_A." in r.mcore else 1] = r
    return {k: tuple(v) for k, v in out.items()}


def _expert_modules(family):
    """(layer, module key prefix per kind) for every MoE layer with targeted experts."""
    rules = _expert_rules(family)
    if not rules:
        return rules, []
    base = family.base
    module = base.hf_layer_prefix + base.stacked_hf[0].rsplit(".", 1)[0]
    both = len(rules) == 2
    keys = {k: module + (".base_layer" if both and k == "linear_fc1" else "") for k in rules}
    layers = [layer for layer in range(base.num_layers) if base.is_moe_layer(layer)]
    return rules, [(layer, {k: v.replace("{L}", str(layer)) for k, v in keys.items()}) for layer in layers]


def stack_experts(tensors: dict[str, torch.Tensor], family) -> dict[str, torch.Tensor]:
    """Per-expert factors -> PEFT's stacked ``parameters`` form (see the module docstring)."""
    rules, layers = _expert_modules(family)
    out = dict(tensors)
    n = family.base.num_experts
    for layer, keys in layers:
        for kind, (a_rule, b_rule) in rules.items():
            a = [out.pop(a_rule.hf_names(layer, e)[0]) for e in range(n)]
            for e in range(n):
                for extra in a_rule.hf_names(layer, e)[1:]:  # gate and up share one A
                    out.pop(extra)
            b = [torch.cat([out.pop(name) for name in b_rule.hf_names(layer, e)], dim=0) for e in range(n)]
            out[keys[kind] + ".lora_A.weight"] = torch.cat(a, dim=0)
            out[keys[kind] + ".lora_B.weight"] = torch.stack(b, dim=-1).reshape(b[0].shape[0], -1)
    return out


def unstack_experts(tensors: dict[str, torch.Tensor], family) -> dict[str, torch.Tensor]:
    """PEFT's stacked ``parameters`` form -> per-expert factors; a ``modules`` adapter passes as is."""
    rules, layers = _expert_modules(family)
    out = dict(tensors)
    n, r = family.base.num_experts, family.spec.r
    for layer, keys in layers:
        for kind, (a_rule, b_rule) in rules.items():
            a_key, b_key = keys[kind] + ".lora_A.weight", keys[kind] + ".lora_B.weight"
            if a_key not in out or b_key not in out:
                continue  # per-expert (modules) form, or missing: strict accounting will say which
            a, b = out.pop(a_key), out.pop(b_key)
            if a.shape[0] != n * r or b.shape[1] != n * r:
                raise AdapterError(f"{a_key}: {tuple(a.shape)} / {tuple(b.shape)} is not {n} experts x rank {r}")
            b = b.reshape(b.shape[0], r, n)
            for e in range(n):
                for name in a_rule.hf_names(layer, e):
                    out[name] = a[e * r:(e + 1) * r]
                rows = torch.chunk(b[:, :, e], len(b_rule.hf_names(layer, e)), dim=0)
                for name, rows_e in zip(b_rule.hf_names(layer, e), rows):
                    out[name] = rows_e.contiguous()
    return out


def renamed(tensors: dict, base_family, to_file: bool) -> dict:
    """Checkpoint module names <-> the module names transformers 5 builds (``hf_module_renames``)."""
    pairs = getattr(base_family, "hf_module_renames", {}).items()
    if not pairs:
        return tensors
    out = {}
    for name, t in tensors.items():
        for disk, built in pairs:
            a, b = (disk, built) if to_file else (built, disk)
            name = name.replace(a, b)
        out[name] = t
    return out


def peft_targets(family, experts: str) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) naming what ``family`` (an ``AdapterFamily``) covers."""
    modules, params = set(), set()
    moe = bool(family.base.num_experts)
    for r in family.targeted():
        kind = r.mcore[: -len(".weight")].rsplit(".", 1)[-1]
        leaves = {n[: -len(".weight")].rsplit(".", 1)[-1] for n in r.hf}
        if kind in family.base.lora_named_only:  # a parameter for PEFT in every form (not a Linear module)
            params.add(family.base.lora_named_only[kind])
        elif r.expert and experts == PARAMETERS:
            params.add(family.base.stacked_hf[0 if kind == "linear_fc1" else 1])
        elif moe and experts == PARAMETERS and kind in MLP_KINDS:
            params.update(f"{x}.weight" for x in leaves)
        else:
            modules.update(leaves)
    return sorted(modules), sorted(params)


def write_adapter(stage: Path, tensors: dict[str, torch.Tensor], family, base_model: str | None,
                  experts: str = PARAMETERS):
    """Write ``tensors`` (the bridge's HF names) and a config PEFT's ``from_pretrained`` loads as is."""
    if experts not in EXPERT_FORMATS:
        raise UsageError(f"peft experts format {experts!r}: choose {', '.join(EXPERT_FORMATS)}")
    spec = family.spec
    if experts == PARAMETERS:
        tensors = stack_experts(tensors, family)
    tensors = renamed(tensors, family.base, to_file=True)
    hfio.write_shard(stage / WEIGHTS, {PREFIX + n: t.clone() for n, t in tensors.items()})  # shared A: own copies
    modules, params = peft_targets(family, experts)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": spec.r, "lora_alpha": spec.alpha, "use_rslora": spec.rslora,
        # PEFT's parameter wrapper refuses dropout; it only matters to further training with PEFT
        "lora_dropout": 0.0 if params else spec.dropout,
        "target_modules": modules, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
    }
    if params:
        config["target_parameters"] = params
    (stage / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
