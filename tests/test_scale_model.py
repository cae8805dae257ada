"""bench/scale_model.py's arithmetic on cases whose answer is known without it: ranks reading 1/N
of the bytes each, and a MoE model whose per-rank reads and total writes follow from its config and
from transformers' own parameter count. No timing is measured or asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests import scale_cases

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import scale_model as sm  # noqa: E402


def test_each_rank_moving_one_nth_is_one_node_share_over_the_node_rate():
    total, n, g = 640e9, 32, 8  # 640 GB over 32 ranks, 8 per node: every node writes 160 GB
    # each rank writes total / n, three quarters of it copied file to file; the rest it reads (as FP8:
    # half the bytes) and writes from memory
    ranks = [sm.RankLoad(0, i, held_bytes=total / n, read_bytes=total / n / 8, write_bytes=total / n,
                         copy_bytes=total / n * 3 / 4, largest_bytes=1e9) for i in range(n)]
    rates = sm.Rates(copy_gbps=2.0, read_gbps=4.0, write_gbps=0.5, fixed_s=10.0, gpus_per_node=g)
    p = sm.predict(ranks, rates)
    assert p["nodes"] == 4 and p["copied"] == pytest.approx(0.75)
    assert p["copy_s"] == pytest.approx(120 / 2.0)
    assert p["to_mcore_s"] == pytest.approx(10 + 120 / 2.0 + 20 / 4.0 + 40 / 0.5)
    assert p["to_hf_s"] == pytest.approx(10 + 160 / 2.0)  # Megatron -> HF: every byte from the files
    assert p["peak_import_gb"] == pytest.approx(20 + 1)
    assert p["peak_export_gb"] == pytest.approx(20 + (sm.BUCKET_BYTES + sm.SHARD_BYTES) / 1e9)
    # one rank copying twice as much makes its node, and so the conversion, slower by that rank's extra
    ranks[9] = sm.RankLoad(0, 9, total / n, total / n / 8, total / n + 15e9, total / n * 3 / 4 + 15e9, 1e9)
    assert sm.predict(ranks, rates)["to_mcore_s"] == pytest.approx(10 + 135 / 2.0 + 20 / 4.0 + 40 / 0.5)
    assert sm.predict(ranks, rates)["to_hf_s"] == pytest.approx(10 + 175 / 2.0)


def test_the_model_against_io_floor_results_is_fixed_plus_copy(tmp_path):
    res = {"bytes": 4e9, "label": "x", "times": {"copy floor": [4.0, 6.0], "fixed (1 proc)": [2.0, 2.0],
                                                  "hf->plain (1 proc)": [9.0, 9.0], "hf->plain (1 proc) baseline": [1.0]}}
    (tmp_path / "r.json").write_text(json.dumps(res))
    rows = sm.check_io_floor([str(tmp_path / "r.json")]).splitlines()[2:]
    assert rows == ["| x | 4.00 | hf->plain (1 proc) | 9.00 | 7.00 | 1.29 |"]  # 9 / (2 + 5)


MOE = dict(model_type="qwen3_moe", vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
           num_experts_per_tok=2, tie_word_embeddings=False)
@pytest.mark.world(1)
def test_expert_parallel_reads_and_writes_follow_from_the_config(pools):
    got = pools.get(1).run(scale_cases.ep4_loads, timeout=300, raw=MOE)[0]
    ranks, hf_bytes = got["ranks"], 2 * got["hf"]
    experts = 2 * MOE["num_hidden_layers"] * MOE["num_experts"] * 3 * MOE["hidden_size"] * MOE["moe_intermediate_size"]
    assert len(ranks) == 4
    # every rank holds the dense part whole and a quarter of the experts; a bf16 source is copied file
    # to file, so no rank reads anything into memory
    for r in ranks:
        assert r["held_bytes"] == pytest.approx(hf_bytes - experts + experts / 4)
        assert r["read_bytes"] == 0 and r["copy_bytes"] == r["write_bytes"]
    # every tensor is written once: dense by the first replica, experts by their EP rank
    assert sum(r["write_bytes"] for r in ranks) == pytest.approx(hf_bytes)
    assert ranks[0]["write_bytes"] == pytest.approx(hf_bytes - experts + experts / 4)
    assert ranks[1]["write_bytes"] == pytest.approx(experts / 4)


@pytest.mark.world(1)
def test_an_fp8_source_loads_its_quantised_projections_and_copies_the_rest(pools):
    """Blockwise FP8 (DeepSeek-V3 as published): the quantised ``*_proj.weight`` matrices are read at
    one byte per weight plus a float32 scale per 128 x 128 block and dequantised into memory; the
    embedding, head, norms and routers are still copied."""
    got = pools.get(1).run(scale_cases.ep4_loads, timeout=300, raw=MOE, fp8=True)[0]
    ranks = got["ranks"]
    h, f, e, layers = MOE["hidden_size"], MOE["moe_intermediate_size"], MOE["num_experts"], MOE["num_hidden_layers"]
    attn = layers * h * (2 * 4 * 16 + 2 * 2 * 16)  # q, o: 4 heads x 16; k, v: 2 heads x 16
    experts = layers * e * 3 * h * f
    per_weight = 1 + 4 / sm.FP8_BLOCK
    for r in ranks:
        assert r["read_bytes"] == pytest.approx((attn + experts / 4) * per_weight)
    copied = sum(r["copy_bytes"] for r in ranks)
    assert copied == pytest.approx(2 * (2 * MOE["vocab_size"] * h + layers * (2 * h + 2 * 16 + e * h) + h))
    assert sum(r["write_bytes"] for r in ranks) - copied == pytest.approx(2 * (attn + experts))
