"""What a LoRA adapter is, in both worlds, derived from a family's weight table.

``LoraSpec`` holds the hyper-parameters (rank, alpha, dropout, rsLoRA) and the targets as the
user spelled them: ``all-linear``, megatron module names (``linear_qkv,linear_proj,linear_fc1,
linear_fc2``) or HF ones (``q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj``). A target
names a kind of linear wherever it occurs: attention, dense MLPs, shared and routed experts.

``AdapterFamily`` turns the family's linear rules into rules for the LoRA factors, with no second
table: for a linear ``X`` mapped to HF modules ``m_1..m_n`` by transform T,
  column-parallel  A: X.lora_A <- m_i.lora_A  (one shared A, or stacked per projection)
                   B: X.lora_B <- m_i.lora_B  (T itself, or T around a block-structured B)
  row-parallel     A: split like the weight (ROW)          B: replicated
so the loader, the planner and the exporter treat adapters exactly like weights.
"""

from __future__ import annotations

import dataclasses
import re

from ..families.base import Family, Rule, UnsupportedConfig
from .layer import ADAPTER

ALL_LINEAR = "all-linear"


from ..errors import AdapterError  # noqa: F401  (re-exported: its home before errors.py)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    rslora: bool = False
    targets: tuple[str, ...] = (ALL_LINEAR,)
    per_projection: bool = False  # fused modules carry one A per HF projection (stacked A, block B)
    # routed experts' targets when they differ from ``targets`` (a PEFT adapter on transformers 5
    # names them apart, as target_parameters); None: the same kinds as ``targets``
    expert_targets: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.r < 1:
            raise AdapterError(f"LoRA rank r={self.r}: must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"LoRA dropout={self.dropout}: must be in [0, 1)")
        for field in ("targets", "expert_targets"):
            value = getattr(self, field)
            if isinstance(value, str):
                value = tuple(t.strip() for t in value.split(",") if t.strip())
            object.__setattr__(self, field, tuple(value) if value is not None else None)
        if not self.targets and not self.expert_targets:
            raise AdapterError("LoRA targets are empty: give all-linear or module names")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r ** 0.5 if self.rslora else self.r)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoraSpec":
        return cls(**d)


def leaf(module_path: str) -> str:
    return module_path.rsplit(".", 1)[-1]


def linear_rules(family: Family) -> list[Rule]:
    """The family's rules for the weights LoRA can modify: megatron linears (``*.linear_*.weight``)
    and the modules the family offers by name only (``Family.lora_named_only``, e.g. an MoE router)."""
    return [r for r in family.rules()
            if r.export and r.mcore.endswith(".weight")
            and (re.search(r"(^|\.)linear_\w+\.weight$", r.mcore)
                 or leaf(r.mcore[: -len(".weight")]) in family.lora_named_only)]


def target_kinds(family: Family, targets) -> set[str]:
    """The megatron kinds (``linear_qkv`` ..., ``router``) ``targets`` select in this family."""
    rules = linear_rules(family)
    hf_of: dict[str, set[str]] = {}  # megatron kind -> HF module names behind it
    for r in rules:
        hf_of.setdefault(leaf(r.mcore[: -len(".weight")]), set()).update(
            leaf(n[: -len(".weight")]) for n in r.hf)
    return _kinds(family, targets, hf_of)


def _kinds(family: Family, targets, hf_of: dict[str, set[str]]) -> set[str]:
    kinds, hf_named = set(), set()
    if ALL_LINEAR in targets:
        kinds = set(hf_of) - set(family.lora_named_only)
    for t in targets:
        if t == ALL_LINEAR:
            continue
        if t in hf_of:
            kinds.add(t)
            continue
        owners = [k for k, names in hf_of.items() if t in names]
        if not owners:
            if t in family.lora_absent:
                raise AdapterError(f"target {t!r}: {family.name} {family.lora_absent[t]}")
            if t in ("lm_head", "embed_tokens", "output_layer", "word_embeddings"):
                raise AdapterError(f"target {t!r}: LoRA on embeddings / the output layer is not supported; "
                                   f"use all-linear or the layers' linear modules")
            valid = sorted(hf_of) + sorted(set().union(*hf_of.values()))
            raise AdapterError(f"unknown LoRA target {t!r} for {family.name}: choose all-linear or from "
                               f"{', '.join(valid)}")
        kinds.update(owners)
        hf_named.add(t)
    for k in kinds:  # HF spelling of a fused module must name every projection it fuses
        part = hf_of[k] & hf_named
        if part and part != hf_of[k]:
            raise AdapterError(f"targets {sorted(part)} without {sorted(hf_of[k] - part)}: megatron fuses "
                               f"{sorted(hf_of[k])} into {k}; target all of them or none")
    return kinds


class AdapterFamily(Family):
    """The family's table restricted to LoRA factors of the targeted linears (same layers, experts
    and layout arithmetic as the base family)."""

    def __init__(self, base: Family, spec: LoraSpec):
        self.base, self.spec, self.cfg = base, spec, base.cfg
        self.name = f"{base.name}+lora"
        self.kinds = target_kinds(base, spec.targets)
        self.expert_kinds = self.kinds if spec.expert_targets is None else target_kinds(base, spec.expert_targets)

    num_layers = property(lambda self: self.base.num_layers)
    first_stage_prefixes = property(lambda self: self.base.first_stage_prefixes)
    num_experts = property(lambda self: self.base.num_experts)

    def is_moe_layer(self, layer: int) -> bool:
        return self.base.is_moe_layer(layer)

    def model_settings(self) -> dict:
        return self.base.model_settings()

    @property
    def architecture(self):
        return self.base.architecture

    def targeted(self) -> list[Rule]:
        """The base family's rules of the linears this adapter covers."""
        return [r for r in linear_rules(self.base)
                if leaf(r.mcore[: -len(".weight")]) in (self.expert_kinds if r.expert else self.kinds)]

    def rules(self) -> list[Rule]:
        out = []
        for r in self.targeted():
            module = r.mcore[: -len(".weight")]
            hf_mods = [n[: -len(".weight")] for n in r.hf]
            a_t, b_t = factor_transforms(r, self.spec.per_projection and not r.expert)
            for name, t in (("lora_A", a_t), ("lora_B", b_t)):
                out.append(Rule(f"{module}.{name}.{ADAPTER}.weight", tuple(f"{m}.{name}.weight" for m in hf_mods),
                                t, when=r.when))
        return out


def factor_transforms(r: Rule, per_projection: bool):
    """(A transform, B transform) for the LoRA factors of the linear mapped by ``r``."""
    t = r.transform
    factors = t.lora_factor_transforms(len(r.hf), per_projection)
    if factors is not None:
        return factors
    raise UnsupportedConfig(f"no LoRA mapping for {r.mcore} ({t!r})")
