"""bench/scale_model.py's arithmetic on cases whose answer is known without it: ranks reading 1/N
of the bytes each, and a MoE model whose per-rank reads and total writes follow from its config and
from transformers' own parameter count. No timing is measured or asserted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests import scale_cases

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import scale_model as sm  # noqa: E402


def test_each_rank_reading_one_nth_is_one_node_share_over_the_node_rate():
    total, n, g = 640e9, 32, 8  # 640 GB over 32 ranks, 8 per node: every node moves 160 GB
    ranks = [sm.RankLoad(0, i, held_bytes=total / n, read_bytes=total / n, write_bytes=total / n, gathers=100,
                         largest_bytes=1e9) for i in range(n)]
    rates = sm.Rates(read_gbps=4.0, write_dist_gbps=0.5, read_dist_gbps=2.0, write_hf_gbps=1.0, msg_s=1e-3,
                     fixed_s=10.0, gpus_per_node=g)
    p = sm.predict(ranks, rates)
    assert p["nodes"] == 4
    assert p["read_hf_s"] == pytest.approx(160 / 4.0)
    assert p["write_dist_s"] == pytest.approx(160 / 0.5)
    assert p["to_mcore_s"] == pytest.approx(10 + 40 + 320)
    assert p["to_hf_s"] == pytest.approx(10 + 160 / 2.0 + 160 / 1.0 + 100 * 1e-3)
    assert p["peak_import_gb"] == pytest.approx(20 + 1)
    assert p["peak_export_gb"] == pytest.approx(20 + (sm.BUCKET_BYTES + sm.SHARD_BYTES) / 1e9)
    # one rank reading twice as much makes its node, and so the phase, slower by that rank's extra
    ranks[9] = sm.RankLoad(0, 9, total / n, 2 * total / n, total / n, 100, 1e9)
    assert sm.predict(ranks, rates)["read_hf_s"] == pytest.approx((160 + 20) / 4.0)


MOE = dict(model_type="qwen3_moe", vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
           num_experts_per_tok=2, tie_word_embeddings=False)
@pytest.mark.world(1)
def test_expert_parallel_reads_and_writes_follow_from_the_config(pools):
    got = pools.get(1).run(scale_cases.ep4_loads, timeout=300, raw=MOE)[0]
    ranks, hf_bytes = got["ranks"], 2 * got["hf"]
    experts = 2 * MOE["num_hidden_layers"] * MOE["num_experts"] * 3 * MOE["hidden_size"] * MOE["moe_intermediate_size"]
    assert len(ranks) == 4
    # every rank reads the dense part whole and a quarter of the experts (bf16 source)
    for r in ranks:
        assert r["read_bytes"] == pytest.approx(hf_bytes - experts + experts / 4)
        assert r["held_bytes"] == pytest.approx(r["read_bytes"])
    # every tensor is written once: dense by the first replica, experts by their EP rank
    assert sum(r["write_bytes"] for r in ranks) == pytest.approx(hf_bytes)
    assert ranks[0]["write_bytes"] == pytest.approx(hf_bytes - experts + experts / 4)
    assert ranks[1]["write_bytes"] == pytest.approx(experts / 4)
    assert all(r["gathers"] == 0 for r in ranks)  # tp = etp = 1: nothing to gather
