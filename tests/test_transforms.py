"""Property tests for the transform vocabulary (mcore_bridge.transforms), single process.

For every transform and random shapes / tp sizes:
  (a) splitting for every rank and gathering back with ``to_hf`` is the identity;
  (b) ``local_shape`` predicts the shard shape (Vocab: None, the model decides the padding);
  (c) the regions from ``slices`` read through a real safetensors file equal in-memory indexing,
      and ``to_mcore`` over those file reads gives the same shard;
  (d) QKV shards follow megatron's per-query-group interleaving, checked from scratch here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from mcore_bridge.layout import padded_vocab_size
from mcore_bridge.transforms import (COLUMN, GATED_MLP, QKV, REPLICATED, ROW, VOCAB, GatedMLP, Replicated,
                                     ShapeMismatch, Split, Vocab)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TPS = st.sampled_from([1, 2, 4, 8])
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


def _distinct(shape, dtype=torch.float32, offset=0):
    """A tensor whose entries are all different (and differ between sources with other ``offset``),
    so any misplaced element shows. 16-bit types get distinct finite bit patterns."""
    n = 1
    for s in shape:
        n *= s
    if dtype in (torch.float16, torch.bfloat16):
        assert n <= 4000
        one = 0x3C00 if dtype == torch.float16 else 0x3F80  # bit pattern of 1.0
        bits = one + offset * 4000 + torch.randperm(max(n, 1))[:n]
        return bits.to(torch.int16).view(dtype).reshape(shape)
    return (torch.arange(n, dtype=torch.float64) + offset * 1e6).reshape(shape).to(dtype)


def _shards(transform, full, tp):
    hf = [tuple(t.shape) for t in full]
    local = transform.local_shape(hf, tp)
    return local, [transform.split(full, local, tp, r) for r in range(tp)]


def _check_file_reads(transform, full, local, tp):
    """(c): regions read with safetensors' lazy slicing == indexing the in-memory tensor, and the
    shard assembled from the file reads equals the in-memory split."""
    hf = [tuple(t.shape) for t in full]
    names = [f"t{i}" for i in range(len(full))]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "w.safetensors"
        save_file({n: t.contiguous() for n, t in zip(names, full)}, str(path))
        with safe_open(str(path), framework="pt") as f:
            for rank in range(tp):
                regions = transform.slices(hf, local, tp, rank)
                assert len(regions) == len(full)
                pieces = []
                for name, t, region in zip(names, full, regions):
                    from_file = f.get_slice(name)[region]
                    expected = t[region]
                    assert from_file.dtype == t.dtype
                    assert tuple(from_file.shape) == tuple(expected.shape), (name, region)
                    assert torch.equal(from_file, expected), (name, region)
                    pieces.append(from_file)
                shard = transform.to_mcore(pieces, local, tp, rank)
                assert torch.equal(shard, transform.split(full, local, tp, rank))
                # the in-place path the loader uses writes the same shard over stale memory
                into = torch.full(tuple(shard.shape), 7.0).to(shard.dtype)
                transform.to_mcore_into(pieces, into, tp, rank)
                assert torch.equal(into, shard)


def _assert_identity(transform, full, shards):
    back = transform.to_hf(shards, [tuple(t.shape) for t in full])
    assert len(back) == len(full)
    for b, t in zip(back, full):
        assert b.dtype == t.dtype
        assert tuple(b.shape) == tuple(t.shape)
        assert torch.equal(b, t)


# ---- Replicated ---------------------------------------------------------------------------------

@SETTINGS
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), tp=TPS, dtype=DTYPES)
def test_replicated(shape, tp, dtype):
    full = [_distinct(tuple(shape), dtype)]
    local, shards = _shards(REPLICATED, full, tp)
    assert isinstance(REPLICATED, Replicated) and REPLICATED.tp_split is False
    assert tuple(local) == tuple(shape)
    for s in shards:  # every rank holds the whole tensor
        assert tuple(s.shape) == tuple(local)
        assert torch.equal(s, full[0])
    _assert_identity(REPLICATED, full, shards)
    _check_file_reads(REPLICATED, full, local, tp)


# ---- Split: column (dim 0) and row (dim 1) -------------------------------------------------------

@SETTINGS
@given(tp=TPS, per=st.integers(1, 6), other=st.integers(1, 7), bias=st.booleans(), dtype=DTYPES)
def test_column_split(tp, per, other, bias, dtype):
    shape = (tp * per,) if bias else (tp * per, other)
    full = [_distinct(shape, dtype)]
    local, shards = _shards(COLUMN, full, tp)
    assert COLUMN == Split(0)
    for r, s in enumerate(shards):
        assert tuple(s.shape) == tuple(local)
        # independent check: rank r holds rows [r*per, (r+1)*per)
        assert torch.equal(s, full[0][r * per:(r + 1) * per])
    _assert_identity(COLUMN, full, shards)
    _check_file_reads(COLUMN, full, local, tp)


@SETTINGS
@given(tp=TPS, per=st.integers(1, 6), rows=st.integers(1, 7), dtype=DTYPES)
def test_row_split(tp, per, rows, dtype):
    full = [_distinct((rows, tp * per), dtype)]
    local, shards = _shards(ROW, full, tp)
    assert ROW == Split(1)
    assert tuple(local) == (rows, per)
    for r, s in enumerate(shards):
        assert tuple(s.shape) == tuple(local)
        assert torch.equal(s, full[0][:, r * per:(r + 1) * per])
    _assert_identity(ROW, full, shards)
    _check_file_reads(ROW, full, local, tp)


# ---- Vocab --------------------------------------------------------------------------------------

@SETTINGS
@given(tp=TPS, vocab=st.integers(1, 300), hidden=st.integers(1, 6),
       divisible_by=st.sampled_from([1, 2, 8, 128]), dtype=DTYPES)
def test_vocab(tp, vocab, hidden, divisible_by, dtype):
    padded = padded_vocab_size(vocab, tp, divisible_by)
    full = [_distinct((vocab, hidden), dtype)]
    hf = [(vocab, hidden)]
    assert VOCAB.local_shape(hf, tp) is None  # padding is the model's business
    assert isinstance(VOCAB, Vocab)
    local = (padded // tp, hidden)
    shards = [VOCAB.split(full, local, tp, r) for r in range(tp)]
    for r, s in enumerate(shards):
        assert tuple(s.shape) == local
        # independent check: global row i of the padded table is HF row i, or zero past the vocab
        for i in range(local[0]):
            g = r * local[0] + i
            if g < vocab:
                assert torch.equal(s[i], full[0][g])
            else:
                assert torch.count_nonzero(s[i]) == 0
    gathered = torch.cat(shards)
    assert gathered.shape[0] == padded
    _assert_identity(VOCAB, full, shards)
    _check_file_reads(VOCAB, full, local, tp)


# ---- GatedMLP -----------------------------------------------------------------------------------

@SETTINGS
@given(tp=TPS, per=st.integers(1, 5), hidden=st.integers(1, 6), dtype=DTYPES)
def test_gated_mlp(tp, per, hidden, dtype):
    inter = tp * per
    gate, up = _distinct((inter, hidden), dtype, 0), _distinct((inter, hidden), dtype, 1)
    full = [gate, up]
    local, shards = _shards(GATED_MLP, full, tp)
    assert isinstance(GATED_MLP, GatedMLP)
    assert tuple(local) == (2 * per, hidden)
    for r, s in enumerate(shards):
        assert tuple(s.shape) == tuple(local)
        # megatron's fc1 shard on rank r is [gate_r; up_r]
        assert torch.equal(s[:per], gate[r * per:(r + 1) * per])
        assert torch.equal(s[per:], up[r * per:(r + 1) * per])
    _assert_identity(GATED_MLP, full, shards)
    _check_file_reads(GATED_MLP, full, local, tp)


# ---- QKV ----------------------------------------------------------------------------------------

@st.composite
def qkv_case(draw):
    tp = draw(TPS)
    groups = tp * draw(st.integers(1, 3))
    heads = groups * draw(st.integers(1, 4))
    head_dim = draw(st.integers(1, 5))
    hidden = draw(st.integers(1, 5))
    bias = draw(st.booleans())
    return tp, heads, groups, head_dim, hidden, bias


@SETTINGS
@given(case=qkv_case(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_qkv(case, dtype):
    tp, heads, groups, d, hidden, bias = case
    trail = () if bias else (hidden,)
    q = _distinct((heads * d,) + trail, dtype, 0)
    k = _distinct((groups * d,) + trail, dtype, 1)
    v = _distinct((groups * d,) + trail, dtype, 2)
    t = QKV(heads, groups, d)
    full = [q, k, v]
    local, shards = _shards(t, full, tp)
    assert tuple(local) == ((heads + 2 * groups) * d // tp,) + trail
    for s in shards:
        assert tuple(s.shape) == tuple(local)
    _assert_identity(t, full, shards)
    _check_file_reads(t, full, local, tp)

    # (d) megatron's layout, written from scratch: per query group, its q heads, then k, then v;
    # rank r holds query groups [r*groups/tp, (r+1)*groups/tp).
    qpg, gl = heads // groups, groups // tp
    for r, s in enumerate(shards):
        blocks = s.reshape(gl, (qpg + 2) * d, *trail)
        for j in range(gl):
            g = r * gl + j
            qb, kb, vb = blocks[j][:qpg * d], blocks[j][qpg * d:(qpg + 1) * d], blocks[j][(qpg + 1) * d:]
            assert torch.equal(qb, q[g * qpg * d:(g + 1) * qpg * d])
            assert torch.equal(kb, k[g * d:(g + 1) * d])
            assert torch.equal(vb, v[g * d:(g + 1) * d])
            # and head by head: q head h of group g is HF head g*qpg + h
            for h in range(qpg):
                assert torch.equal(qb[h * d:(h + 1) * d], q[(g * qpg + h) * d:(g * qpg + h + 1) * d])


def test_qkv_matches_megatron_view():
    """Megatron's SelfAttention splits its fused output with
    ``view(..., groups, (qpg + 2) * d)`` then ``split([qpg*d, d, d])``; do exactly that to a shard."""
    heads, groups, d, hidden, tp = 8, 4, 3, 5, 2
    q, k, v = torch.randn(heads * d, hidden), torch.randn(groups * d, hidden), torch.randn(groups * d, hidden)
    t = QKV(heads, groups, d)
    local = t.local_shape([q.shape, k.shape, v.shape], tp)
    x = torch.randn(7, hidden)  # 7 tokens
    for r in range(tp):
        shard = t.split([q, k, v], local, tp, r)
        mixed = (x @ shard.T).view(7, groups // tp, (heads // groups + 2) * d)
        qm, km, vm = torch.split(mixed, [heads // groups * d, d, d], dim=-1)
        g0 = r * groups // tp
        q_ref = (x @ q.T).view(7, heads, d)[:, g0 * heads // groups:(g0 + groups // tp) * heads // groups]
        k_ref = (x @ k.T).view(7, groups, d)[:, g0:g0 + groups // tp]
        v_ref = (x @ v.T).view(7, groups, d)[:, g0:g0 + groups // tp]
        torch.testing.assert_close(qm.reshape(7, -1, d), q_ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(km.reshape(7, -1, d), k_ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(vm.reshape(7, -1, d), v_ref, rtol=0, atol=1e-5)


# ---- errors -------------------------------------------------------------------------------------

def test_qkv_rejects_wrong_q_rows():
    t = QKV(heads=8, groups=4, head_dim=2)
    with pytest.raises(ShapeMismatch, match="q rows"):
        t.local_shape([(15, 4), (8, 4), (8, 4)], 1)


def test_qkv_rejects_wrong_kv_rows():
    t = QKV(heads=8, groups=4, head_dim=2)
    with pytest.raises(ShapeMismatch, match="k/v rows"):
        t.local_shape([(16, 4), (8, 4), (6, 4)], 1)
    with pytest.raises(ShapeMismatch, match="k/v rows"):
        t.slices([(16, 4), (10, 4), (8, 4)], (32, 4), 1, 0)


def test_qkv_rejects_trailing_dim_mismatch():
    t = QKV(heads=8, groups=4, head_dim=2)
    with pytest.raises(ShapeMismatch, match="trailing"):
        t.local_shape([(16, 4), (8, 5), (8, 4)], 1)
    with pytest.raises(ShapeMismatch, match="trailing"):  # a bias mixed with a weight
        t.local_shape([(16,), (8, 4), (8, 4)], 1)


def test_qkv_rejects_groups_not_divisible_by_tp():
    t = QKV(heads=6, groups=3, head_dim=2)
    with pytest.raises(ShapeMismatch, match="3 query groups"):
        t.local_shape([(12, 4), (6, 4), (6, 4)], 2)


def test_gated_mlp_rejects_gate_up_mismatch():
    with pytest.raises(ShapeMismatch, match="gate"):
        GATED_MLP.local_shape([(8, 4), (6, 4)], 1)
    with pytest.raises(ShapeMismatch, match="gate"):
        GATED_MLP.local_shape([(8, 4), (8, 5)], 1)


def test_gated_mlp_rejects_indivisible_intermediate():
    with pytest.raises(ShapeMismatch, match="does not split over tp=4"):
        GATED_MLP.local_shape([(6, 4), (6, 4)], 4)


def test_split_rejects_indivisible_dim():
    with pytest.raises(ShapeMismatch, match="tp=4"):
        COLUMN.local_shape([(6, 4)], 4)
    with pytest.raises(ShapeMismatch, match="tp=2"):
        ROW.local_shape([(6, 5)], 2)


def test_vocab_smaller_than_checkpoint():
    # the model's padded vocabulary (rows * tp = 2 * 64) cannot hold 130 checkpoint rows
    with pytest.raises(ShapeMismatch, match="smaller than checkpoint vocab 130"):
        VOCAB.slices([(130, 4)], (64, 4), 2, 0)


def test_vocab_hidden_mismatch():
    with pytest.raises(ShapeMismatch, match="hidden size"):
        VOCAB.slices([(100, 4)], (128, 8), 1, 0)


# -- LoRA factors of fused modules ------------------------------------------------------------
def _lora_b(shapes, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, r, generator=g) for s in shapes]


@pytest.mark.parametrize("inner,shapes", [(QKV(8, 4, 2), [16, 8, 8]), (GATED_MLP, [12, 12])], ids=["qkv", "gate_up"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_block_structured_lora_b_round_trips_and_rows_follow_the_weight(inner, shapes, tp):
    from mcore_bridge.transforms import Blocks

    n, r = len(shapes), 3
    parts = _lora_b(shapes, r)
    t = Blocks(inner, n)
    hf = [tuple(p.shape) for p in parts]
    local = t.local_shape(hf, tp)
    shards = [t.split(parts, local, tp, k) for k in range(tp)]
    assert all(tuple(s.shape) == tuple(local) and local[1] == n * r for s in shards)
    back = t.to_hf(shards, hf)
    assert all(torch.equal(a, b) for a, b in zip(back, parts))
    # each local row carries only its own projection's block, in the weight's row order
    weight_rows = inner.split([torch.full((s, 1), float(i)) for i, s in enumerate(shapes)], (local[0], 1), tp, 0)
    for row, owner in zip(shards[0], weight_rows[:, 0].long()):
        assert not torch.cat([row[: owner * r], row[(owner + 1) * r:]]).any()
    shards[0][0, (int(weight_rows[0, 0]) + 1) % n * r] = 1.0  # an off-block entry: not representable
    with pytest.raises(ShapeMismatch, match="outside its block"):
        t.to_hf(shards, hf)


def test_shared_and_stacked_lora_a():
    from mcore_bridge.transforms import Shared, Stacked

    a = torch.randn(4, 6)
    assert torch.equal(Shared(3).split([a, a, a], (4, 6), 2, 1), a)
    with pytest.raises(ShapeMismatch, match="differ"):
        Shared(3).split([a, a, a + 1], (4, 6), 2, 1)
    parts = [torch.randn(4, 6) for _ in range(2)]
    stacked = Stacked(2).split(parts, (8, 6), 2, 0)
    assert tuple(stacked.shape) == (8, 6)
    assert all(torch.equal(x, y) for x, y in zip(Stacked(2).to_hf([stacked], [(4, 6), (4, 6)]), parts))
