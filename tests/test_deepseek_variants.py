"""DeepSeek-V3 relatives: Moonlight (rms_norm_eps 1e-5 while HF's q/kv latent norms keep a fixed
1e-6) and Kimi-K2 (``model_type: kimi_k2``, DeepSeek-V3's architecture, n_group 1)."""

from __future__ import annotations

import pytest

from mcore_bridge import ParallelLayout as L
from mcore_bridge import zoo
from mcore_bridge.families import DeepSeekV3, family_for
from mcore_bridge.zoo import _COMMON, ZOO
from tests import fp8_cases


@pytest.fixture(scope="module")
def eps_model(tmp_path_factory):
    spec = dict(ZOO["deepseek_v3"], rms_norm_eps=1e-5)
    ZOO["_deepseek_eps"] = spec
    try:
        out = tmp_path_factory.mktemp("ds-eps") / "m"
        zoo.build("_deepseek_eps", out)
    finally:
        del ZOO["_deepseek_eps"]
    return out


@pytest.mark.world(1)
def test_latent_norms_keep_hf_eps_when_rms_norm_eps_differs(eps_model, pools):
    fixed = pools.get(1).run(fp8_cases.logits_latent_eps, timeout=300, source=str(eps_model), layout={})[0]
    # control: the latent norms built with rms_norm_eps, as megatron's MLA does by itself
    control = pools.get(1).run(fp8_cases.logits_latent_eps, timeout=300, source=str(eps_model), layout={},
                               latent_eps=1e-5)[0]
    assert fixed < 1e-5, fixed  # measured 2.4e-7
    assert control > 20 * fixed and control > 2e-5, (fixed, control)  # measured 1.3e-4




def test_kimi_k2_is_deepseek_v3():
    cfg = {**_COMMON, **ZOO["deepseek_v3"], "model_type": "kimi_k2", "n_group": 1, "topk_group": 1}
    fam = family_for(cfg)
    assert isinstance(fam, DeepSeekV3)
    s = fam.architecture.config
    assert s["moe_router_num_groups"] is None and s["moe_router_group_topk"] is None  # n_group 1: no grouping
    assert s["moe_router_score_function"] == "sigmoid" and s["moe_router_enable_expert_bias"]
