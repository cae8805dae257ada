"""The converted megatron model computes the HF model's logits (fp32), on varied layouts."""

from __future__ import annotations

import pytest

from mcore_bridge import ParallelLayout as L
from mcore_bridge import zoo
from tests import cases
from tests.matrix import param

FP32_TOL = 1e-5
# The tiny Gemma 3 (sharpened (1+w) q/k norms, post norms, x8 embedding) is numerically touchier:
# transformers' own fp32 logits differ from its fp64 ones by 4.7e-5 (eager vs sdpa: 9.5e-6;
# llama: 3.5e-7 and 2.4e-7), measured on this batch. Megatron vs HF: 1.4e-5.
TOL = {"gemma3_text": 3e-5}
CASES = [
    param("llama", 4, L(tp=2, pp=2)),
    param("mistral", 2, L(pp=2, vpp=2)),
    param("qwen2", 2, L(tp=2, sp=True)),
    param("qwen3", 4, L(tp=4, sp=True)),
] + [param(m, 1, L()) for m in zoo.TEXT]  # dense and MoE (vision-language: test_multimodal)


@pytest.mark.parametrize("model,world,layout", CASES)
def test_logits_match_hf(model, world, layout, pools, zoo_model):
    src = zoo_model(model)
    diffs = pools.get(world).run(cases.logits, timeout=300, source=str(src), layout=layout.to_dict())
    reported = [d for d in diffs if d is not None]
    assert len(reported) == 1, diffs  # exactly one rank (first of the last stage) compares
    assert reported[0] < TOL.get(model, FP32_TOL)
