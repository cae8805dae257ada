"""Plan a layout for a model from its ``config.json`` alone: parameters and memory per rank.

The model is built once by megatron-core itself on the ``meta`` device (no memory, no weights) at
tp = pp = ep = 1, so every parameter's size is megatron's own; the family's rules and the layout's
arithmetic (``plan.inventory``) then place each parameter on its pipeline stage and expert-parallel
rank, and its transform says whether tensor parallelism splits it. What a rank holds is the same on
every tp / etp / dp rank of its stage and expert rank, so the plan is a table over (stage, ep rank).

``mcore-bridge plan --model CONFIG_OR_DIR --pp 16 --ep 8`` prints it; tests run it for the published
configs of the flagship models (``tests/published``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

# Bytes per parameter while training with mixed precision and Adam, without the distributed
# optimizer: bf16 weight (2) + fp32 main grad (4) + fp32 master weight, exp_avg, exp_avg_sq (12).
TRAIN_BYTES_PER_PARAM = 18
VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclasses.dataclass(frozen=True)
class RankShare:
    stage: int
    ep_rank: int
    dense_params: int  # held by this rank: attention, norms, dense MLPs, embeddings (already / tp)
    expert_params: int  # this rank's experts (already / etp)

    @property
    def params(self) -> int:
        return self.dense_params + self.expert_params


@dataclasses.dataclass(frozen=True)
class Plan:
    model_type: str
    layout: dict
    world_size: int  # the smallest world the layout runs on
    total_params: int  # the model's own count (vocabulary not padded), MTP layers included
    mtp_params: int  # of which in multi-token-prediction layers (transformers builds none)
    ranks: list[RankShare]

    @property
    def max_rank_params(self) -> int:
        return max(r.params for r in self.ranks)

    def to_dict(self) -> dict:
        return dict(model_type=self.model_type, layout=self.layout, world_size=self.world_size,
                    total_params=self.total_params, mtp_params=self.mtp_params, max_rank_params=self.max_rank_params,
                    max_rank_weight_bytes_bf16=2 * self.max_rank_params,
                    max_rank_train_bytes=TRAIN_BYTES_PER_PARAM * self.max_rank_params,
                    ranks=[dataclasses.asdict(r) for r in self.ranks])


def read_config(path: str | Path) -> dict:
    """A ``config.json`` file, or an HF directory holding one."""
    from .errors import UsageError

    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise UsageError(f"--model {path}: neither a config.json file nor a directory with one")
    return json.loads(p.read_text())


def parameter_sizes(family) -> dict[tuple, int]:
    """A unit's HF tensor names -> elements of the whole (unsplit) megatron parameter, from a model
    built on the meta device. Keyed by HF names so that a tied output layer, its own parameter only
    under pipeline parallelism, finds the embedding's size. Needs megatron's parallel state at
    tp = pp = ep = 1."""
    import torch

    from .layout import ParallelLayout
    from .model import build_model, param_views
    from .plan import local_items

    whole = ParallelLayout()
    with torch.device("meta"):
        models = build_model(family, whole, dtype=torch.bfloat16, device="cpu")
    views = param_views(models, family, whole)
    names = [[n for (c, n) in views if c == i] for i in range(len(models))]
    return {it.unit.hf_names: views[(it.chunk, it.param)].numel() for it in local_items(family, whole, 0, names)}


def plan(family, layout, sizes: dict[tuple, int]) -> Plan:
    """Parameters per (pipeline stage, expert-parallel rank) of ``layout``, from ``sizes``."""
    from .layout import padded_vocab_size
    from .plan import inventory

    layout.validate(**family.layout_dims())
    family.check_layout(layout)
    vocab = family.architecture.model["vocab_size"]
    vocab_ratio = padded_vocab_size(vocab, layout.tp) / padded_vocab_size(vocab, 1)
    dense: dict[int, float] = {}
    experts: dict[tuple[int, int], float] = {}
    total = mtp = 0
    for u in inventory(family, layout):
        n = sizes[u.hf_names]
        own = u.rule.export  # False: a copy (a tied output layer held by the last stage)
        if u.rule.mcore in VOCAB_PARAMS:  # megatron pads rows to a multiple of 128 * tp
            total += own * n * vocab / padded_vocab_size(vocab, 1)
            n = n * vocab_ratio
        else:
            total += own * n
            mtp += own * n * u.rule.mcore.startswith("mtp.")
        split = 1 if u.rule.transform.parallel_mode == "replicated" else (layout.etp if u.rule.expert else layout.tp)
        if u.ep_rank is None:
            dense[u.stage] = dense.get(u.stage, 0) + n / split
        else:
            experts[(u.stage, u.ep_rank)] = experts.get((u.stage, u.ep_rank), 0) + n / split
    ranks = [RankShare(s, e, int(dense.get(s, 0)), int(experts.get((s, e), 0)))
             for s in range(layout.pp) for e in range(layout.ep)]
    return Plan(family.name, layout.to_dict(), layout.min_world_size, int(total), int(mtp), ranks)


def plan_config(raw_config: dict, layout) -> Plan:
    """``plan`` for a config, building the meta model in this process (megatron's parallel state is
    set up at tp = pp = ep = 1 here if it is not already)."""
    from .families import family_for
    from .layout import ParallelLayout
    from .runtime import compat
    from .runtime import dist as rt

    family = family_for(raw_config)
    layout.validate(**family.layout_dims())  # refuse before building anything
    family.check_layout(layout)
    with compat.scope("cpu"):
        rt.setup(ParallelLayout(), "cpu")
        return plan(family, layout, parameter_sizes(family))


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.1f}{suffix}{unit}" if suffix else f"{int(n)}{unit}"
        n /= 1000
    return str(n)


def render(p: Plan) -> str:
    lay = ", ".join(f"{k}={v}" for k, v in p.layout.items() if v not in (None, False))
    mtp = f" (MTP layers {_human(p.mtp_params)})" if p.mtp_params else ""
    lines = [f"{p.model_type}: {_human(p.total_params)} parameters{mtp}; layout {lay} runs on {p.world_size}+ ranks",
             "stage  ep  params/rank  weights bf16  training (bf16 + fp32 grad + Adam, no dist-opt)"]
    for stage in sorted({r.stage for r in p.ranks}):
        rows = [r for r in p.ranks if r.stage == stage]
        same = len({r.params for r in rows}) == 1
        for r in rows[:1] if same else rows:
            ep = "all" if same and len(rows) > 1 else str(r.ep_rank)
            lines.append(f"{stage:5d} {ep:>3}  {_human(r.params):>11}  {_human(2 * r.params, 'B'):>12}  "
                         f"{_human(TRAIN_BYTES_PER_PARAM * r.params, 'B'):>10}")
    lines.append(f"largest rank: {_human(p.max_rank_params)} parameters, {_human(2 * p.max_rank_params, 'B')} of "
                 f"bf16 weights (activations, buffers and the optimizer's sharding not included)")
    return "\n".join(lines)


def add_parser(sub, add_layout_args) -> None:
    p = sub.add_parser(
        "plan", help="parameters and memory per rank of a layout, from config.json alone",
        description="Build the model on megatron-core's meta device (no weights, no memory) and print what "
                    "each pipeline stage / expert-parallel rank of the layout holds. --model takes an HF "
                    "directory or a bare config.json, e.g. a published model's.")
    p.add_argument("--model", required=True, help="config.json or an HF directory holding one")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_layout_args(p)


def cmd_plan(args: argparse.Namespace, layout) -> int:
    p = plan_config(read_config(args.model), layout)
    print(json.dumps(p.to_dict()) if args.json else render(p))
    return 0
