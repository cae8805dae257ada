"""RL weight sync on CPU process groups: the streamed weights, loaded into a fresh transformers
model with ``load_state_dict(strict=True)``, give the megatron model's logits -- dense, MoE and
LoRA-merged, over TP / PP / EP layouts, for every choice of receivers and through buckets."""

from __future__ import annotations

import pytest
import torch

from mcore_bridge import ParallelLayout as L
from mcore_bridge.hf_io import HFCheckpoint
from tests import lora_cases, sync_cases
from tests.cases import same_bytes
from tests.matrix import case_id

# (model, world, layout, receivers, options)
CASES = [
    ("qwen3", 1, L(), "all", {}),
    ("qwen3", 4, L(tp=2, pp=2, sp=True), "all", {}),
    ("qwen3", 4, L(tp=2, pp=2), "rank", {}),
    ("qwen3", 2, L(pp=2, vpp=2), 1, {}),
    ("llama", 4, L(tp=2, pp=2), "node", {"local_world_size": 2}),  # two "nodes" of two ranks
    ("qwen3", 2, L(tp=2, sp=True), "all", {"buckets": True, "bucket_bytes": 1 << 16}),
    ("qwen3", 2, L(tp=2), "all", {"device": "cpu"}),
    ("qwen3", 4, L(tp=2, pp=2), "rank", {"buckets": True}),
    ("qwen3", 4, L(tp=2, pp=2), "rank", {"lora": True}),
    ("qwen3_moe", 2, L(ep=2), "all", {"expert_storage": "out_in"}),
    ("qwen3_moe", 2, L(tp=2, sp=True, ep=2, etp=1), "rank", {"expert_storage": "out_in"}),
    ("qwen3_moe", 4, L(pp=2, ep=2), "node", {"local_world_size": 2, "expert_storage": "out_in"}),
    ("qwen3_moe", 4, L(ep=2, etp=2), "all", {"buckets": True, "bucket_bytes": 1 << 16}),
    ("qwen3_moe", 4, L(tp=2, sp=True, ep=2), [1, 3], {"lora": True, "expert_storage": "out_in"}),
    ("mixtral", 4, L(pp=2, ep=2), "rank", {"buckets": True, "lora": True}),
]


def _expected_receivers(receivers, world, opts):
    if receivers == "all":
        return list(range(world))
    if receivers == "rank":
        return [0]
    if receivers == "node":
        return list(range(0, world, opts["local_world_size"]))
    return [receivers] if isinstance(receivers, int) else receivers


def _consumer_logits(src, tensors: dict, ids):
    """A fresh transformers model filled by load_state_dict(strict=True) from the streamed tensors."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(src)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    stream = iter(tensors.items())
    if any(".experts.0." in n for n in tensors):  # per-expert names: stack as transformers holds them
        from mcore_bridge.families import family_for
        from mcore_bridge.stacked import OUT_IN, restack, stacked_shapes, view_table

        fam = family_for(config.to_dict())
        stream = restack(stream, view_table(fam, OUT_IN), stacked_shapes(fam, OUT_IN))
    state = {n.replace(".block_sparse_moe.", ".mlp."): t for n, t in stream}  # Mixtral's on-disk module name
    if getattr(config, "tie_word_embeddings", False):
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("model,world,layout,receivers,opts", [
    pytest.param(m, w, lay, r, o, id=f"{case_id(m, w, lay)}-{r}{'-buckets' if o.get('buckets') else ''}"
                 f"{'-lora' if o.get('lora') else ''}", marks=pytest.mark.world(w))
    for m, w, lay, r, o in CASES])
def test_streamed_weights_load_into_transformers_and_match_megatron(model, world, layout, receivers, opts, pools,
                                                                  zoo_model):
    src = zoo_model(model)
    results = pools.get(world).run(sync_cases.stream, timeout=300, source=str(src), layout=layout.to_dict(),
                                   receivers=receivers, **opts)
    expected = _expected_receivers(receivers, world, opts)
    got = {r["rank"]: r["got"] for r in results}
    assert [k for k in sorted(got) if got[k]] == expected  # exactly the receivers got weights
    first = got[expected[0]]
    for k in expected[1:]:
        assert got[k].keys() == first.keys() and all(torch.equal(got[k][n], first[n]) for n in first)
    if opts.get("buckets"):
        sizes = [s for r in results for s in r["sizes"]]
        # only a single unit (at most q, k, v) may exceed the bucket size
        assert sizes and all(b <= opts.get("bucket_bytes", 1 << 20) or n <= 3 for b, n, _ in sizes)
        assert len({len(r["sizes"]) for r in results if r["sizes"]}) == 1
    if not opts.get("lora") and opts.get("expert_storage", "source") == "source":
        source = HFCheckpoint(src)  # not merged: the checkpoint's own bytes
        assert sorted(first) == sorted(source.names())
        assert all(same_bytes(first[n], source.read(n)) for n in first)
    logits = [r["logits"] for r in results if r["logits"] is not None]
    assert len(logits) == 1
    ids = lora_cases.input_ids(logits[0].shape[-1])
    assert (_consumer_logits(src, first, ids) - logits[0]).abs().max() < 2e-5


@pytest.mark.world(2)
def test_adapter_only_buckets_hold_the_peft_factors(pools, zoo_model, tmp_path):
    src = zoo_model("qwen3")
    results = pools.get(2).run(sync_cases.stream, timeout=300, source=str(src), layout=L(tp=2).to_dict(),
                               receivers="rank", lora=True, buckets=True, peft_format=True)
    got = [r["got"] for r in results if r["got"]]
    assert len(got) == 1 and got[0] and all(".lora_A.weight" in n or ".lora_B.weight" in n for n in got[0])
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in got[0]} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.world(2)
def test_bad_receivers_are_refused(pools, zoo_model):
    with pytest.raises(Exception, match="receivers=5"):
        pools.get(2).run(sync_cases.stream, timeout=120, source=str(zoo_model("qwen3")), layout=L(tp=2).to_dict(),
                         receivers=5)
