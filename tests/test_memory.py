"""Host memory of a conversion per rank: the rank's share plus a bounded buffer, measured (peak RSS,
``VmHWM``) on a model big enough for the share to dominate the interpreter's own noise. The bound
is deliberately generous; bench/convert_bench.py reports the precise numbers."""

from __future__ import annotations

import pytest
import torch

from mcore_bridge import ParallelLayout as L
from mcore_bridge.hf_io import HFCheckpoint
from tests import cases

MB = 1 << 20
BUCKET = 16 * MB


@pytest.fixture(scope="module")
def mid_moe(tmp_path_factory):
    """A random Qwen3-MoE of ~150 MB (fp32): 4 layers, hidden 256, 16 experts of width 512."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=8192, hidden_size=256, intermediate_size=512,
                               moe_intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                               num_key_value_heads=4, head_dim=32, num_experts=16, num_experts_per_tok=2,
                               norm_topk_prob=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("mid-moe")
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
    return out


@pytest.mark.world(2)
def test_peak_memory_per_rank_is_its_share_plus_a_bounded_buffer(mid_moe, pools, tmp_path):
    total = sum(i.nbytes for i in HFCheckpoint(mid_moe).tensors.values())
    results = pools.get(2).run(cases.conversion_memory, timeout=300, source=str(mid_moe),
                               layout=L(ep=2).to_dict(), work=str(tmp_path / "work"), bucket_bytes=BUCKET)
    slack = 48 * MB  # allocator and interpreter noise
    for r in results:
        share, rises = r["share"], r["rises"]
        assert 0.3 * total < share < 0.8 * total  # experts split over the two ranks, the rest replicated
        # loading: the parameters, plus at most the largest tensor mapped while it is copied
        assert rises["load_hf"] <= share + r["largest_tensor"] + slack, (r, total)
        assert rises["load_dist"] <= share + r["largest_tensor"] + slack, (r, total)
        # saving: gather buffers of a bucket or two (or one tensor bigger than a bucket), never the model
        bound = 4 * max(BUCKET, r["largest_tensor"]) + slack
        assert rises["save_hf"] <= bound, (r, total)
        assert rises["save_dist"] <= share + slack, (r, total)
