"""HF -> megatron -> HF is lossless on every layout: export and save reproduce the source bytes."""

from __future__ import annotations

import json

import pytest

from tests import cases
from tests.matrix import full_matrix

CASE_TIMEOUT_S = 300


@pytest.mark.parametrize("model,world,layout", full_matrix())
def test_roundtrip(model, world, layout, pools, zoo_model, tmp_path):
    src = zoo_model(model)
    out = tmp_path / "converted"
    results = pools.get(world).run(cases.roundtrip, timeout=CASE_TIMEOUT_S, source=str(src),
                                   layout=layout.to_dict(), out_dir=str(out))

    assert len(results) == world
    cases.check_roundtrip(results, src, out)  # every rank got every tensor once, byte-identical; so did the files
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    for side in ("tokenizer.json", "generation_config.json"):
        assert (src / side).exists(), f"the zoo model lacks {side}: this check would be vacuous"
        assert (out / side).read_bytes() == (src / side).read_bytes(), side
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # no .converted.partial/.old
