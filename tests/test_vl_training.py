"""Vision-language models train as the seed trains them (issue 22 item 3, VL part), on CPU
process groups in fp32, through megatron's own schedule, DDP and optimizer:

* activation recomputation (full uniform / block, selective) gives the losses and gradients of
  the run without it -- deepstack features included, which now reach their layers as a forward
  argument -- and the layers really ran again;
* packed sequences (THD ``packed_seq_params``, each sample's own mRoPE positions) give each
  sample's loss and the gradients of one sample per micro-batch;
* freezing the vision tower / projector / language model: no gradient, no update;
* MoE training options reach megatron's config.

Negative controls: a per-sample mRoPE offset applied one token late is caught in that sample's
loss only; deepstack features lost when recomputation replays a layer (what the former forward
hooks would do) leave the loss unchanged and are caught in the gradients of the vision tower.
"""

from __future__ import annotations

import pytest
import torch

from mcore_bridge import ParallelLayout as L
from mcore_bridge.errors import UsageError
from verify.grad import compare

CASE = "tests.vltrain_cases:train_grads"
TIGHT = 1e-5  # fp32: relative gradient error (measured: 0 for recomputation, <= 8.6e-7 packed)
FULL_UNIFORM = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
FULL_BLOCK = {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2}
SELECTIVE = {"recompute_granularity": "selective"}  # megatron's default modules: core_attn


def _run(pools, world, src, layout, **kw) -> dict:
    out = [r for r in pools.get(world).run(CASE, timeout=300, source=str(src), layout=layout.to_dict(), **kw)
           if r is not None]
    assert len(out) == 1
    return out[0]


def _same(ref: dict, got: dict, what: str) -> None:
    assert got["names"] == ref["names"]
    for name, a, b in zip(ref["names"], ref["losses"], got["losses"]):
        assert abs(a - b) <= 1e-5 * abs(a), f"{what}: loss of {name}: {b} vs {a}"
    _same_grads(ref, got, what)


def _same_grads(ref: dict, got: dict, what: str) -> None:
    c = compare(ref["grads"], got["grads"], rel_max=TIGHT, cos_min=1 - 1e-9)
    assert not c["failures"] and not c["missing"] and len(c["params"]) == len(ref["grads"]), (what, c["failures"])
    assert any("deepstack" in n or "merger" in n for n in ref["grads"])  # the vision side is compared too


def _check_recomputed(ref: dict, got: dict, training: dict, layers: int, deepstack: bool) -> None:
    assert got["recompute"] == training["recompute_granularity"]
    if training["recompute_granularity"] == "full":  # recomputed layers ran twice: uniform all, block the first n
        again = layers if training["recompute_method"] == "uniform" else training["recompute_num_layers"]
        assert ref["calls"]["layer"] == ref["microbatches"] * layers, ref["calls"]
        assert got["calls"]["layer"] == got["microbatches"] * (layers + again), got["calls"]
    else:  # core attention recomputed inside each layer
        assert got["calls"]["layer"] == got["microbatches"] * layers, got["calls"]
        assert got["calls"]["core_attention"] == 2 * got["calls"]["layer"], got["calls"]
    if deepstack:
        ds = [n for n in ref["grads"] if "deepstack_merger_list" in n]
        assert ds and all(float(ref["grads"][n].abs().max()) > 0 for n in ds)


# ---- recomputation and packing: ws1 ---------------------------------------------------------------
@pytest.mark.world(1)
@pytest.mark.parametrize("model", ["qwen3_vl", "qwen2_5_vl"])
def test_recompute_and_packing_match_the_plain_run(model, pools, zoo_model):
    src = zoo_model(model)
    ref = _run(pools, 1, src, L())
    assert ref["recompute"] is None and len(ref["losses"]) == 3
    deepstack = model == "qwen3_vl"
    for training in ([FULL_UNIFORM, SELECTIVE] if deepstack else [FULL_BLOCK]):
        got = _run(pools, 1, src, L(), training=training)
        _check_recomputed(ref, got, training, 4, deepstack)
        _same(ref, got, f"recompute {training}")
    packed = _run(pools, 1, src, L(), packed=True)
    _same(ref, packed, "packed")
    if deepstack:  # one sample's gradient alone (the others weighted 0): packed = on its own
        one = [0.0, 1.0, 0.0]
        _same(_run(pools, 1, src, L(), weights=one), _run(pools, 1, src, L(), packed=True, weights=one),
              "packed, sample 1's gradient")


@pytest.mark.world(1)
def test_wrong_packed_position_offset_is_caught_in_its_sample(pools, zoo_model):
    """Sample 1 (two images) gets its per-sample offset one token late: its loss moves, the
    others' do not; its gradients diverge."""
    src = zoo_model("qwen3_vl")
    ref = _run(pools, 1, src, L())
    bad = _run(pools, 1, src, L(), packed=True, bad_offset=(1, 3))
    rel = [abs(a - b) / abs(a) for a, b in zip(ref["losses"], bad["losses"])]
    assert rel[0] < 1e-6 and rel[2] < 1e-6 and rel[1] > 1e-4, rel
    c = compare(ref["grads"], bad["grads"], rel_max=TIGHT)
    assert c["failures"] and c["first_diverging"] is not None
    # per-sample gradients: the other samples' are untouched, sample 1's diverges
    others = [1.0, 0.0, 1.0]
    _same_grads(_run(pools, 1, src, L(), weights=others),
                _run(pools, 1, src, L(), packed=True, bad_offset=(1, 3), weights=others), "samples 0 and 2")
    one = [0.0, 1.0, 0.0]
    c = compare(_run(pools, 1, src, L(), weights=one)["grads"],
                _run(pools, 1, src, L(), packed=True, bad_offset=(1, 3), weights=one)["grads"], rel_max=TIGHT)
    assert c["failures"], "sample 1's gradient should diverge"


@pytest.mark.world(1)
def test_deepstack_lost_in_recompute_is_caught_in_the_gradients(pools, zoo_model):
    """What forward hooks would do under recomputation: the loss is unchanged (the first forward
    has the features), the gradients of the deepstack mergers are gone."""
    src = zoo_model("qwen3_vl")
    ref = _run(pools, 1, src, L())
    bad = _run(pools, 1, src, L(), training=FULL_UNIFORM, control="deepstack_lost_in_recompute")
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(ref["losses"], bad["losses"]))
    c = compare(ref["grads"], bad["grads"], rel_max=TIGHT)
    wrong = {p["name"] for p in c["params"] if not p["ok"]}
    assert any("deepstack_merger_list" in n for n in wrong), c["failures"]
    assert all(float(bad["grads"][n].abs().max()) == 0 for n in bad["grads"] if "deepstack_merger_list" in n)


# ---- ws2: tp2 + sequence parallel, recomputation and packing together ------------------------------------
@pytest.mark.world(2)
def test_tp2_sp_recompute_and_packing(pools, zoo_model):
    src = zoo_model("qwen3_vl")
    layout = L(tp=2, sp=True)
    ref = _run(pools, 2, src, layout)
    got = _run(pools, 2, src, layout, training=FULL_BLOCK, packed=True)
    _check_recomputed(ref, got, FULL_BLOCK, 4, True)
    _same(ref, got, "tp2+sp recompute+packed")


# ---- freezing ---------------------------------------------------------------------------------------
@pytest.mark.world(1)
def test_frozen_parts_get_no_gradient_and_no_update(pools, zoo_model):
    out = [r for r in pools.get(1).run("tests.vltrain_cases:freeze_step", timeout=300,
                                       source=str(zoo_model("qwen3_vl")), layout=L().to_dict(),
                                       parts=["vision", "language"]) if r is not None][0]
    s = out["summary"]
    assert out["step_ok"]
    assert set(s) == {"vision", "projector", "language"}
    for part in ("vision", "language"):
        assert s[part]["params"] > 0 and s[part]["trainable"] == s[part]["with_grad"] == s[part]["changed"] == 0, s
    p = s["projector"]  # the merger and the deepstack mergers train
    assert p["params"] > 0 and p["trainable"] == p["with_grad"] == p["changed"] == p["params"], s


def test_parts_and_freeze_errors(zoo_model):
    import json

    from mcore_bridge.families import family_for
    from mcore_bridge.train_options import TrainOptions, check_freeze, freeze, part_of

    assert part_of("visual.blocks.0.attn.qkv.weight") == "vision"
    assert part_of("visual.merger.linear_fc1.weight") == "projector"
    assert part_of("visual.deepstack_merger_list.1.norm.weight") == "projector"
    assert part_of("decoder.layers.0.mlp.linear_fc1.weight") == "language"
    assert part_of("embedding.word_embeddings.weight") == "language"
    with pytest.raises(UsageError, match=r"freeze=\('tower',\).*unknown part.*'vision', 'projector', 'language'"):
        TrainOptions(freeze=("tower",))
    text = family_for(json.loads((zoo_model("qwen3") / "config.json").read_text()))
    with pytest.raises(UsageError, match=r"freeze \('vision',\): qwen3 has no vision tower .* only 'language'"):
        check_freeze(text, ["vision"])
    check_freeze(text, ["language"])
    check_freeze(family_for(json.loads((zoo_model("qwen2_vl") / "config.json").read_text())), ["vision"])
    lin = torch.nn.Linear(2, 2)
    assert freeze([lin], ["vision"]) == 0 and lin.weight.requires_grad  # nothing of a vision tower here
    assert freeze([lin], ["language"]) == 2 and not lin.weight.requires_grad


# ---- MoE training options ---------------------------------------------------------------------------
def test_moe_training_options_reach_the_config(zoo_model):
    import json

    from mcore_bridge.families import family_for
    from mcore_bridge.model import local_grouped_experts_available, transformer_config
    from mcore_bridge.train_options import TrainOptions

    family = family_for(json.loads((zoo_model("qwen3_vl_moe") / "config.json").read_text()))
    plain = transformer_config(family, L(), torch.float32, "cpu")
    assert plain.moe_aux_loss_coeff == 0.0 and plain.moe_expert_capacity_factor is None
    assert plain.recompute_granularity is None
    opts = TrainOptions(moe_expert_capacity_factor=1.5, moe_pad_expert_input_to_capacity=True,
                        moe_token_drop_policy="position", moe_router_load_balancing_type="aux_loss",
                        moe_aux_loss_coeff=1e-3, moe_z_loss_coeff=1e-4, **FULL_UNIFORM)
    cfg = transformer_config(family, L(), torch.float32, "cpu", training=opts)
    assert (cfg.moe_expert_capacity_factor, cfg.moe_pad_expert_input_to_capacity, cfg.moe_token_drop_policy,
            cfg.moe_router_load_balancing_type, cfg.moe_aux_loss_coeff, cfg.moe_z_loss_coeff) == \
        (1.5, True, "position", "aux_loss", 1e-3, 1e-4)
    assert (cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers) == ("full", "uniform", 1)
    if local_grouped_experts_available():
        assert transformer_config(family, L(), torch.float32, "cpu",
                                  training=TrainOptions(moe_grouped_gemm=True)).moe_grouped_gemm
    # megatron-core's own refusals come back naming the options (no TransformerEngine here)
    with pytest.raises(UsageError, match=r"moe_permute_fusion=True: megatron-core refused the config: .*fused.permut"):
        transformer_config(family, L(), torch.float32, "cpu", training=TrainOptions(moe_permute_fusion=True))
    with pytest.raises(UsageError, match=r"recompute_granularity='full': megatron-core refused .*recompute_method"):
        transformer_config(family, L(), torch.float32, "cpu", training=TrainOptions(recompute_granularity="full"))


@pytest.mark.world(1)
def test_moe_aux_loss_and_capacity_act_in_training(pools, zoo_model):
    """The options are live in the backward: the auxiliary loss leaves the LM loss alone and moves
    the router's gradient; a capacity factor below 1 drops tokens, so the losses move."""
    src = zoo_model("qwen3_vl_moe")
    ref = _run(pools, 1, src, L())
    aux = _run(pools, 1, src, L(), training={"moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 1e-2})
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(ref["losses"], aux["losses"]))
    c = compare(ref["grads"], aux["grads"], rel_max=TIGHT)
    assert any(p["name"].endswith("mlp.gate.weight") and not p["ok"] for p in c["params"]), c["failures"]
    dropped = _run(pools, 1, src, L(), training={"moe_expert_capacity_factor": 0.5})
    assert all(abs(a - b) > 1e-4 for a, b in zip(ref["losses"], dropped["losses"])), dropped["losses"]


def test_pack_layout_and_mask():
    """Two samples of 2 and 3 tokens packed to a multiple of 4: the padding is a third segment
    without loss; the mask lets a token see only its own sample's past."""
    from mcore_bridge.families.vl_train import pack, packed_mask
    from verify.inputs import Sample

    def sample(n, start):
        ids = torch.arange(start, start + n)
        return Sample(f"s{n}", ids, ids.clone(), torch.arange(n).expand(3, n) + torch.tensor([[0], [1], [2]]),
                      {"image_grid_thw": torch.tensor([[1, 2, 2]]) * n})

    p = pack([sample(2, 10), sample(3, 20)], align=4)
    assert p.input_ids.tolist() == [[10, 11, 20, 21, 22, 0, 0, 0]]
    assert p.labels.tolist() == [10, 11, 20, 21, 22, -100, -100, -100]
    assert p.bounds == [(0, 2), (2, 5)]
    assert p.packed_seq_params.qkv_format == "thd" and p.packed_seq_params.max_seqlen_q == 3
    assert p.packed_seq_params.cu_seqlens_q.tolist() == [0, 2, 5, 8]
    assert p.position_ids.shape == (3, 1, 8) and p.position_ids[:, 0, 2:5].tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    assert p.vision["image_grid_thw"].tolist() == [[2, 4, 4], [3, 6, 6]]
    allowed = ~packed_mask(p.packed_seq_params.cu_seqlens_q, 8, "cpu")[0, 0]
    expect = torch.zeros(8, 8, dtype=torch.bool)
    for lo, hi in [(0, 2), (2, 5), (5, 8)]:
        expect[lo:hi, lo:hi] = torch.ones(hi - lo, hi - lo, dtype=torch.bool).tril()
    assert torch.equal(allowed, expect)
    bad = pack([sample(2, 10), sample(3, 20)], align=4, bad_offset=(1, 5))
    assert bad.position_ids[0, 0, 2:5].tolist() == [0, 6, 7]  # the offset one token late


# ---- a text model recomputes on CPU too -----------------------------------------------------------
@pytest.mark.world(1)
def test_text_model_full_recompute_matches_the_plain_run(pools, zoo_model):
    """megatron rebuilds a replayed layer's causal mask during the backward pass, where the CPU
    mode that redirects its ``device="cuda"`` is off (compat's ``_cpu_causal_masks`` builds it on the CPU)."""
    src = str(zoo_model("qwen3"))
    case = "tests.vltrain_cases:text_grads"
    ref = [r for r in pools.get(1).run(case, timeout=300, source=src, layout=L().to_dict()) if r][0]
    got = [r for r in pools.get(1).run(case, timeout=300, source=src, layout=L().to_dict(), training=FULL_UNIFORM)
           if r][0]
    assert ref["calls"] == 2 * ref["layers"] and got["calls"] == 2 * 2 * got["layers"]  # every layer ran again
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-6)
    c = compare(ref["grads"], got["grads"], rel_max=TIGHT, cos_min=1 - 1e-9)
    assert not c["failures"] and not c["missing"] and len(c["params"]) == len(ref["grads"]) > 0, c["failures"]
