"""Families: HF config -> megatron settings (with real transformers configs and raw 4.x-style dicts),
the rules table against real transformers models, strict name accounting, TE name aliases and
local -> global parameter resolution. Single process."""

from __future__ import annotations

import json

import pytest
import torch

from mcore_bridge.families import FAMILIES, UnsupportedConfig, canonical_param_name, family_for
from mcore_bridge.layout import ParallelLayout
from mcore_bridge.plan import MappingError, check_names, expected_hf_names, inventory, local_items
from mcore_bridge.transforms import QKV, ShapeMismatch

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
TYPES = ["llama", "mistral", "qwen2", "qwen3"]


def hf_config(model_type, **kw):
    """A real transformers config (as ``config.json`` would hold it) for a tiny model."""
    if model_type == "mistral":
        kw.setdefault("sliding_window", None)
    return transformers.AutoConfig.for_model(model_type, **{**TINY, **kw})


def raw(model_type, **kw):
    return hf_config(model_type, **kw).to_dict()


# ---- config translation -------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", TYPES)
def test_settings_carried_over(model_type):
    cfg = hf_config(model_type, rms_norm_eps=1e-5, tie_word_embeddings=False)
    arch = family_for(cfg.to_dict()).architecture
    c, m = arch.config, arch.model
    assert c["num_layers"] == cfg.num_hidden_layers
    assert c["hidden_size"] == cfg.hidden_size
    assert c["num_attention_heads"] == cfg.num_attention_heads
    assert c["num_query_groups"] == cfg.num_key_value_heads
    assert c["ffn_hidden_size"] == cfg.intermediate_size
    # qwen3 defaults to head_dim=128, unrelated to hidden/heads; qwen2 configs have no head_dim
    assert c["kv_channels"] == (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    assert c["layernorm_epsilon"] == cfg.rms_norm_eps
    assert c["normalization"] == "RMSNorm" and c["gated_linear_unit"]
    assert c["activation_func"] is torch.nn.functional.silu
    assert c["add_bias_linear"] is False
    assert c["add_qkv_bias"] is (model_type == "qwen2")
    assert c["qk_layernorm"] is (model_type == "qwen3")
    assert m["vocab_size"] == cfg.vocab_size
    assert m["max_sequence_length"] == cfg.max_position_embeddings
    assert m["share_embeddings_and_output_weights"] is False
    assert m["position_embedding_type"] == "rope"
    assert m["rotary_base"] == float(cfg.to_dict()["rope_parameters"]["rope_theta"])
    assert "rope_scaling" not in m or not m["rope_scaling"]


@pytest.mark.parametrize("model_type", TYPES)
def test_settings_build_a_megatron_config(model_type):
    """The translated settings are valid TransformerConfig arguments (as the bridge passes them)."""
    pytest.importorskip("megatron.core")
    from mcore_bridge.model import transformer_config

    fam = family_for(raw(model_type, head_dim=16) if model_type == "qwen3" else raw(model_type))
    layout = ParallelLayout(tp=2, pp=2)
    config = transformer_config(fam, layout, torch.float32, "cpu")
    s = fam.model_settings()["config"]
    assert config.kv_channels == s["kv_channels"]
    assert config.num_query_groups == s["num_query_groups"]
    assert config.add_qkv_bias == s["add_qkv_bias"] and config.qk_layernorm == s["qk_layernorm"]
    assert config.tensor_model_parallel_size == 2 and config.pipeline_model_parallel_size == 2


@pytest.mark.parametrize("model_type", TYPES)
def test_tied_embeddings(model_type):
    assert family_for(raw(model_type, tie_word_embeddings=True)).model_settings()["model"][
        "share_embeddings_and_output_weights"] is True


def test_qwen3_head_dim_independent_of_hidden():
    cfg = hf_config("qwen3", head_dim=40)
    assert cfg.hidden_size // cfg.num_attention_heads != 40
    fam = family_for(cfg.to_dict())
    assert fam.model_settings()["config"]["kv_channels"] == 40
    qkv = next(r for r in fam.rules() if r.mcore.endswith("linear_qkv.weight")).transform
    assert qkv == QKV(cfg.num_attention_heads, cfg.num_key_value_heads, 40)


def test_legacy_config_without_head_dim_or_kv_heads():
    d = {k: v for k, v in raw("llama").items() if k not in ("head_dim", "num_key_value_heads")}
    c = family_for(d).model_settings()["config"]
    assert c["kv_channels"] == TINY["hidden_size"] // TINY["num_attention_heads"]
    assert c["num_query_groups"] == TINY["num_attention_heads"]  # MHA


def test_qwen2_has_qkv_bias_rules():
    fam = family_for(raw("qwen2"))
    bias = [r for r in fam.rules() if r.mcore.endswith("linear_qkv.bias")]
    assert len(bias) == 1 and bias[0].hf_names(3) == tuple(
        f"model.layers.3.self_attn.{p}_proj.bias" for p in "qkv")
    assert not [r for r in family_for(raw("llama")).rules() if r.mcore.endswith("bias")]


def test_qwen3_has_qk_norm_rules():
    names = {r.mcore for r in family_for(raw("qwen3")).rules()}
    assert {"decoder.layers.{L}.self_attention.q_layernorm.weight",
            "decoder.layers.{L}.self_attention.k_layernorm.weight"} <= names


# ---- rope ---------------------------------------------------------------------------------------

def _legacy(model_type="llama", rope_theta=None, rope_scaling=None, **kw):
    """A transformers-4.x style config.json: ``rope_theta`` and ``rope_scaling`` at the top level."""
    d = {k: v for k, v in raw(model_type, **kw).items() if k not in ("rope_parameters", "rope_scaling")}
    if rope_theta is not None:
        d["rope_theta"] = rope_theta
    d["rope_scaling"] = rope_scaling
    return d


LLAMA3 = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192, "rope_type": "llama3"}


@pytest.mark.parametrize("model_type", TYPES)
def test_rope_theta_from_rope_parameters(model_type):
    d = raw(model_type, rope_parameters={"rope_type": "default", "rope_theta": 123456.0})
    assert d["rope_parameters"]["rope_theta"] == 123456.0
    assert family_for(d).model_settings()["model"]["rotary_base"] == 123456.0


@pytest.mark.parametrize("model_type", TYPES)
def test_rope_theta_legacy(model_type):
    m = family_for(_legacy(model_type, rope_theta=654321.0)).model_settings()["model"]
    assert m["rotary_base"] == 654321.0 and not m.get("rope_scaling")


def test_rope_theta_default_when_absent():
    assert family_for(_legacy("llama")).model_settings()["model"]["rotary_base"] == 10000.0


def test_llama3_scaling_transformers5():
    cfg = hf_config("llama", max_position_embeddings=16384,
                    rope_parameters={**LLAMA3, "rope_theta": 500000.0})
    m = family_for(cfg.to_dict()).model_settings()["model"]
    assert m["rope_scaling"] is True and m["rope_scaling_factor"] == 32.0 and m["rotary_base"] == 500000.0


@pytest.mark.parametrize("spelling", ["rope_type", "type"])
def test_llama3_scaling_legacy(spelling):
    scaling = {k: v for k, v in LLAMA3.items() if k != "rope_type"}
    scaling[spelling] = "llama3"
    m = family_for(_legacy(rope_theta=500000.0, rope_scaling=scaling)).model_settings()["model"]
    assert m["rope_scaling"] is True and m["rope_scaling_factor"] == 32.0 and m["rotary_base"] == 500000.0


@pytest.mark.parametrize("field,value", [("low_freq_factor", 2.0), ("high_freq_factor", 8.0),
                                         ("original_max_position_embeddings", 4096)])
@pytest.mark.parametrize("style", ["transformers5", "legacy"])
def test_llama3_scaling_megatron_cannot_express(field, value, style):
    params = {**LLAMA3, field: value}
    d = (raw("llama", rope_parameters={**params, "rope_theta": 500000.0}) if style == "transformers5"
         else _legacy(rope_theta=500000.0, rope_scaling=params))
    with pytest.raises(UnsupportedConfig, match=field):
        family_for(d).model_settings()


@pytest.mark.parametrize("rope_type", ["yarn", "linear", "dynamic"])
@pytest.mark.parametrize("style", ["transformers5", "legacy"])
def test_unsupported_rope_types(rope_type, style):
    params = {"rope_type": rope_type, "factor": 2.0}
    if rope_type == "yarn":
        params["original_max_position_embeddings"] = 128
    d = (raw("llama", rope_parameters={**params, "rope_theta": 10000.0}) if style == "transformers5"
         else _legacy(rope_theta=10000.0, rope_scaling={"type": rope_type, "factor": 2.0}))
    with pytest.raises(UnsupportedConfig, match=rope_type):
        family_for(d).model_settings()


# ---- unsupported settings -----------------------------------------------------------------------

def test_mistral_sliding_window_is_expressed():
    # (the window's tests: tests/test_sliding_window.py)
    d = transformers.AutoConfig.for_model("mistral", **TINY, sliding_window=4096).to_dict()
    assert family_for(d).architecture.config["window_size"] == (4095, 0)


def test_qwen2_sliding_window_switched_off_is_fine():
    d = {**raw("qwen2"), "sliding_window": 32768, "use_sliding_window": False}
    assert "window_size" not in family_for(d).architecture.config


@pytest.mark.parametrize("model_type", TYPES)
def test_gelu_rejected(model_type):
    with pytest.raises(UnsupportedConfig, match="gelu"):
        family_for(raw(model_type, hidden_act="gelu")).model_settings()


def test_attention_bias_rejected():
    with pytest.raises(UnsupportedConfig, match="attention_bias"):
        family_for(raw("llama", attention_bias=True)).model_settings()


def test_unknown_model_type():
    with pytest.raises(UnsupportedConfig) as e:
        family_for({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    msg = str(e.value)
    assert "'gpt2'" in msg
    for t in FAMILIES:
        assert t in msg
    assert set(TYPES) <= set(FAMILIES)


def test_missing_required_field():
    d = raw("llama")
    del d["intermediate_size"]
    with pytest.raises(UnsupportedConfig, match="intermediate_size"):
        family_for(d).model_settings()


# ---- the rules table against real transformers models -------------------------------------------

LAYOUTS = [ParallelLayout(), ParallelLayout(tp=2, pp=2), ParallelLayout(pp=2, vpp=2),
           ParallelLayout(pp=3, first_stage_layers=2, last_stage_layers=1)]


def _tiny_model(cfg):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("model_type", TYPES)
def test_rules_match_transformers_state_dict_untied(model_type):
    kw = {"head_dim": 16} if model_type == "qwen3" else {}
    cfg = hf_config(model_type, tie_word_embeddings=False, **kw)
    state = _tiny_model(cfg).state_dict()
    fam = family_for(cfg.to_dict())
    for layout in LAYOUTS:
        units = inventory(fam, layout)
        assert expected_hf_names(units) == set(state), layout.short()
        check_names(units, set(state), "model")  # strict accounting agrees
        # each HF tensor has its place: the transforms accept the real shapes at tp=2
        for u in units:
            if u.rule.transform.__class__.__name__ != "Vocab":
                u.rule.transform.local_shape([tuple(state[n].shape) for n in u.hf_names], 2)


@pytest.mark.parametrize("model_type", TYPES)
def test_rules_match_transformers_state_dict_tied(model_type):
    """In memory a tied model also lists ``lm_head.weight`` (the same tensor as the embedding);
    checkpoints never store it, and neither does the rules table."""
    cfg = hf_config(model_type, tie_word_embeddings=True)
    model = _tiny_model(cfg)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    fam = family_for(cfg.to_dict())
    for layout in LAYOUTS:
        assert expected_hf_names(inventory(fam, layout)) == set(state) - {"lm_head.weight"}, layout.short()


@pytest.fixture(scope="module")
def zoo_models(tmp_path_factory):
    """Built-in zoo models, cached in a temp dir (or the suite's shared cache from conftest)."""
    from mcore_bridge import zoo

    mp = pytest.MonkeyPatch()
    mp.setenv("MCORE_BRIDGE_CACHE", str(tmp_path_factory.mktemp("zoo_cache")))
    yield {name: zoo.materialize(name) for name in zoo.names()}
    mp.undo()


def _saved_names(path):
    from safetensors import safe_open

    names = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            names |= set(h.keys())
    return names


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3"])
def test_rules_match_saved_zoo_checkpoint(zoo_models, name):
    path = zoo_models[name]
    config = json.loads((path / "config.json").read_text())
    saved = _saved_names(path)
    assert saved, path
    fam = family_for(config)
    if fam.tied:
        assert "lm_head.weight" not in saved
    for layout in LAYOUTS:
        assert expected_hf_names(inventory(fam, layout)) == saved, (name, layout.short())


# ---- strict accounting --------------------------------------------------------------------------

def _llama_units(layout=ParallelLayout()):
    fam = family_for(raw("llama", tie_word_embeddings=False))
    return fam, inventory(fam, layout)


def test_check_names_missing_tensor():
    _, units = _llama_units()
    names = expected_hf_names(units) - {"model.layers.2.mlp.up_proj.weight"}
    with pytest.raises(MappingError, match=r"ckpt-dir: missing 1 tensor\(s\): model.layers.2.mlp.up_proj.weight"):
        check_names(units, names, "ckpt-dir")


def test_check_names_unexpected_tensor():
    _, units = _llama_units()
    names = expected_hf_names(units) | {"model.layers.9.self_attn.q_proj.weight"}
    with pytest.raises(MappingError, match=r"1 unexpected tensor\(s\).*model.layers.9.self_attn.q_proj.weight"):
        check_names(units, names, "ckpt-dir")


def test_check_names_both_and_ignored_buffers():
    _, units = _llama_units()
    names = expected_hf_names(units)
    check_names(units, names | {"model.layers.0.self_attn.rotary_emb.inv_freq"}, "x")  # old buffer: ok
    with pytest.raises(MappingError) as e:
        check_names(units, (names - {"model.norm.weight"}) | {"extra.weight"}, "x")
    assert "model.norm.weight" in str(e.value) and "extra.weight" in str(e.value)


def test_inventory_owners():
    """Embedding on the first stage, output + final norm on the last chunk of the last stage,
    each layer on the stage/chunk the layout says."""
    layout = ParallelLayout(pp=2, vpp=2)
    fam, units = _llama_units(layout)
    for u in units:
        if u.layer is not None:
            assert (u.stage, u.chunk) == layout.layer_owner(fam.num_layers, u.layer)
        elif u.rule.mcore.startswith("embedding."):
            assert (u.stage, u.chunk) == (0, 0)
        else:
            assert (u.stage, u.chunk) == (1, 1)
    keys = [u.key for u in units]
    assert len(keys) == len(set(keys))


def test_tied_output_layer_only_under_pp():
    fam = family_for(raw("qwen2", tie_word_embeddings=True))
    out = lambda layout: [u for u in inventory(fam, layout) if u.rule.mcore == "output_layer.weight"]
    assert out(ParallelLayout()) == []
    [u] = out(ParallelLayout(pp=2))
    assert u.hf_names == ("model.embed_tokens.weight",) and u.rule.export is False and u.stage == 1


# ---- TE names and local -> global resolution ----------------------------------------------------

@pytest.mark.parametrize("te,local", [
    ("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.3.input_layernorm.weight"),
    ("decoder.layers.3.self_attention.linear_qkv.layer_norm_bias", "decoder.layers.3.input_layernorm.bias"),
    ("module.module.decoder.layers.0.mlp.linear_fc1.layer_norm_weight", "decoder.layers.0.pre_mlp_layernorm.weight"),
    ("decoder.layers.11.mlp.linear_fc1.layer_norm_bias", "decoder.layers.11.pre_mlp_layernorm.bias"),
    ("module.decoder.layers.1.self_attention.linear_qkv.weight", "decoder.layers.1.self_attention.linear_qkv.weight"),
    ("decoder.final_layernorm.weight", "decoder.final_layernorm.weight"),
])
def test_canonical_param_name(te, local):
    assert canonical_param_name(te) == local


def _te_names(local_layers, first, last, qkv_bias=False, prefix=""):
    names = ["embedding.word_embeddings.weight"] if first else []
    for i in local_layers:
        p = f"{prefix}decoder.layers.{i}."
        names += [p + "self_attention.linear_qkv.layer_norm_weight", p + "self_attention.linear_qkv.weight",
                  p + "self_attention.linear_proj.weight", p + "mlp.linear_fc1.layer_norm_weight",
                  p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
        if qkv_bias:
            names.append(p + "self_attention.linear_qkv.bias")
    if last:
        names += [prefix + "decoder.final_layernorm.weight", prefix + "output_layer.weight"]
    return names


def test_local_items_te_names_one_stage():
    """pp rank 1 of 2 holds global layers 2, 3 of 4 under local indices 0, 1 (TE spelling)."""
    fam = family_for(raw("qwen2", tie_word_embeddings=False))
    layout = ParallelLayout(pp=2)
    names = _te_names([0, 1], first=False, last=True, qkv_bias=True, prefix="module.")
    items = local_items(fam, layout, 1, [names])
    assert [i.param for i in items] == names
    by_param = {i.param: i for i in items}
    assert by_param["module.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"].unit.hf_names == (
        "model.layers.2.input_layernorm.weight",)
    assert by_param["module.decoder.layers.1.mlp.linear_fc1.layer_norm_weight"].unit.hf_names == (
        "model.layers.3.post_attention_layernorm.weight",)
    assert by_param["module.decoder.layers.1.mlp.linear_fc1.weight"].unit.hf_names == (
        "model.layers.3.mlp.gate_proj.weight", "model.layers.3.mlp.up_proj.weight")
    assert by_param["module.decoder.layers.0.self_attention.linear_qkv.bias"].unit.hf_names == tuple(
        f"model.layers.2.self_attn.{p}_proj.bias" for p in "qkv")
    assert by_param["module.output_layer.weight"].unit.hf_names == ("lm_head.weight",)
    assert {i.unit.layer for i in items} == {2, 3, None}
    assert all(i.unit.stage == 1 and i.chunk == 0 for i in items)


@pytest.mark.parametrize("layout", [ParallelLayout(pp=2, vpp=2), ParallelLayout(pp=2),
                                    ParallelLayout(pp=3, first_stage_layers=1, last_stage_layers=1),
                                    ParallelLayout(tp=2)])
def test_local_items_cover_inventory(layout):
    """Every rank's local parameters, resolved, cover the inventory exactly once (the same units,
    including the stage/chunk owner), whatever the pipeline split."""
    fam = family_for(raw("llama", tie_word_embeddings=False))
    n = fam.num_layers
    resolved = []
    for stage in range(layout.pp):
        chunks = [_te_names(range(len(layout.chunk_layers(n, stage, vp))), layout.is_first(stage, vp),
                            layout.is_last(stage, vp)) for vp in range(layout.vpp)]
        resolved += [i.unit for i in local_items(fam, layout, stage, chunks)]
    assert sorted(map(_unit_key, resolved)) == sorted(map(_unit_key, inventory(fam, layout)))
    assert len(set(map(_unit_key, resolved))) == len(resolved)


def _unit_key(u):
    return (u.rule.mcore, -1 if u.layer is None else u.layer, u.stage, u.chunk, u.hf_names)


def test_local_items_unmapped_parameter():
    fam = family_for(raw("llama"))
    names = _te_names([0], first=True, last=False) + ["decoder.layers.0.self_attention.linear_qkv.lora_A.weight"]
    with pytest.raises(MappingError, match=r"'llama' has no rule .*lora_A"):
        local_items(fam, ParallelLayout(pp=2), 0, [names])


def test_qkv_rule_shapes_mismatch_detected():
    """A checkpoint whose k_proj does not match num_key_value_heads is refused by the transform."""
    cfg = hf_config("llama", tie_word_embeddings=False)
    qkv = next(r for r in family_for(cfg.to_dict()).rules() if r.mcore.endswith("linear_qkv.weight")).transform
    d = cfg.hidden_size // cfg.num_attention_heads
    good = [(cfg.num_attention_heads * d, 64), (cfg.num_key_value_heads * d, 64), (cfg.num_key_value_heads * d, 64)]
    qkv.local_shape(good, 2)
    with pytest.raises(ShapeMismatch):
        qkv.local_shape([good[0], (cfg.num_attention_heads * d, 64), good[2]], 2)


def test_local_items_layer_index_beyond_stage():
    """A model chunk with more layers than the layout gives its stage (a model built for another
    layout) is a MappingError naming the parameter, not an IndexError from deep inside."""
    fam = family_for(raw("llama"))  # 4 layers; pp=2: 2 per stage
    names = _te_names([0, 1, 2], first=True, last=False)
    with pytest.raises(MappingError, match=r"decoder\.layers\.2\.self_attention\.linear_qkv\.layer_norm_weight"):
        local_items(fam, ParallelLayout(pp=2), 0, [names])
