"""gpt-oss against transformers' GptOssForCausalLM on CPU process groups: negative controls, each a
known error in one gpt-oss feature on the megatron side, must fail at the right layer with the right
cause (byte-exact round trips and the passing fp32 matrix are in tests/test_moe.py, which runs
builtin:gpt_oss on every layout with expert-TP 1).

The zoo model's layers are [sliding, full, sliding, full] with a window of 4; the verification
samples are 32 and 384 tokens (past the window, and past yarn's original length of 32)."""

from __future__ import annotations

import pytest

from mcore_bridge import ParallelLayout as L
from tests import verify_cases


@pytest.fixture(scope="session")
def ref_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("gpt-oss-reference-cache"))


def verify(pools, zoo_model, ref_cache, world, layout, **kw) -> dict:
    out = pools.get(world).run(verify_cases.verify, timeout=300, source=str(zoo_model("gpt_oss")),
                               layout=layout.to_dict(), reference_cache=ref_cache, **kw)
    reports = [r for r in out if r is not None]
    assert len(reports) == 1
    return reports[0]


CONTROLS = [  # (world, layout, control, first diverging probe, cause)
    # attention sinks: one layer's sinks 1% off
    (1, L(), "scale:decoder.layers.2.self_attention.core_attention.softmax_offset:1.01", "layer.2", "weights"),
    # a window one token too wide: the first sliding layer (the attention error is large enough to
    # move the router's input: its top-k choices differ too, so the harness names routing)
    (1, L(), "config:window_size:[4,0]", "layer.0", "routing"),
    # the SwiGLU without its clamp, or without the +1 on up
    (1, L(), "config:activation_func_clamp_value:null", "layer.0", "weights"),
    (1, L(), "config:glu_linear_offset:0", "layer.0", "weights"),
    # yarn's correction range rounded to integers (HF's truncate: true) where the config says false
    (1, L(), "config:yarn_correction_range_round_to_int:true", "layer.0", "weights"),
    # the router's linear bias dropped: other experts win
    (2, L(ep=2), "zero:decoder.layers.1.mlp.router.bias", "layer.1", "routing"),
]


@pytest.mark.parametrize("world,layout,control,where,cause", [
    pytest.param(*c, id=f"{c[2].split(':')[0]}-{c[2].split(':')[1].split('.')[-1]}-{c[3]}",
                 marks=pytest.mark.world(c[0])) for c in CONTROLS])
def test_gpt_oss_negative_controls_are_caught_and_located(world, layout, control, where, cause, pools, zoo_model,
                                                          ref_cache):
    r = verify(pools, zoo_model, ref_cache, world, layout, control=control)
    assert r["verdict"] == "fail", r["metrics"]
    first = r["first_diverging"]
    assert (first["probe"], first["cause"]) == (where, cause), first
    probes = [x["probe"] for x in r["layers"]]
    assert all(x["ok"] for x in r["layers"][: probes.index(where)])
    entry = r["layers"][probes.index(where)]
    if cause == "routing":
        assert entry["router_agreement"] < 0.99
    else:  # the experts got the same tokens: the error is in the layer's computation, not its routing
        assert entry["router_agreement"] == 1.0
