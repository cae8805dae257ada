"""Qwen3.5's multi-token-prediction layer (``families/qwen3_5.py`` on Qwen3-Next's MTPMixin hooks,
``qwen3_next.QwenNextMTP``).

The published Qwen3.5 checkpoints declare ``text_config.mtp_num_hidden_layers: 1`` and store the
layer at the top level, ``mtp.*`` (``mtp.fc``, ``mtp.pre_fc_norm_embedding`` / ``_hidden``,
``mtp.layers.0.*``: a gated full-attention layer under the language layers' names, ``mtp.norm``),
which transformers ignores (``_keys_to_ignore_on_load_unexpected = [r"^mtp.*"]``) and vLLM's
``Qwen3_5MTP`` loads. The zoo variant ``qwen3_5_mtp`` stores it so. Converted into megatron-core's
``MultiTokenPredictionBlock`` with ``(1 + w)`` norms and byte-exact back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcore_bridge import ParallelLayout as L
from mcore_bridge.families import UnsupportedConfig, family_for
from mcore_bridge.plan import MappingError, check_names, expected_hf_names, inventory
from tests import cases, verify_cases
from tests.matrix import case_id

MODEL = "qwen3_5_mtp"
MTP_OWN = ("mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight")


def _config(zoo_model) -> dict:
    return json.loads((zoo_model(MODEL) / "config.json").read_text())


def _saved(zoo_model) -> set[str]:
    from mcore_bridge.hf_io import HFCheckpoint

    return set(HFCheckpoint(zoo_model(MODEL)).names())


def _adapted(config, names):
    fam = family_for(config)
    fam.adapt(names)
    return fam


def _rows(fam) -> dict:
    return {r.mcore.replace(".mtp_model_layer.", ".transformer_layer."): r for r in fam.rules()}  # 0.19 / 0.16


def test_rules_name_the_published_mtp_tensors(zoo_model):
    saved = _saved(zoo_model)
    fam = _adapted(_config(zoo_model), saved)
    assert fam.mtp_layers == 1 and fam.architecture.config["mtp_num_layers"] == 1
    rows = _rows(fam)
    assert rows["mtp.layers.0.eh_proj.weight"].hf == ("mtp.fc.weight",)
    assert rows["mtp.layers.0.enorm.weight"].hf == ("mtp.pre_fc_norm_embedding.weight",)
    assert rows["mtp.layers.0.hnorm.weight"].hf == ("mtp.pre_fc_norm_hidden.weight",)
    assert rows["mtp.layers.0.final_layernorm.weight"].hf == ("mtp.norm.weight",)
    assert rows["mtp.layers.0.transformer_layer.self_attention.linear_proj.weight"].hf == (
        "mtp.layers.0.self_attn.o_proj.weight",)
    assert rows["mtp.layers.0.transformer_layer.mlp.linear_fc2.weight"].hf == ("mtp.layers.0.mlp.down_proj.weight",)
    assert rows["embedding.word_embeddings.weight"].hf == ("model.language_model.embed_tokens.weight",)  # no copies
    assert rows["output_layer.weight"].hf == ("lm_head.weight",)
    raw = _config(zoo_model)
    raw["text_config"] = {**raw["text_config"], "mtp_num_hidden_layers": 2}
    with pytest.raises(UnsupportedConfig, match=r"qwen3_5: 2 multi-token-prediction layers"):
        family_for(raw).architecture


def test_rules_cover_the_saved_checkpoint(zoo_model):
    saved = _saved(zoo_model)
    assert set(MTP_OWN) <= saved and "mtp.layers.0.self_attn.q_proj.weight" in saved
    assert not any(n.startswith("model.language_model.layers.4.") for n in saved)
    fam = _adapted(_config(zoo_model), saved)
    for layout in (L(), L(tp=2, sp=True), L(pp=2), L(pp=2, vpp=2)):
        units = inventory(fam, layout)
        assert expected_hf_names(units) == saved, layout.short()
        mtp = [u for u in units if u.rule.mcore.startswith("mtp.")]
        assert {u.owner[0] for u in mtp} == {layout.pp - 1} and {u.chunk for u in mtp} == {layout.vpp - 1}
        assert {h for u in mtp for h in u.hf_names} >= set(MTP_OWN)


def test_nothing_is_dropped(zoo_model):
    """Strict accounting: an MTP tensor missing, or a second MTP layer, refused by name; a checkpoint
    without any mtp.* tensor converts as the main model alone."""
    saved = _saved(zoo_model)
    units = inventory(_adapted(_config(zoo_model), saved), L())
    with pytest.raises(MappingError, match=r"missing 1 tensor\(s\): mtp\.pre_fc_norm_hidden\.weight"):
        check_names(units, saved - {"mtp.pre_fc_norm_hidden.weight"}, "ckpt")
    with pytest.raises(MappingError, match=r"unexpected tensor\(s\).*mtp\.layers\.1\.input_layernorm\.weight"):
        check_names(units, saved | {"mtp.layers.1.input_layernorm.weight"}, "ckpt")
    main = {n for n in saved if not n.startswith("mtp.")}
    stripped = _adapted(_config(zoo_model), main)
    assert stripped.mtp_layers == 0 and "mtp_num_layers" not in stripped.architecture.config
    assert expected_hf_names(inventory(stripped, L())) == main
    partial = _adapted(_config(zoo_model), main | {"mtp.fc.weight"})  # some MTP tensors: the rest is missing
    with pytest.raises(MappingError, match=r"missing \d+ tensor\(s\): mtp\."):
        check_names(inventory(partial, L()), main | {"mtp.fc.weight"}, "ckpt")


def test_mtp_needs_a_full_attention_last_layer(zoo_model):
    """megatron builds the MTP layer from the last decoder layer's spec; Qwen3.5's MTP layer is gated
    full attention, so a linear-attention last layer is refused, naming the way out."""
    raw = _config(zoo_model)
    raw["text_config"] = {**raw["text_config"], "layer_types": ["full_attention", "linear_attention"] * 2}
    with pytest.raises(UnsupportedConfig, match=r"\(3\), a linear-attention layer.*without the mtp\.\* tensors"):
        _adapted(raw, _saved(zoo_model)).architecture


@pytest.mark.parametrize("world,layout", [
    pytest.param(w, lay, id=case_id(MODEL, w, lay), marks=pytest.mark.world(w))
    for w, lay in [(2, L(pp=2)), (2, L(tp=2, sp=True))]])
def test_roundtrip_is_byte_exact(world, layout, pools, zoo_model, tmp_path):
    src, out = zoo_model(MODEL), tmp_path / "converted"
    results = pools.get(world).run(cases.roundtrip, timeout=300, source=str(src), layout=layout.to_dict(),
                                   out_dir=str(out))
    expected = cases.check_roundtrip(results, src, out)
    assert set(MTP_OWN) <= set(expected) and "mtp.layers.0.mlp.down_proj.weight" in expected


PUBLISHED = {  # tests/published: the megatron settings each maps to (the rest is Qwen3.5's, tests/test_qwen3_5.py)
    "Qwen__Qwen3.5-0.8B.json": dict(num_layers=24, hidden_size=1024, num_attention_heads=8, num_query_groups=2,
                                    ffn_hidden_size=3584, kv_channels=256, linear_num_value_heads=16),
    "Qwen__Qwen3.6-35B-A3B.json": dict(num_layers=40, hidden_size=2048, num_attention_heads=16, num_query_groups=2,
                                       kv_channels=256, linear_num_value_heads=32, num_moe_experts=256,
                                       moe_router_topk=8, moe_ffn_hidden_size=512,
                                       moe_shared_expert_intermediate_size=512, moe_shared_expert_gate=True),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_map_with_their_mtp_layer(name):
    raw = json.loads((Path(__file__).parent / "published" / name).read_text())
    assert raw["text_config"]["mtp_num_hidden_layers"] == 1
    fam = family_for(raw)
    c = fam.architecture.config
    assert {k: c[k] for k in PUBLISHED[name]} == PUBLISHED[name]
    assert c["mtp_num_layers"] == 1 and c["attention_output_gate"] is True and c["mrope_section"] == [11, 11, 10]
    assert c["experimental_attention_variant"] == "gated_delta_net"
    assert c["linear_attention_freq"] == [0 if (i + 1) % 4 == 0 else 1 for i in range(c["num_layers"])]
    assert c["linear_key_head_dim"] == c["linear_value_head_dim"] == 128 and c["linear_num_key_heads"] == 16
    rows = _rows(fam)
    assert rows["mtp.layers.0.eh_proj.weight"].hf == ("mtp.fc.weight",)
    assert rows["mtp.layers.0.transformer_layer.self_attention.linear_qkv.weight"].hf[0] == (
        "mtp.layers.0.self_attn.q_proj.weight")
    head = rows["output_layer.weight"]  # 0.8B ties its head: read from the embedding, not written back
    tied = raw["tie_word_embeddings"]
    assert head.hf == (("model.language_model.embed_tokens.weight",) if tied else ("lm_head.weight",))
    assert head.export is not tied


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("qwen3-5-mtp-reference-cache"))


def _verify(pools, zoo_model, ref_cache, **kw) -> dict:
    out = pools.get(2).run(verify_cases.verify, timeout=600, source=str(zoo_model(MODEL)),
                           layout=L(pp=2).to_dict(), reference_cache=ref_cache, **kw)
    reports = [r for r in out if r is not None]
    assert len(reports) == 1
    return reports[0]


@pytest.mark.world(2)
def test_mtp_head_verifies_fp32_with_images(pools, zoo_model, ref_cache):
    """The main model with images and the MTP head, against transformers' model and our reference
    of the MTP formula (verify/mtp.py, transformers' own decoder layer, mRoPE positions)."""
    r = _verify(pools, zoo_model, ref_cache)
    assert r["verdict"] == "pass", r["failures"]
    assert r["metrics"]["max_diff"] < 1e-4
    (depth,) = r["mtp"]["depths"]
    assert r["mtp"]["reference"].startswith("ours")
    assert depth["ok"] and depth["max_diff"] < 1e-4 and depth["top1_agreement"] == 1.0
    assert depth["rel_mean_diff"] < 1e-5


@pytest.mark.world(2)
def test_perturbed_mtp_projection_is_caught_and_located(pools, zoo_model, ref_cache):
    """Negative control: the MTP layer's fc x 1.01 leaves the main model exact and fails the MTP
    head, located at mtp.0 with the HF tensor named."""
    r = _verify(pools, zoo_model, ref_cache, control="scale:mtp.layers.0.eh_proj.weight:1.01")
    assert r["verdict"] == "fail"
    assert r["metrics"]["max_diff"] < 1e-4 and all(x["ok"] for x in r["layers"])  # the main model is untouched
    first = r["first_diverging"]
    assert first["probe"] == "mtp.0" and "mtp.fc.weight" in first["hf_params"]
    assert not r["mtp"]["depths"][0]["ok"] and any(f.startswith("mtp.0 ") for f in r["failures"])


def test_stacked_experts_of_the_moe_mtp_layer_are_read(zoo_model, tmp_path):
    """Qwen3.5-MoE checkpoints may store experts stacked (``experts.gate_up_proj [E, 2F, H]``), the
    MTP layer's too (``mtp.layers.0.mlp.experts.gate_up_proj``, as vLLM's Qwen3_5MoeMTP loads them):
    read as the per-expert tensors of the zoo's per-expert copy, the MTP layer's included."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from mcore_bridge.bridge import Bridge
    from mcore_bridge.hf_io import HFCheckpoint

    src = zoo_model("qwen3_5_moe_mtp")
    dest = tmp_path / "stacked"
    shutil.copytree(src, dest)
    prefixes = [f"model.language_model.layers.{layer}.mlp.experts." for layer in range(4)] + ["mtp.layers.0.mlp.experts."]
    for f in dest.glob("*.safetensors"):
        state = load_file(str(f))
        for p in prefixes:
            gate_up = [torch.cat([state.pop(f"{p}{e}.gate_proj.weight"), state.pop(f"{p}{e}.up_proj.weight")])
                       for e in range(8)]
            state[p + "gate_up_proj"] = torch.stack(gate_up)
            state[p + "down_proj"] = torch.stack([state.pop(f"{p}{e}.down_proj.weight") for e in range(8)])
        save_file(state, str(f), metadata={"format": "pt"})
    stacked = Bridge(dest)
    assert stacked.expert_storage == "out_in"
    a, b = HFCheckpoint(src), stacked.reader.hf
    assert sorted(b.names()) == sorted(a.names()) and "mtp.layers.0.mlp.experts.7.up_proj.weight" in set(b.names())
    for name in ("mtp.layers.0.mlp.experts.5.up_proj.weight", "mtp.layers.0.mlp.experts.0.gate_proj.weight",
                 "mtp.layers.0.mlp.experts.3.down_proj.weight", "model.language_model.layers.1.mlp.experts.2.up_proj.weight"):
        assert torch.equal(a.read(name), b.read(name)), name
    assert not torch.equal(a.read("mtp.layers.0.mlp.experts.5.gate_proj.weight"),
                           b.read("mtp.layers.0.mlp.experts.5.up_proj.weight"))  # control
    units = inventory(stacked.family, L(pp=2, ep=2))
    assert expected_hf_names(units) == set(a.names())
