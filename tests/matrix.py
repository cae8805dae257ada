"""The layouts the CPU test matrix runs, as pytest params with ids like ``qwen3-tiny[tp2-pp2-sp]``."""

from __future__ import annotations

import pytest

from mcore_bridge import ParallelLayout, zoo

L = ParallelLayout
# (world size, layout); data parallel is whatever the world size leaves over tp*pp.
LAYOUTS = [
    (1, L()),
    (2, L(tp=2)),
    (2, L(tp=2, sp=True)),
    (2, L(pp=2)),
    (2, L(pp=2, vpp=2)),
    (2, L()),  # dp2
    (4, L(tp=4, sp=True)),
    (4, L(tp=2, pp=2)),
    (4, L(tp=2, pp=2, sp=True)),
    (4, L(tp=2, pp=2, first_stage_layers=1)),  # stages hold layers 1 + 3
    (4, L(pp=4)),
    (4, L(tp=2, pp=2, vpp=2)),  # one layer per virtual chunk
    (4, L(tp=2)),  # dp2
    (4, L(pp=2)),  # dp2
]
FAMILIES = zoo.DENSE


def case_id(model: str, world: int, layout: ParallelLayout) -> str:
    dp = world // layout.model_parallel_size
    return f"{model}-tiny[{layout.short()}{f'-dp{dp}' if dp > 1 else ''}]"


def param(model: str, world: int, layout: ParallelLayout):
    return pytest.param(model, world, layout, id=case_id(model, world, layout), marks=pytest.mark.world(world))


def full_matrix():
    return [param(m, w, layout) for w, layout in LAYOUTS for m in FAMILIES]
