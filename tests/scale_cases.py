"""Run in a world-1 pool worker by test_scale_model.py: bench/scale_model.py's per-rank loads of a
config at EP4, and transformers' own parameter count of it."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ep4_loads(raw: dict, fp8: bool = False) -> dict:
    sys.path.insert(0, str(ROOT / "bench"))
    import scale_model as sm

    from mcore_bridge.layout import ParallelLayout
    from tests.published_cases import hf_count

    family, sizes = sm.model_sizes(raw)
    layout = ParallelLayout(ep=4)
    ranks = sm.world_ranks(layout, sm.loads(family, layout, sizes, fp8))
    return dict(hf=hf_count(raw), ranks=[dict(r.__dict__) for r in ranks])
