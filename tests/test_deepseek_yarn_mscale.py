"""DeepSeek-V3's yarn scaling with only one of ``mscale`` / ``mscale_all_dim`` (once both refused).

transformers multiplies cos/sin by m(f, mscale) / m(f, mscale_all_dim) only when both are set, else by
m(f, 1), and the softmax scale by m(f, mscale_all_dim)^2 when that is set; megatron-core's MLA always
uses m(f, mscale) / m(f, mscale_all_dim) and m(f, mscale_all_dim)^2 with m(f, 0) = 1. A lone mscale is
therefore megatron's mscale = 1 (accepted, verified); a lone mscale_all_dim has no counterpart (refused;
the difference is shown on both libraries' own functions)."""

from __future__ import annotations

import math

import pytest

from mcore_bridge import zoo
from mcore_bridge.families import UnsupportedConfig, family_for
from mcore_bridge.zoo import _COMMON, ZOO
from tests import cases

transformers = pytest.importorskip("transformers")
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0}


def v3(**rope):
    return {**_COMMON, **ZOO["deepseek_v3"], "max_position_embeddings": 2560, "rope_parameters": {**YARN, **rope}}


def hf_scales(raw):
    """transformers' own cos/sin factor and softmax scale of DeepSeek-V3 attention for ``raw``."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    cfg = transformers.AutoConfig.for_model(**raw)
    _, factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    return factor, yarn_apply_mscale(cfg.rope_parameters, head ** -0.5)


def megatron_scales(raw, mscale=None, mscale_all_dim=None):
    """megatron-core's MLA cos/sin factor and softmax scale for the settings the family maps ``raw`` to
    (or for the mscales given)."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor, _yarn_get_mscale)

    c = family_for(raw).model_settings()["config"]
    m = c["mscale"] if mscale is None else mscale
    m_all = c["mscale_all_dim"] if mscale_all_dim is None else mscale_all_dim
    head = c["qk_head_dim"] + c["qk_pos_emb_head_dim"]
    f = c["rotary_scaling_factor"]
    return _yarn_get_concentration_factor(f, m, m_all), _yarn_get_mscale(f, m_all) ** 2 / math.sqrt(head)


def test_a_lone_mscale_maps_to_megatron_mscale_1():
    raw = v3(mscale=0.707)
    c = family_for(raw).model_settings()["config"]
    assert (c["mscale"], c["mscale_all_dim"]) == (1.0, 0.0)
    assert megatron_scales(raw) == pytest.approx(hf_scales(raw), rel=1e-12)
    # control: passing the lone mscale through scales cos/sin by m(40, 0.707) instead of m(40, 1)
    wrong, _ = megatron_scales(raw, mscale=0.707)
    assert abs(wrong / hf_scales(raw)[0] - 1) > 0.05


def test_a_lone_mscale_all_dim_is_refused_and_differs():
    raw = v3(mscale_all_dim=0.707)
    with pytest.raises(UnsupportedConfig, match="mscale_all_dim=0.707 without mscale"):
        family_for(raw).model_settings()
    hf_factor, hf_softmax = hf_scales(raw)
    got_factor, got_softmax = megatron_scales(v3(mscale=1.0, mscale_all_dim=0.707))  # the nearest megatron setting
    assert got_softmax == pytest.approx(hf_softmax, rel=1e-12)  # the softmax scale agrees ...
    assert abs(got_factor / hf_factor - 1) > 0.05  # ... cos/sin do not: divided by m(40, 0.707)
    family_for(v3(mscale_all_dim=0.707, factor=1.0)).model_settings()  # factor 1: every m is 1, accepted


@pytest.fixture(scope="module")
def lone_mscale_model(tmp_path_factory):
    ZOO["_deepseek_lone_mscale"] = dict(ZOO["deepseek_v3"], max_position_embeddings=2560,
                                       rope_parameters={**YARN, "mscale": 0.707})
    try:
        out = tmp_path_factory.mktemp("ds-mscale") / "m"
        zoo.build("_deepseek_lone_mscale", out)
    finally:
        del ZOO["_deepseek_lone_mscale"]
    return out


@pytest.mark.world(1)
def test_a_lone_mscale_verifies_against_transformers(lone_mscale_model, pools):
    diff = pools.get(1).run(cases.logits, timeout=300, source=str(lone_mscale_model), layout={})[0]
    print(f"\nDeepSeek-V3 yarn with a lone mscale 0.707: max |megatron - HF| logits {diff:.2e}")
    assert diff < 1e-5, diff


def test_an_explicit_attention_factor_is_accepted_where_megatron_derives_the_same():
    raw = v3(mscale=0.707, mscale_all_dim=0.707, attention_factor=1.0)  # m / m = 1 exactly
    assert megatron_scales(raw) == pytest.approx(hf_scales(raw), rel=1e-12)
    other = v3(mscale=0.707, mscale_all_dim=0.707, attention_factor=1.2)
    with pytest.raises(UnsupportedConfig, match="attention_factor=1.2"):
        family_for(other).model_settings()
    assert abs(megatron_scales(raw)[0] / hf_scales(other)[0] - 1) > 0.1  # what megatron would compute instead
