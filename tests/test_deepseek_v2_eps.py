"""DeepSeek-V2 with ``rms_norm_eps`` other than 1e-6 (once refused): transformers builds the q/kv
latent norms at a fixed 1e-6 and the decoder norms at ``rms_norm_eps``; the V3 layer spec V2
inherits builds megatron's latent norms the same way, so the model converts and verifies. The
control builds the latent norms at ``rms_norm_eps`` (megatron's MLA left to itself) and differs."""

from __future__ import annotations

import pytest

from mcore_bridge import zoo
from mcore_bridge.families import family_for
from mcore_bridge.zoo import _COMMON, ZOO
from tests import fp8_cases


@pytest.fixture(scope="module")
def v2_eps_model(tmp_path_factory):
    ZOO["_deepseek_v2_eps"] = dict(ZOO["deepseek_v2"], rms_norm_eps=1e-5)
    try:
        out = tmp_path_factory.mktemp("dsv2-eps") / "m"
        zoo.build("_deepseek_v2_eps", out)
    finally:
        del ZOO["_deepseek_v2_eps"]
    return out


def test_deepseek_v2_takes_any_rms_norm_eps():
    fam = family_for({**_COMMON, **ZOO["deepseek_v2"], "rms_norm_eps": 1e-5})
    assert fam.model_settings()["config"]["layernorm_epsilon"] == 1e-5  # the decoder norms


@pytest.mark.world(1)
def test_deepseek_v2_with_another_eps_verifies_against_transformers(v2_eps_model, pools):
    fixed = pools.get(1).run(fp8_cases.logits_latent_eps, timeout=300, source=str(v2_eps_model), layout={})[0]
    control = pools.get(1).run(fp8_cases.logits_latent_eps, timeout=300, source=str(v2_eps_model), layout={},
                               latent_eps=1e-5)[0]
    print(f"\nDeepSeek-V2 rms_norm_eps 1e-5: max |megatron - HF| logits {fixed:.2e}; "
          f"latent norms at 1e-5 {control:.2e}")
    assert fixed < 1e-5, fixed
    assert control > 20 * fixed and control > 2e-5, (fixed, control)
