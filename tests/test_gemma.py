"""Gemma 3 text (issue 19 item 3): settings from real configs (the published google/gemma-3-1b-it
and transformers' own), refusals, the rule table against transformers' Gemma3ForCausalLM, byte-exact
round trips on the CPU layout matrix, fp32 verification against transformers (sequences longer
than the sliding window) and negative controls located at the right layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mcore_bridge import ParallelLayout as L
from mcore_bridge.families import UnsupportedConfig, family_for
from mcore_bridge.families.gemma import gelu_tanh
from tests import cases, verify_cases

transformers = pytest.importorskip("transformers")
PUBLISHED = Path(__file__).parent / "published"
TINY = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)


def published():
    return json.loads((PUBLISHED / "google__gemma-3-1b-it.json").read_text())


def test_published_1b_settings():
    f = family_for(published())
    c, m = f.architecture.config, f.architecture.model
    assert (c["num_layers"], c["hidden_size"], c["num_attention_heads"], c["num_query_groups"], c["kv_channels"],
            c["ffn_hidden_size"]) == (26, 1152, 4, 1, 256, 6912)
    assert c["qk_layernorm"] and c["gated_linear_unit"] and c["activation_func"] is gelu_tanh
    assert c["softmax_scale"] == 256 ** -0.5 and c["layernorm_epsilon"] == 1e-6
    # 512-token window on 5 of every 6 layers (HF's window counts the token itself: megatron's left reach is 511)
    assert c["window_size"] == (511, 0)
    assert c["window_attn_skip_freq"] == [0 if (i + 1) % 6 == 0 else 1 for i in range(26)]
    assert f.local_layers() == [i for i in range(26) if (i + 1) % 6]
    assert f.local_rotary_base() == 10000.0
    assert m["rotary_base"] == 1e6 and "seq_len_interpolation_factor" not in m
    assert m["share_embeddings_and_output_weights"] is True  # no tie_word_embeddings field: Gemma's default
    assert m["vocab_size"] == 262144 and m["max_sequence_length"] == 32768


def test_transformers_config_settings_agree_with_hf_layer_types():
    """transformers 5 writes per-layer-type ``rope_parameters`` and ``layer_types``; a 4.x-style
    config (``rope_scaling``, ``rope_local_base_freq``, ``sliding_window_pattern``) maps the same."""
    cfg = transformers.AutoConfig.for_model("gemma3_text", **TINY, sliding_window=8, rope_theta=5e5,
                                            rope_local_base_freq=2e4, sliding_window_pattern=3,
                                            rope_scaling={"rope_type": "linear", "factor": 8.0})
    new = family_for(cfg.to_dict())
    assert [i for i, t in enumerate(cfg.layer_types) if t == "sliding_attention"] == new.local_layers() == [0, 1, 3, 4]
    legacy = {k: v for k, v in TINY.items()} | dict(model_type="gemma3_text", sliding_window=8, rope_theta=5e5,
                                                     rope_local_base_freq=2e4, sliding_window_pattern=3,
                                                     rope_scaling={"rope_type": "linear", "factor": 8.0})
    for f in (new, family_for(legacy)):
        c, m = f.architecture.config, f.architecture.model
        assert c["window_size"] == (7, 0) and c["window_attn_skip_freq"] == [1, 1, 0, 1, 1, 0]
        assert m["rotary_base"] == 5e5 and m["seq_len_interpolation_factor"] == 8.0
        assert f.local_rotary_base() == 2e4 and f.local_layers() == [0, 1, 3, 4]


@pytest.mark.parametrize("field,value,match", [
    ("final_logit_softcapping", 30.0, "final_logit_softcapping=30.0"),
    ("attn_logit_softcapping", 50.0, "attn_logit_softcapping=50.0"),
    ("use_bidirectional_attention", True, "use_bidirectional_attention"),
    ("hidden_activation", "gelu", "hidden_activation='gelu'"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_type='yarn'"),
])
def test_refusals(field, value, match):
    with pytest.raises(UnsupportedConfig, match=match):
        family_for({**published(), field: value}).model_settings()


def test_rules_match_transformers_state_dict():
    cfg = transformers.AutoConfig.for_model("gemma3_text", **TINY)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    names = set(model.state_dict()) - {"lm_head.weight"}  # tied: not saved
    f = family_for(cfg.to_dict())
    ours = {n.replace("{L}", str(i)) for r in f.rules() if r.export for n in r.hf for i in range(6)}
    assert ours == names


def test_offset_norm_matches_hf_and_megatron_norm_would_not():
    """The stored weight is an offset from 1 on both sides: our norm equals transformers'
    Gemma3RMSNorm; megatron's plain RMSNorm (torch's) with the same weight would not."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from mcore_bridge.families.gemma_modules import OffsetRMSNorm

    class Cfg:
        params_dtype, sequence_parallel = torch.float32, False

    torch.manual_seed(0)
    w, x = 0.1 * torch.randn(64), torch.randn(3, 64)
    hf, ours, plain = Gemma3RMSNorm(64, eps=1e-6), OffsetRMSNorm(Cfg, 64, eps=1e-6), torch.nn.RMSNorm(64, eps=1e-6)
    for n in (hf, ours, plain):
        n.weight.data.copy_(w)
    assert torch.equal(ours(x), hf(x))
    assert not torch.allclose(plain(x), hf(x), atol=1e-2)


def test_declares_gemma_modules_in_a_block_spec():
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from mcore_bridge.families import gemma_modules as gm
    from mcore_bridge.layout import ParallelLayout
    from mcore_bridge.model import transformer_config
    from mcore_bridge.zoo import _COMMON, ZOO

    fam = family_for({**_COMMON, **ZOO["gemma3_text"]})
    arch = fam.architecture
    assert arch.config_class().__name__ == "TransformerConfig" and arch.model_class() is gm.Gemma3GPT
    spec = arch.layer_spec(transformer_config(fam, ParallelLayout(), torch.float32, "cpu"), None, 0)
    assert isinstance(spec, TransformerBlockSubmodules) and spec.layer_norm is gm.OffsetRMSNorm
    assert len(spec.layer_specs) == 4
    sub = spec.layer_specs[0].submodules
    assert sub.input_layernorm is sub.pre_mlp_layernorm is gm.OffsetRMSNorm
    mlp = sub.mlp.module if hasattr(sub.mlp, "module") else sub.mlp.func.__self__  # 0.19.2: a builder partial
    assert sub.self_attention.module is gm.GemmaSelfAttention and mlp is gm.GemmaMLP
    assert sub.self_attention.submodules.q_layernorm is gm.OffsetRMSNorm
    assert arch.model["local_rope_layers"] == (0, 1, 3) and arch.model["local_rotary_base"] == 10000.0


# ---- multi-process: round trips, verification, negative controls --------------------------------
ROUNDTRIP = [(1, L()), (2, L(tp=2, sp=True)), (2, L(pp=2)), (4, L(tp=2, pp=2, vpp=2))]


@pytest.mark.parametrize("world,layout", [pytest.param(w, l, id=l.short() or "ws1", marks=pytest.mark.world(w))
                                          for w, l in ROUNDTRIP])
def test_roundtrip_byte_exact(world, layout, pools, zoo_model, tmp_path):
    src = zoo_model("gemma3_text")
    out = tmp_path / "converted"
    results = pools.get(world).run(cases.roundtrip, timeout=300, source=str(src), layout=layout.to_dict(),
                                   out_dir=str(out))
    assert len(results) == world
    cases.check_roundtrip(results, src, out)


@pytest.fixture(scope="session")
def ref_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("reference-cache"))


def run(pools, zoo_model, ref_cache, layout, **kw) -> dict:
    out = pools.get(layout.model_parallel_size).run(
        verify_cases.verify, timeout=300, source=str(zoo_model("gemma3_text")), layout=layout.to_dict(),
        reference_cache=ref_cache, **kw)
    return [r for r in out if r is not None][0]


@pytest.mark.parametrize("layout", [pytest.param(l, id=l.short() or "ws1", marks=pytest.mark.world(l.model_parallel_size))
                                    for l in (L(), L(tp=2, sp=True), L(pp=2))])
def test_verifies_fp32_against_transformers(layout, pools, zoo_model, ref_cache):
    assert json.loads((zoo_model("gemma3_text") / "config.json").read_text())["sliding_window"] < 32
    r = run(pools, zoo_model, ref_cache, layout)
    assert r["verdict"] == "pass", r["failures"]
    m = r["metrics"]
    assert m["max_diff"] < 1e-4 and m["top1_agreement"] == 1.0 and abs(m["loss_hf"] - m["loss_mg"]) < 1e-5
    assert [p["probe"] for p in r["layers"]] == ["embedding"] + [f"layer.{i}" for i in range(4)] + ["final_norm"]


CONTROLS = [  # (layout, control, the probe named first)
    (L(), "scale:decoder.layers.1.mlp.post_layernorm.weight:1.01", "layer.1"),  # a sandwich norm
    (L(tp=2), "scale:decoder.layers.3.self_attention.post_layernorm.weight:1.01", "layer.3"),
    (L(), "window:1", "layer.0"),  # HF's window taken as megatron's left reach: off by one
    (L(pp=2), "rope_base:2.0", "layer.2"),  # the global layer's base: the sliding layers before it are clean
    (L(tp=2), "local_rope_base:2.0", "layer.0"),  # the sliding layers' own base
]


@pytest.mark.parametrize("layout,control,where", [
    pytest.param(l, c, w, id=f"{l.short() or 'ws1'}-{c.split(':')[0]}-{w}", marks=pytest.mark.world(l.model_parallel_size))
    for l, c, w in CONTROLS])
def test_negative_controls_caught_at_their_layer(layout, control, where, pools, zoo_model, ref_cache):
    r = run(pools, zoo_model, ref_cache, layout, control=control)
    assert r["verdict"] == "fail"
    assert r["first_diverging"]["probe"] == where
    before = r["layers"][: [p["probe"] for p in r["layers"]].index(where)]
    assert before and all(p["ok"] for p in before)
