"""ParallelLayout: validation messages, pipeline arithmetic (cross-checked against megatron-core's
own ``get_transformer_layer_offset`` / ``get_num_layers_to_build``), rank coordinates (against
megatron's ``RankGenerator``) and vocabulary padding. Single process, no torch.distributed."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mcore_bridge.layout import LayoutError, ParallelLayout, padded_vocab_size

DIMS = dict(num_layers=8, num_attention_heads=32, num_query_groups=8, ffn_hidden_size=256)


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


# ---- validation messages ------------------------------------------------------------------------

def test_query_groups_not_divisible_names_numbers_and_divisors():
    with pytest.raises(LayoutError) as e:
        ParallelLayout(tp=3).validate(**{**DIMS, "num_attention_heads": 24, "num_query_groups": 8})
    msg = str(e.value)
    assert "8 query groups" in msg and "tp=3" in msg
    listed = [int(x) for x in re.search(r"\[([\d, ]+)\]", msg).group(1).split(",")]
    assert listed == [1, 2, 4, 8] and all(8 % d == 0 for d in listed)


def test_query_groups_checked_before_heads():
    # 32 heads split over tp=16 fine, 8 groups do not: the message must be about the groups
    with pytest.raises(LayoutError, match=r"8 query groups .* tp=16"):
        ParallelLayout(tp=16).validate(**DIMS)


def test_heads_not_divisible():
    with pytest.raises(LayoutError, match=r"12 attention heads cannot be split over tp=8") as e:
        ParallelLayout(tp=8).validate(**{**DIMS, "num_attention_heads": 12, "num_query_groups": 8})
    assert str(_divisors(12)) in str(e.value)


def test_ffn_not_divisible():
    with pytest.raises(LayoutError, match=r"intermediate size 100 .* tp=8"):
        ParallelLayout(tp=8).validate(**{**DIMS, "ffn_hidden_size": 100})


@pytest.mark.parametrize("field", ["tp", "pp", "vpp"])
def test_sizes_at_least_one(field):
    with pytest.raises(LayoutError, match=f"--{field} must be >= 1, got 0"):
        ParallelLayout(**{field: 0})


def test_sp_without_tp():
    with pytest.raises(LayoutError, match=r"sequence parallel.*--tp >= 2"):
        ParallelLayout(sp=True)
    ParallelLayout(tp=2, sp=True)  # fine


def test_vpp_without_pp():
    with pytest.raises(LayoutError, match=r"--vpp 2 needs pipeline parallelism"):
        ParallelLayout(vpp=2)


def test_uneven_stages_without_pp():
    with pytest.raises(LayoutError, match="--pp >= 2"):
        ParallelLayout(first_stage_layers=1)
    with pytest.raises(LayoutError, match="--pp >= 2"):
        ParallelLayout(last_stage_layers=1)


def test_uneven_stages_that_do_not_fit():
    with pytest.raises(LayoutError, match="do not fit 8 layers"):
        ParallelLayout(pp=2, first_stage_layers=9).validate(**DIMS)
    with pytest.raises(LayoutError, match="do not fit 8 layers"):
        ParallelLayout(pp=3, first_stage_layers=0).validate(**DIMS)
    with pytest.raises(LayoutError, match=r"3\+4 != 8 layers"):
        ParallelLayout(pp=2, first_stage_layers=3, last_stage_layers=4).validate(**DIMS)
    with pytest.raises(LayoutError, match=r"remaining layers \(7\) do not divide evenly over 2"):
        ParallelLayout(pp=3, first_stage_layers=1).validate(**DIMS)
    with pytest.raises(LayoutError, match=r"layers \(8\) do not divide evenly over 3 pipeline stages"):
        ParallelLayout(pp=3).validate(**DIMS)


def test_vpp_does_not_divide_stage():
    with pytest.raises(LayoutError, match=r"stage 0 holds 3 layers, not divisible into vpp=2"):
        ParallelLayout(pp=2, vpp=2, first_stage_layers=3).validate(**DIMS)


def test_empty_stages():
    with pytest.raises(LayoutError, match="empty pipeline stage"):
        ParallelLayout(pp=3, first_stage_layers=4, last_stage_layers=4).validate(**DIMS)
    with pytest.raises(LayoutError):  # 2 layers over 4 stages
        ParallelLayout(pp=4).validate(**{**DIMS, "num_layers": 2})


def test_world_size_not_multiple():
    layout = ParallelLayout(tp=2, pp=2)
    layout.validate(**DIMS, world_size=8)
    with pytest.raises(LayoutError, match=r"world size 6 is not a multiple of tp\*pp=4"):
        layout.validate(**DIMS, world_size=6)


def test_short_and_dict():
    layout = ParallelLayout(tp=2, pp=2, vpp=2, sp=True, first_stage_layers=2)
    assert layout.short() == "tp2-pp2-vpp2-sp-first2"
    assert ParallelLayout(**layout.to_dict()) == layout


# ---- chunk_layers partitions the model ----------------------------------------------------------

@st.composite
def valid_pipeline(draw):
    """A valid (num_layers, layout), built from per-stage sizes so every kind of split shows up."""
    pp = draw(st.integers(1, 6))
    vpp = draw(st.integers(1, 3)) if pp > 1 else 1
    per = vpp * draw(st.integers(1, 3))
    first = last = None
    if pp > 1 and draw(st.booleans()):
        first = vpp * draw(st.integers(1, 4))
    if pp > 1 and draw(st.booleans()):
        last = vpp * draw(st.integers(1, 4))
    middle = pp - (first is not None) - (last is not None)
    num_layers = (first or 0) + (last or 0) + middle * per
    return num_layers, ParallelLayout(pp=pp, vpp=vpp, first_stage_layers=first, last_stage_layers=last)


@settings(max_examples=150, deadline=None)
@given(case=valid_pipeline())
def test_chunk_layers_partition(case):
    n, layout = case
    counts = layout.stage_layer_counts(n)
    assert sum(counts) == n and len(counts) == layout.pp
    seen = []
    for vp in range(layout.vpp):
        for stage in range(layout.pp):
            chunk = layout.chunk_layers(n, stage, vp)
            assert chunk.step == 1 and len(chunk) == counts[stage] // layout.vpp > 0
            # megatron's interleaving: walking (chunk, stage) in order walks the layers in order
            assert chunk.start == len(seen)
            seen += list(chunk)
            for layer in chunk:
                assert layout.layer_owner(n, layer) == (stage, vp)
    assert seen == list(range(n))  # every layer exactly once
    per_stage = [sum(len(layout.chunk_layers(n, s, vp)) for vp in range(layout.vpp)) for s in range(layout.pp)]
    assert per_stage == counts
    if layout.first_stage_layers is not None:
        assert counts[0] == layout.first_stage_layers
    if layout.last_stage_layers is not None:
        assert counts[-1] == layout.last_stage_layers
    with pytest.raises(IndexError):
        layout.layer_owner(n, n)
    assert layout.is_first(0, 0) and layout.is_last(layout.pp - 1, layout.vpp - 1)
    assert not layout.is_last(0, 0) or (layout.pp == 1 and layout.vpp == 1)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 24), pp=st.integers(1, 6), vpp=st.integers(1, 3),
       first=st.none() | st.integers(0, 8), last=st.none() | st.integers(0, 8))
def test_any_pipeline_either_rejected_or_partitions(n, pp, vpp, first, last):
    try:
        layout = ParallelLayout(pp=pp, vpp=vpp, first_stage_layers=first, last_stage_layers=last)
        layout.stage_layer_counts(n)
    except LayoutError:
        return
    layers = [l for vp in range(vpp) for s in range(pp) for l in layout.chunk_layers(n, s, vp)]
    assert layers == list(range(n))


# ---- cross-check against megatron-core's own arithmetic -----------------------------------------

def _megatron_config(n, layout):
    """The TransformerConfig the bridge itself builds for this layout (``model.transformer_config``),
    for a small llama: num_layers=n, hidden_size=64, num_attention_heads=4."""
    from mcore_bridge.families import family_for
    from mcore_bridge.model import transformer_config

    family = family_for(dict(model_type="llama", num_hidden_layers=n, hidden_size=64, num_attention_heads=4,
                             num_key_value_heads=4, intermediate_size=128, vocab_size=100))
    config = transformer_config(family, layout, torch.float32, "cpu")
    assert (config.num_layers, config.hidden_size, config.num_attention_heads) == (n, 64, 4)
    assert config.pipeline_model_parallel_size == layout.pp
    assert config.virtual_pipeline_model_parallel_size == (layout.vpp if layout.vpp > 1 else None)
    return config


def _raw_megatron_config(n, layout):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=n, hidden_size=64, num_attention_heads=4,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        num_layers_in_first_pipeline_stage=layout.first_stage_layers,
        num_layers_in_last_pipeline_stage=layout.last_stage_layers,
        pipeline_dtype=torch.float32)


def _grid():
    for n, pp, vpp in itertools.product(range(1, 17), range(1, 5), (1, 2, 3)):
        if vpp > 1 and pp == 1:
            continue
        firsts = [None] + (list(range(1, 7)) if pp > 1 else [])
        for first, last in itertools.product(firsts, firsts):
            yield n, pp, vpp, first, last


def _megatron_cannot_compute_offsets(layout):
    """megatron-core (0.16.1) divides by the number of *middle* stages in
    ``get_transformer_layer_offset`` whenever vpp is set and both uneven sizes are given, which
    leaves pp=2 with none: ZeroDivisionError. (pp=2 without vpp is guarded in megatron.)"""
    return (layout.pp == 2 and layout.vpp > 1 and layout.first_stage_layers is not None
            and layout.last_stage_layers is not None)


@pytest.mark.parametrize("builder", ["raw", "bridge"])
def test_layer_offsets_match_megatron(builder):
    """``chunk_layers(...).start`` == megatron's ``get_transformer_layer_offset`` and its length ==
    ``get_num_layers_to_build``, for every stage and virtual chunk of every valid layout in a grid.
    ``raw``: a plain TransformerConfig with the layout's settings; ``bridge``: the config the
    bridge builds (``model.transformer_config``), which must work for *every* accepted layout."""
    pytest.importorskip("megatron.core")
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    make = _raw_megatron_config if builder == "raw" else _megatron_config
    checked = 0
    for n, pp, vpp, first, last in _grid():
        layout = ParallelLayout(pp=pp, vpp=vpp, first_stage_layers=first, last_stage_layers=last)
        try:
            layout.stage_layer_counts(n)
        except LayoutError:
            continue
        if builder == "raw" and _megatron_cannot_compute_offsets(layout):
            continue
        config = make(n, layout)
        for vp in range(vpp):
            vp_stage = vp if vpp > 1 else None
            for stage in range(pp):
                chunk = layout.chunk_layers(n, stage, vp)
                where = f"n={n} {layout.short()} stage={stage} chunk={vp}"
                assert chunk.start == get_transformer_layer_offset(config, vp_stage, stage), where
                assert len(chunk) == get_num_layers_to_build(config, vp_stage, stage), where
        checked += 1
    assert checked > 100  # the grid really exercised many layouts


def _megatron_accepts(n, layout):
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    try:
        config = _raw_megatron_config(n, layout)
        counts = [get_num_layers_to_build(config, vp if layout.vpp > 1 else None, s)
                  for vp in range(layout.vpp) for s in range(layout.pp)]
        if not _megatron_cannot_compute_offsets(layout):
            for vp in range(layout.vpp):
                for s in range(layout.pp):
                    get_transformer_layer_offset(config, vp if layout.vpp > 1 else None, s)
    except (ValueError, AssertionError):
        return False
    return all(c > 0 for c in counts) and sum(counts) == n


def test_validity_matches_megatron():
    """Where pp >= 2, a pipeline split is rejected by the layout exactly when megatron-core would
    reject it (or build an empty / incomplete stage)."""
    pytest.importorskip("megatron.core")
    disagreements = []
    for n, pp, vpp, first, last in _grid():
        if pp == 1:
            continue
        layout = ParallelLayout(pp=pp, vpp=vpp, first_stage_layers=first, last_stage_layers=last)
        try:
            layout.stage_layer_counts(n)
            ours = True
        except LayoutError:
            ours = False
        if ours != _megatron_accepts(n, layout):
            disagreements.append((n, layout.short(), ours))
    assert not disagreements, disagreements[:10]


# ---- rank coordinates ---------------------------------------------------------------------------

@pytest.mark.parametrize("tp,pp,dp,ep,etp,cp", [
    (1, 1, 1, 1, 1, 1), (2, 1, 1, 1, 2, 1), (1, 2, 1, 1, 1, 1), (2, 2, 1, 1, 2, 1), (2, 2, 2, 1, 2, 1),
    (4, 2, 1, 1, 4, 1), (1, 1, 4, 1, 1, 1), (2, 3, 2, 1, 2, 1), (1, 4, 2, 1, 1, 1), (8, 1, 1, 1, 8, 1),
    # experts: a second grid over each stage's ranks (etp fastest, then ep, then expert-dp)
    (1, 1, 2, 2, 1, 1), (1, 1, 4, 4, 1, 1), (2, 1, 2, 2, 1, 1), (2, 1, 2, 2, 2, 1), (2, 2, 2, 4, 1, 1),
    (1, 2, 4, 2, 2, 1), (4, 1, 2, 8, 1, 1), (2, 1, 4, 2, 4, 1),
    # context parallel: between tp and dp in the dense grid; expert-dp spans cp x dp
    (1, 1, 1, 1, 1, 2), (2, 1, 1, 1, 2, 2), (2, 2, 2, 1, 2, 2), (1, 2, 1, 1, 1, 4), (1, 1, 2, 2, 1, 2),
    (2, 1, 2, 4, 1, 2), (2, 2, 1, 2, 2, 2)])
def test_coords_match_megatron_rank_generator(tp, pp, dp, ep, etp, cp):
    from megatron.core.parallel_state import RankGenerator

    layout = ParallelLayout(tp=tp, pp=pp, ep=ep, etp=etp, cp=cp, sp=tp > 1 and ep > 1)
    world = tp * cp * pp * dp
    edp = world // (etp * ep * pp)
    dense = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    expert = RankGenerator(tp=etp, ep=ep, dp=edp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    expected = {r: {} for r in range(world)}
    for gen, kinds in ((dense, {"tp": "tp", "cp": "cp", "dp": "dp", "pp": "pp"}),
                       (expert, {"tp": "etp", "ep": "ep", "dp": "edp"})):
        for kind, key in kinds.items():
            for group in gen.get_ranks(kind):
                for pos, r in enumerate(group):
                    expected[r][key] = pos
    for r in range(world):
        assert layout.coords(r, world) == expected[r], r
        c = expected[r]
        assert layout.stage_rank(world, c["pp"], tp=c["tp"], dp=c["dp"], cp=c["cp"]) == r
        assert layout.expert_rank(world, c["pp"], etp=c["etp"], ep=c["ep"], edp=c["edp"]) == r


def test_context_parallel_layout():
    layout = ParallelLayout(tp=2, cp=2)
    assert layout.short() == "tp2-pp1-cp2" and layout.min_world_size == 4 and layout.to_dict()["cp"] == 2
    layout.validate(**DIMS, world_size=8)
    with pytest.raises(LayoutError, match=r"world size 6 is not a multiple of tp\*cp\*pp=4"):
        layout.validate(**DIMS, world_size=6)
    with pytest.raises(LayoutError, match="--cp must be >= 1"):
        ParallelLayout(cp=0)
    assert ParallelLayout(**ParallelLayout(cp=2).to_dict()) == ParallelLayout(cp=2)
    assert ParallelLayout(cp=2).same_grid(ParallelLayout(cp=2, vpp=1)) and not ParallelLayout(cp=2).same_grid(
        ParallelLayout(tp=2))


# ---- vocabulary padding -------------------------------------------------------------------------

def _megatron_lm_padding(vocab, tp, divisible_by):
    """Megatron-LM's ``_vocab_size_with_padding``, verbatim in spirit: count up to the multiple."""
    after, multiple = vocab, divisible_by * tp
    while after % multiple != 0:
        after += 1
    return after


@settings(max_examples=200, deadline=None)
@given(vocab=st.integers(1, 200_000), tp=st.sampled_from([1, 2, 3, 4, 8]),
       divisible_by=st.sampled_from([1, 64, 128]))
def test_padded_vocab_size(vocab, tp, divisible_by):
    padded = padded_vocab_size(vocab, tp, divisible_by)
    assert padded == _megatron_lm_padding(vocab, tp, divisible_by)
    assert padded >= vocab and padded % (divisible_by * tp) == 0 and padded - vocab < divisible_by * tp


def test_padded_vocab_default_divisor():
    assert padded_vocab_size(1000, 1) == _megatron_lm_padding(1000, 1, 128)
    assert padded_vocab_size(1000, 8) == _megatron_lm_padding(1000, 8, 128)
    assert padded_vocab_size(1024, 8) == 1024
