"""A wrong but symmetric weight mapping survives a byte-exact round trip; only logits catch it.

The broken transforms (tests/cases.py) are swapped into the family rule table inside the workers:
q/k/v fused as plain ``[q; k; v]`` rows instead of megatron's per-group interleaving, and
``[up; gate]`` instead of ``[gate; up]`` in the gated MLP.
"""

from __future__ import annotations

import pytest

from mcore_bridge import ParallelLayout as L
from mcore_bridge.hf_io import HFCheckpoint
from tests import cases
from tests.matrix import param

WRONG = [
    pytest.param("qkv", *param("qwen2", 2, L(tp=2)).values, id="qkv-qwen2-tiny[tp2-pp1]",
                 marks=pytest.mark.world(2)),  # qwen2: the q/k/v biases go through it too
    pytest.param("gate_up", *param("llama", 2, L(tp=2)).values, id="gate_up-llama-tiny[tp2-pp1]",
                 marks=pytest.mark.world(2)),
]


@pytest.mark.parametrize("broken,model,world,layout", WRONG)
def test_symmetric_bug_passes_roundtrip_fails_logits(broken, model, world, layout, pools, zoo_model):
    src = str(zoo_model(model))
    names = sorted(HFCheckpoint(src).names())
    pool = pools.get(world)
    for r in pool.run(cases.roundtrip, timeout=300, source=src, layout=layout.to_dict(), broken=broken):
        assert r["mismatches"] == [] and r["names"] == names and r["count"] == len(names)  # "lossless"
    diffs = [d for d in pool.run(cases.logits, timeout=300, source=src, layout=layout.to_dict(),
                                 broken=broken) if d is not None]
    assert len(diffs) == 1
    assert diffs[0] > 1e-2, f"the {broken} mapping bug went unnoticed by the logits check"
