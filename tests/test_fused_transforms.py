"""Transforms whose HF source is one fused tensor (Phi-3 ``qkv_proj`` [q; k; v], Phi-3 / GLM-4
``gate_up_proj`` [gate; up]): for random shapes and tp,
  * a rank's shard equals the split transform's shard built from the separate row blocks, and the
    layout is checked from scratch (megatron's per-group interleaving, [gate_r; up_r]);
  * the regions a rank reads are its own rows only: read through a real safetensors file they give
    the shard, over all ranks they cover every row of the tensor exactly once;
  * ``to_hf`` over all ranks' shards rebuilds the fused tensor bit for bit.
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

from mcore_bridge.transforms import FUSED_GATED_MLP, GATED_MLP, QKV, FusedQKV, ShapeMismatch

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _distinct(shape):
    n = 1
    for s in shape:
        n *= s
    return torch.arange(n, dtype=torch.float32).reshape(shape)


def _file_reads(t, full: torch.Tensor, local, tp):
    """Per rank: (shard assembled from the file regions, rows read)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "w.safetensors"
        save_file({"fused": full.contiguous()}, str(path))
        out = []
        with safe_open(str(path), framework="pt") as f:
            for rank in range(tp):
                regions = t.slices([tuple(full.shape)], local, tp, rank)
                assert t.region_sources(len(regions)) == [0] * len(regions)
                pieces = [f.get_slice("fused")[r] for r in regions]
                into = torch.full(local, 7.0)
                t.to_mcore_into(pieces, into, tp, rank)
                assert torch.equal(into, t.to_mcore(pieces, local, tp, rank))
                rows = [i for r in regions for i in range(r[0].start, r[0].stop)]
                out.append((into, rows))
    return out


@SETTINGS
@given(tp=st.sampled_from([1, 2, 4]), per_rank_groups=st.integers(1, 2), q_per_group=st.integers(1, 3),
       head_dim=st.integers(1, 4), cols=st.integers(1, 3), bias=st.booleans())
def test_fused_qkv(tp, per_rank_groups, q_per_group, head_dim, cols, bias):
    groups = tp * per_rank_groups
    heads, d = groups * q_per_group, head_dim
    q, kv = heads * d, groups * d
    full = _distinct((q + 2 * kv,) if bias else (q + 2 * kv, cols))
    t = FusedQKV(heads, groups, d)
    local = t.local_shape([tuple(full.shape)], tp)
    split = QKV(heads, groups, d)
    parts = [full[:q], full[q:q + kv], full[q + kv:]]
    assert tuple(local) == tuple(split.local_shape([tuple(p.shape) for p in parts], tp))
    reads = _file_reads(t, full, local, tp)
    seen = []
    for rank, (shard, rows) in enumerate(reads):
        assert torch.equal(shard, split.split(parts, local, tp, rank))
        assert torch.equal(shard, t.split([full], local, tp, rank))
        # from scratch: group g of this rank holds its q heads, then its k head, then its v head
        g0, expect = rank * per_rank_groups, []
        for g in range(g0, g0 + per_rank_groups):
            expect += [full[g * q_per_group * d:(g + 1) * q_per_group * d], full[q + g * d:q + (g + 1) * d],
                       full[q + kv + g * d:q + kv + (g + 1) * d]]
        assert torch.equal(shard, torch.cat(expect))
        assert len(rows) == shard.shape[0]  # only this rank's rows are read
        seen += rows
    assert sorted(seen) == list(range(full.shape[0]))  # every row read by exactly one rank
    back = t.to_hf([s for s, _ in reads], [tuple(full.shape)])
    assert len(back) == 1 and torch.equal(back[0], full)


@SETTINGS
@given(tp=st.sampled_from([1, 2, 4]), per_rank=st.integers(1, 4), cols=st.integers(1, 4))
def test_fused_gated_mlp(tp, per_rank, cols):
    ffn = tp * per_rank
    full = _distinct((2 * ffn, cols))
    gate, up = full[:ffn], full[ffn:]
    local = FUSED_GATED_MLP.local_shape([tuple(full.shape)], tp)
    reads = _file_reads(FUSED_GATED_MLP, full, local, tp)
    seen = []
    for rank, (shard, rows) in enumerate(reads):
        sl = slice(rank * per_rank, (rank + 1) * per_rank)
        assert torch.equal(shard, torch.cat([gate[sl], up[sl]]))  # [gate_r; up_r]
        assert torch.equal(shard, GATED_MLP.split([gate, up], local, tp, rank))
        assert len(rows) == shard.shape[0]
        seen += rows
    assert sorted(seen) == list(range(2 * ffn))
    back = FUSED_GATED_MLP.to_hf([s for s, _ in reads], [tuple(full.shape)])
    assert len(back) == 1 and torch.equal(back[0], full)


def test_wrong_fused_shapes_are_refused_with_the_numbers():  # negative controls
    with pytest.raises(ShapeMismatch, match=r"fused qkv rows 30 != \(heads 4 \+ 2 x query groups 2\) x head_dim 4"):
        FusedQKV(4, 2, 4).local_shape([(30, 8)], 1)
    with pytest.raises(ShapeMismatch, match="fused gate/up rows 7 are not even"):
        FUSED_GATED_MLP.local_shape([(7, 8)], 1)
    with pytest.raises(ShapeMismatch, match="does not split over tp=4"):
        FUSED_GATED_MLP.local_shape([(12, 8)], 4)
