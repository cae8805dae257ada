"""The conversion plan: which HF tensors stand behind which megatron parameters, on which rank.

Two views, both plain data:
  * ``inventory`` -- every HF tensor of the model with the pipeline stage that owns it (same on all
    ranks; drives strict accounting, export order and the save plan);
  * ``local_items`` -- this rank's megatron parameters with their HF sources and transform.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from .errors import MappingError  # noqa: F401  (re-exported: its home before errors.py)
from .families.base import Family, Rule, canonical_param_name
from .layout import ParallelLayout


# HF tensors that carry no weights (buffers some old checkpoints saved).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Unit:
    """One megatron parameter (globally) and the HF tensor(s) it corresponds to."""

    rule: Rule
    layer: Optional[int]
    stage: int  # pipeline rank that owns it
    chunk: int  # virtual pipeline chunk on that stage
    expert: Optional[int] = None  # global expert index (expert rules)
    ep_rank: Optional[int] = None  # expert-parallel rank holding that expert

    @property
    def hf_names(self) -> tuple[str, ...]:
        return self.rule.hf_names(self.layer, self.expert)

    @property
    def key(self) -> tuple[str, Optional[int], Optional[int]]:
        return (self.rule.mcore, self.layer, self.expert)

    @property
    def owner(self) -> tuple[int, Optional[int]]:
        """(pipeline stage, expert-parallel rank or None when every EP rank holds it)."""
        return (self.stage, self.ep_rank)


def inventory(family: Family, layout: ParallelLayout) -> list[Unit]:
    """All units of the model in HF order: the first stage's non-layer parameters (embedding, a
    vision tower: ``family.first_stage_prefixes``), layers in order (experts in index order within
    a layer), final norm, output, multi-token-prediction layers (the rest: the last stage)."""
    n = family.num_layers
    first, last = (0, 0), (layout.pp - 1, layout.vpp - 1)
    rules = family.rules()
    prefixes = family.first_stage_prefixes
    head = [Unit(r, None, *first) for r in rules if not r.per_layer and r.mcore.startswith(prefixes)]
    rest = [r for r in rules if not r.per_layer and not r.mcore.startswith(prefixes)]
    per_layer = [r for r in rules if r.per_layer]
    layers = []
    for layer in range(n):
        stage, chunk = layout.layer_owner(n, layer)
        layers += _expand([r for r in per_layer if r.applies(family, layer)], layer, stage, chunk, family, layout)
    tail = _expand(rest, None, *last, family, layout)  # final norm, output; MTP layers (with experts)
    units = head + layers + tail
    if layout.pp == 1:  # a tied output layer only exists as its own parameter under PP
        units = [u for u in units if u.rule.export or u.rule.mcore != "output_layer.weight"]
    return units


def _expand(rs: list[Rule], layer, stage, chunk, family: Family, layout: ParallelLayout) -> list[Unit]:
    """Units of rules ``rs`` (in order), each run of expert rules expanded over the experts in HF
    order: all tensors of expert 0, then expert 1, ..."""
    out, i, experts = [], 0, family.num_experts
    while i < len(rs):
        if not rs[i].expert:
            out.append(Unit(rs[i], layer, stage, chunk))
            i += 1
            continue
        j = i
        while j < len(rs) and rs[j].expert:
            j += 1
        for e in range(experts):
            owner = layout.expert_owner(experts, e)[0]
            out += [Unit(r, layer, stage, chunk, e, owner) for r in rs[i:j]]
        i = j
    return out


def expected_hf_names(units: list[Unit]) -> set[str]:
    return {n for u in units for n in u.hf_names}


def check_names(units: list[Unit], present: set[str], where: str):
    """Strict accounting: every expected HF tensor is there and nothing else is."""
    expected = expected_hf_names(units)
    missing = sorted(expected - present)
    extra = sorted(n for n in present - expected if not n.endswith(IGNORED_HF_SUFFIXES))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_short(missing)}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s) the model has no place for: {_short(extra)}")
    if problems:
        raise MappingError(f"{where}: " + "; ".join(problems))


def _short(names: list[str], k: int = 8) -> str:
    return ", ".join(names[:k]) + (f", ... (+{len(names) - k} more)" if len(names) > k else "")


@dataclasses.dataclass(frozen=True)
class LocalItem:
    unit: Unit
    chunk: int
    param: str  # name in the chunk's state_dict()


def local_items(family: Family, layout: ParallelLayout, pp_rank: int, chunk_params: list[list[str]],
                ep_rank: int = 0) -> list[LocalItem]:
    """Match this rank's megatron parameter names (per VPP chunk) against the family's rules.

    Local layer and expert indices are translated to global ones with the layout; any parameter
    without a rule is an error (the family table is incomplete), never silently left uninitialised.
    """
    compiled = family.compiled_rules()
    n = family.num_layers
    per_rank = family.num_experts // layout.ep if family.num_experts else 0
    items, unmapped = [], []
    for chunk, names in enumerate(chunk_params):
        layers = layout.chunk_layers(n, pp_rank, chunk)
        for name in names:
            canon = canonical_param_name(name)
            for pattern, r in compiled:
                m = pattern.match(canon)
                if m:
                    items.append(LocalItem(_unit(family, r, m, name, layers, pp_rank, chunk, ep_rank,
                                                 per_rank), chunk, name))
                    break
            else:
                unmapped.append(name)
    if unmapped:
        raise MappingError(f"family {family.name!r} has no rule for megatron parameter(s) "
                           f"{_short(unmapped)}")
    return items


def _a(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _unit(family, r: Rule, m, name, layers, pp_rank, chunk, ep_rank, per_rank) -> Unit:
    layer = expert = owner = None
    if r.per_layer:
        local = int(m.group("L"))
        if local >= len(layers):
            raise MappingError(f"megatron parameter {name}: local layer {local} but the layout puts "
                               f"{len(layers)} layer(s) on pp rank {pp_rank} chunk {chunk} (model built "
                               f"for another layout?)")
        layer = layers[local]
        if not r.applies(family, layer):  # name what the rule asks for and what the layer is, in those terms
            asked = [str(w) for w in (r.when, r.mixer) if str(w) != "all"]
            found = [k for w, k in ((r.when, family.layer_kind(layer)), (r.mixer, family.layer_mixer(layer)))
                     if str(w) != "all"]
            found, asked = " ".join(found), " ".join(asked)
            raise MappingError(f"megatron parameter {name}: layer {layer} is {_a(found)} {found} layer in this "
                               f"model's config but the parameter belongs to {_a(asked)} {asked} layer (model "
                               f"built from another config?)")
    if r.expert:
        local = int(m.group("E"))
        if local >= per_rank:
            raise MappingError(f"megatron parameter {name}: local expert {local} but the layout gives "
                               f"{per_rank} experts to each expert-parallel rank (built for another --ep?)")
        expert, owner = ep_rank * per_rank + local, ep_rank
    return Unit(r, layer, pp_rank, chunk, expert, owner)
