"""``Bridge`` as a facade (issue 17): its attributes are the parts' state, the sync plan is kept in
the planner (explicitly, not in ``Bridge.__dict__``) and dropped when LoRA changes the model."""

from __future__ import annotations

import torch

from mcore_bridge import ParallelLayout as L


def facade_case(source: str, layout: dict) -> dict:
    """Runs in each rank of a pool: what the facade and its parts hold along a sync loop."""
    from mcore_bridge import lora
    from mcore_bridge.bridge_parts.syncplan import SyncPlanner
    from tests.cases import _loaded

    bridge, models = _loaded(source, layout)
    facts = {
        "same_parts": (bridge.family is bridge.reader.family and bridge.hf is bridge.reader.hf
                       and bridge.hf_tensors is bridge.reader.hf_tensors and bridge.source == bridge.reader.source),
        "no_dict_plans": "_plans" not in vars(bridge) and isinstance(bridge.syncplan, SyncPlanner),
        "state_keys": bridge.state(models).keys() == bridge.local.state(models).keys(),
        "state_size": len(bridge.state(models)),
        "hf_names": set(bridge.hf_tensors),
    }
    first = {n: t.clone() for n, t in bridge.export_weights(models)}
    (kept,) = bridge.syncplan.plans.values()
    again = {n: t.clone() for n, t in bridge.export_weights(models)}
    facts["plan_reused"] = list(bridge.syncplan.plans.values()) == [kept]
    facts["same_export"] = first.keys() == again.keys() and all(torch.equal(first[n], again[n]) for n in first)
    facts["first_names"] = set(first)
    bf16 = {n: t.dtype for n, t in bridge.export_weights(models, dtype=torch.bfloat16)}
    facts["one_plan_after_bf16"] = len(bridge.syncplan.plans) == 1 and set(bf16.values()) == {torch.bfloat16}
    facts["no_lora_yet"] = bridge.lora is None and bridge.adapter_family is None
    spec = lora.LoraSpec(r=2, alpha=4, targets=("all-linear",))
    bridge.apply_lora(models, spec)
    facts["plans_dropped"] = bridge.syncplan.plans == {}
    facts["lora_attrs"] = (bridge.lora == spec and bridge.adapter_family is bridge.adapters.family
                           and bridge.lora_units is bridge.adapters.units and bridge.lora_dtype == torch.float32)
    factors = {n: t.clone() for n, t in bridge.export_weights(models, peft_format=True)}
    facts["factor_names_ok"] = factors.keys() == set(bridge.lora_hf_tensors) and all(".lora_" in n for n in factors)
    merged = {n: t.clone() for n, t in bridge.export_weights(models)}  # zero B: the weights unchanged
    facts["merged_equal"] = merged.keys() == first.keys() and all(torch.equal(first[n], merged[n]) for n in first)
    return facts


def test_facade_exposes_the_parts_and_keeps_one_sync_plan(pools, zoo_model):
    results = pools.get(2).run(facade_case, timeout=300, source=str(zoo_model("qwen3")),
                               layout=L(tp=2, sp=True).to_dict())
    for facts in results:
        assert facts.pop("state_size") > 0
        names = facts.pop("hf_names")
        assert facts.pop("first_names") == names and len(names) > 0
        assert all(facts.values()), {k: v for k, v in facts.items() if not v}
