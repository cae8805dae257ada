"""Phi-3 / Phi-4 (``phi3``) and GLM-4-0414 (``glm4``), single process: the published configs and
the megatron settings they map to, every refusal with a measurement showing what computing it
anyway would change, the rotary layouts measured against transformers' own functions, and the
rules against the real transformers models and the saved zoo checkpoints."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
import transformers

from mcore_bridge.families import UnsupportedConfig, family_for
from mcore_bridge.families.sandwich import sandwich_layer_class
from mcore_bridge.layout import ParallelLayout
from mcore_bridge.model import transformer_config
from mcore_bridge.plan import check_names, expected_hf_names, inventory
from mcore_bridge.runtime import compat
from mcore_bridge.transforms import FUSED_GATED_MLP, QKV, FusedQKV

PUBLISHED = Path(__file__).parent / "published"
TINY = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def published(name: str) -> dict:
    return json.loads((PUBLISHED / f"{name}.json").read_text())


def settings(raw: dict) -> tuple[dict, dict]:
    arch = family_for(raw).architecture
    return dict(arch.config), dict(arch.model)


# ---- published configs ------------------------------------------------------------------------

def test_phi4_published_config_maps_to_these_settings():
    config, model = settings(published("microsoft__phi-4"))
    assert {k: config[k] for k in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                                   "ffn_hidden_size", "kv_channels", "add_qkv_bias", "add_bias_linear",
                                   "layernorm_epsilon", "gated_linear_unit")} == dict(
        num_layers=40, hidden_size=5120, num_attention_heads=40, num_query_groups=10, ffn_hidden_size=17920,
        kv_channels=128, add_qkv_bias=False, add_bias_linear=False, layernorm_epsilon=1e-5, gated_linear_unit=True)
    assert config.get("rotary_interleaved", False) is False
    assert model["rotary_base"] == 250000.0 and model["rotary_percent"] == 1.0
    assert model["vocab_size"] == 100352 and model["share_embeddings_and_output_weights"] is False
    assert "rope_scaling" not in model  # plain RoPE
    rules = {r.mcore: r for r in family_for(published("microsoft__phi-4")).rules()}
    assert rules["decoder.layers.{L}.self_attention.linear_qkv.weight"].transform == FusedQKV(40, 10, 128)
    assert rules["decoder.layers.{L}.self_attention.linear_qkv.weight"].hf == (
        "model.layers.{L}.self_attn.qkv_proj.weight",)
    assert rules["decoder.layers.{L}.mlp.linear_fc1.weight"].transform is FUSED_GATED_MLP
    assert rules["decoder.layers.{L}.mlp.linear_fc1.weight"].hf == ("model.layers.{L}.mlp.gate_up_proj.weight",)


def test_phi3_mini_4k_published_config_maps_its_sliding_window():
    """Phi-3-mini-4k's window (2047 latest tokens, itself included, on every layer) is megatron's
    window_size=(2046, 0); verified past the window in tests/test_sliding_window.py (phi3_window)."""
    raw = published("microsoft__Phi-3-mini-4k-instruct")
    config, model = settings(raw)
    assert config["window_size"] == (2046, 0) and not config.get("window_attn_skip_freq")
    assert (config["num_attention_heads"], config["num_query_groups"], config["kv_channels"]) == (32, 32, 96)
    assert (config["ffn_hidden_size"], model["vocab_size"], model["rotary_base"]) == (8192, 32064, 10000.0)
    assert not settings({**raw, "sliding_window": None})[0].get("window_size")


def test_glm4_0414_published_config_maps_to_these_settings():
    raw = published("zai-org__GLM-4-9B-0414")
    config, model = settings(raw)
    assert {k: config[k] for k in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                                   "ffn_hidden_size", "kv_channels", "add_qkv_bias", "add_bias_linear",
                                   "rotary_interleaved", "layernorm_epsilon")} == dict(
        num_layers=40, hidden_size=4096, num_attention_heads=32, num_query_groups=2, ffn_hidden_size=13696,
        kv_channels=128, add_qkv_bias=True, add_bias_linear=False, rotary_interleaved=True, layernorm_epsilon=1e-5)
    assert model["rotary_percent"] == 0.5 and model["rotary_base"] == 10000.0 and model["vocab_size"] == 151552
    fam = family_for(raw)
    names = {r.mcore for r in fam.rules()}
    assert {"decoder.layers.{L}.post_self_attn_layernorm.weight", "decoder.layers.{L}.post_mlp_layernorm.weight",
            "decoder.layers.{L}.self_attention.linear_qkv.bias"} <= names
    spec = fam.architecture.layer_spec(transformer_config(fam, ParallelLayout(), torch.float32, "cpu"), None, 0)
    assert spec.module is sandwich_layer_class()
    assert spec.submodules.post_mlp_layernorm is spec.submodules.input_layernorm  # the model's RMSNorm


def test_glm4_defaults_follow_transformers_not_llama():
    """A GLM-4 config without head_dim / attention_bias / partial_rotary_factor: HF's Glm4Config
    defaults (128, true, 0.5), not hidden/heads, false and 1.0."""
    raw = {k: v for k, v in published("zai-org__GLM-4-9B-0414").items()
           if k not in ("head_dim", "attention_bias", "partial_rotary_factor")}
    hf = transformers.AutoConfig.for_model(**raw)
    config, model = settings(raw)
    assert config["kv_channels"] == hf.head_dim == 128
    assert config["add_qkv_bias"] is hf.attention_bias is True
    assert model["rotary_percent"] == hf.rope_parameters["partial_rotary_factor"] == 0.5


# ---- refusals, each with the difference it prevents -------------------------------------------

LONGROPE = {"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(4)],
            "long_factor": [2.0 + 0.5 * i for i in range(4)]}


@pytest.mark.parametrize("spelling", ["longrope", "su"])
def test_longrope_refused_naming_the_field(spelling):
    raw = {**TINY, "model_type": "phi3", "original_max_position_embeddings": 64,
           "rope_scaling": {**LONGROPE, "type": spelling}}
    with pytest.raises(UnsupportedConfig, match=r"rope_scaling\.type='(longrope|su)'.*LongRoPE"):
        family_for(raw).architecture


def test_longrope_rotates_differently_from_plain_rope():
    """Why it is refused: transformers' Phi-3 rotary embedding with LongRoPE factors gives other
    cos/sin than plain RoPE (what megatron would compute), for short and long sequences alike."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    head = TINY["hidden_size"] // TINY["num_attention_heads"]  # 8: 4 frequencies
    plain = transformers.Phi3Config(**TINY, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    long = transformers.Phi3Config(**TINY, original_max_position_embeddings=64,
                                   rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                    "short_factor": LONGROPE["short_factor"],
                                                    "long_factor": LONGROPE["long_factor"]})
    x = torch.zeros(1, 1, head)
    for seq in (16, 128):  # within and beyond original_max_position_embeddings
        pos = torch.arange(seq)[None]
        cos_p, sin_p = Phi3RotaryEmbedding(plain)(x, pos)
        cos_l, sin_l = Phi3RotaryEmbedding(long)(x, pos)
        assert (cos_p - cos_l).abs().max() > 1e-2 and (sin_p - sin_l).abs().max() > 1e-2, seq


def _phi3_logits(window, seq):
    cfg = transformers.Phi3Config(**TINY, sliding_window=window)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "qkv_proj" in n:
                p.mul_(4.0)  # sharp attention, so the mask matters
        ids = torch.randint(3, TINY["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(0))
        return model(input_ids=ids).logits


def test_short_sliding_window_changes_hf_outputs_and_a_covering_one_does_not():
    """Why the window must be mapped, not ignored: HF masks keys older than the window (here 8
    tokens on a 32-token input: the logits change); a window >= every position the model can see
    masks nothing (identical logits)."""
    full = _phi3_logits(None, 32)
    assert (_phi3_logits(8, 32) - full).abs().max() > 1e-3
    assert torch.equal(_phi3_logits(TINY["max_position_embeddings"], 32), full)
    config = family_for({**TINY, "model_type": "phi3", "sliding_window": 8}).architecture.config
    assert config["window_size"] == (7, 0)


@pytest.mark.parametrize("model_type,change,field", [
    ("phi3", {"hidden_act": "gelu"}, "hidden_act"), ("glm4", {"hidden_act": "gelu"}, "hidden_act"),
    ("phi3", {"attention_bias": True}, "attention_bias"),
    ("glm4", {"rope_scaling": {"type": "yarn", "factor": 4.0}}, r"rope_scaling\.type='yarn'"),
    ("phi3", {"rope_scaling": {"type": "linear", "factor": 2.0}}, r"rope_scaling\.type='linear'"),
])
def test_other_refusals_name_the_field(model_type, change, field):
    with pytest.raises(UnsupportedConfig, match=field):
        family_for({**TINY, "model_type": model_type, **change}).architecture


# ---- rotary layout measured against transformers ----------------------------------------------

def _rotary_gap(raw: dict, interleaved: bool | None = None) -> float:
    """max |megatron - HF| of q after RoPE, megatron configured as the family maps ``raw`` (or with
    ``rotary_interleaved`` forced), HF through the model's own rotary embedding and apply function."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    fam = family_for(raw)
    cfg = transformer_config(fam, ParallelLayout(), torch.float32, "cpu")
    if interleaved is not None:
        cfg.rotary_interleaved = interleaved
    m = fam.architecture.model
    rope = RotaryEmbedding(cfg.kv_channels, m["rotary_percent"], rotary_interleaved=cfg.rotary_interleaved,
                           rotary_base=m["rotary_base"], use_cpu_initialization=True)
    seq = 24
    with compat.scope("cpu"):
        freqs = rope.get_emb(seq)
    t = torch.randn(seq, 1, 2, cfg.kv_channels, generator=torch.Generator().manual_seed(0))
    ours = apply_rotary_pos_emb(t, freqs, cfg, cp_group=object())  # (bshd path: no context parallel)
    mt = raw["model_type"]
    mod = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
    emb = getattr(mod, {"glm4": "Glm4", "phi3": "Phi3"}[mt] + "RotaryEmbedding")(transformers.AutoConfig.for_model(**raw))
    cos, sin = emb(t, torch.arange(seq)[None])
    q = t.permute(1, 2, 0, 3)  # [b, heads, s, d]
    theirs, _ = mod.apply_rotary_pos_emb(q, q, cos, sin)
    return (ours - theirs.permute(2, 0, 1, 3)).abs().max().item()


def test_glm4_rotates_half_the_dims_in_interleaved_pairs():
    """GLM-4: HF rotates the first head_dim * 0.5 dims as (even, odd) pairs = megatron's
    rotary_percent 0.5 with rotary_interleaved; megatron's default (halves) would differ."""
    raw = {**TINY, "model_type": "glm4", "head_dim": 16, "partial_rotary_factor": 0.5}
    assert _rotary_gap(raw) < 1e-6
    assert _rotary_gap(raw, interleaved=False) > 0.1


def test_phi3_partial_rotary_rotates_the_first_dims_as_halves():
    """Phi-4-mini's partial_rotary_factor 0.75 = megatron's rotary_percent 0.75, halves not
    interleaved; interleaving would differ. Read from the top level or rope_parameters."""
    for raw in ({**TINY, "model_type": "phi3", "partial_rotary_factor": 0.75},
                {**TINY, "model_type": "phi3",
                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}}):
        assert settings(raw)[1]["rotary_percent"] == 0.75
        assert _rotary_gap(raw) < 1e-6
        assert _rotary_gap(raw, interleaved=True) > 0.1


# ---- rules ------------------------------------------------------------------------------------

LAYOUTS = [ParallelLayout(), ParallelLayout(tp=2, pp=2), ParallelLayout(pp=2, vpp=2)]


@pytest.mark.parametrize("model_type,extra", [("phi3", {}), ("glm4", {"head_dim": 16})])
@pytest.mark.parametrize("tied", [False, True])
def test_rules_match_transformers_state_dict(model_type, extra, tied):
    cfg = transformers.AutoConfig.for_model(model_type, **TINY, **extra, tie_word_embeddings=tied)
    torch.manual_seed(0)
    state = transformers.AutoModelForCausalLM.from_config(cfg).state_dict()
    if tied:
        state.pop("lm_head.weight")
    fam = family_for(cfg.to_dict())
    for layout in LAYOUTS:
        units = inventory(fam, layout)
        assert expected_hf_names(units) == set(state), layout.short()
        check_names(units, set(state), "model")
        for u in units:  # the transforms accept the real shapes at tp=2
            if u.rule.transform.__class__.__name__ != "Vocab":
                u.rule.transform.local_shape([tuple(state[n].shape) for n in u.hf_names], 2)


@pytest.mark.parametrize("name", ["phi3", "glm4"])
def test_rules_match_saved_zoo_checkpoint(zoo_model, name):
    from safetensors import safe_open

    path = zoo_model(name)
    saved = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            saved |= set(h.keys())
    fam = family_for(json.loads((path / "config.json").read_text()))
    for layout in LAYOUTS:
        assert expected_hf_names(inventory(fam, layout)) == saved, layout.short()
    fused = [n for n in saved if "qkv_proj" in n or "gate_up_proj" in n]
    assert fused and ("qkv_proj" in "".join(fused)) is (name == "phi3")


def test_fused_qkv_gives_the_same_shards_as_separate_projections():
    """The two GQA spellings of one attention: q/k/v tensors (Llama) or one [q; k; v] (Phi-3)."""
    heads, groups, d, tp = 8, 2, 4, 2
    qkv = torch.randn((heads + 2 * groups) * d, 16)
    parts = torch.split(qkv, [heads * d, groups * d, groups * d])
    fused, split = FusedQKV(heads, groups, d), QKV(heads, groups, d)
    local = fused.local_shape([tuple(qkv.shape)], tp)
    for rank in range(tp):
        assert torch.equal(fused.split([qkv], local, tp, rank), split.split(list(parts), local, tp, rank))
