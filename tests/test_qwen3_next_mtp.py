"""Qwen3-Next's multi-token-prediction layer (``families/qwen3_next.py`` on ``families/mtp.py``'s hooks).

The published checkpoint stores it under ``mtp.*`` (``mtp.fc``, ``mtp.pre_fc_norm_embedding`` /
``_hidden``, ``mtp.layers.0.*``: a gated full-attention MoE layer, ``mtp.norm``); its config declares
nothing (one layer assumed). The zoo variant ``qwen3_next_mtp`` stores it so. Converted into
megatron-core's ``MultiTokenPredictionBlock`` with ``(1 + w)`` norms, byte-exact back, and verified
against our reference of the formula (verify/mtp.py) with transformers' own decoder layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcore_bridge import ParallelLayout as L
from mcore_bridge.families import UnsupportedConfig, family_for
from mcore_bridge.plan import MappingError, check_names, expected_hf_names, inventory
from tests import cases, verify_cases
from tests.matrix import case_id

MODEL = "qwen3_next_mtp"
PUBLISHED = Path(__file__).parent / "published" / "Qwen__Qwen3-Next-80B-A3B-Instruct.json"
MTP_OWN = ("mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight")


def _config(zoo_model, **change) -> dict:
    return {**json.loads((zoo_model(MODEL) / "config.json").read_text()), **change}


def _saved(zoo_model) -> set[str]:
    from mcore_bridge.hf_io import HFCheckpoint

    return set(HFCheckpoint(zoo_model(MODEL)).names())


def _adapted(config, names):
    fam = family_for(config)
    fam.adapt(names)
    return fam


def test_published_config_counts_one_mtp_layer():
    raw = json.loads(PUBLISHED.read_text())
    assert not any("nextn" in k or "mtp" in k for k in raw)  # the config declares nothing
    fam = family_for(raw)
    assert fam.mtp_layers == 1 and fam.architecture.config["mtp_num_layers"] == 1
    rows = {r.mcore.replace(".mtp_model_layer.", ".transformer_layer."): r for r in fam.rules()}  # 0.19 / 0.16
    assert rows["mtp.layers.0.eh_proj.weight"].hf == ("mtp.fc.weight",)
    assert rows["mtp.layers.0.enorm.weight"].hf == ("mtp.pre_fc_norm_embedding.weight",)
    assert rows["mtp.layers.0.hnorm.weight"].hf == ("mtp.pre_fc_norm_hidden.weight",)
    assert rows["mtp.layers.0.final_layernorm.weight"].hf == ("mtp.norm.weight",)
    assert rows["mtp.layers.0.transformer_layer.mlp.router.weight"].hf == ("mtp.layers.0.mlp.gate.weight",)
    assert rows["embedding.word_embeddings.weight"].hf == ("model.embed_tokens.weight",)  # no copies stored
    assert rows["output_layer.weight"].hf == ("lm_head.weight",)
    with pytest.raises(UnsupportedConfig, match=r"2 multi-token-prediction layers"):
        family_for({**raw, "num_nextn_predict_layers": 2}).architecture


def test_rules_cover_the_saved_checkpoint(zoo_model):
    saved = _saved(zoo_model)
    assert set(MTP_OWN) <= saved and "mtp.layers.0.self_attn.q_proj.weight" in saved
    assert not any(n.startswith("model.layers.4.") for n in saved)
    fam = _adapted(_config(zoo_model), saved)
    for layout in (L(), L(tp=2, sp=True), L(pp=2, ep=2), L(pp=2, vpp=2)):
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


def test_mtp_needs_a_full_attention_moe_last_layer(zoo_model):
    """megatron builds the MTP layer from the last decoder layer's spec; Qwen3-Next's MTP layer is
    gated full attention + MoE, so a last layer of another kind is refused, naming the way out."""
    types = ["linear_attention", "full_attention", "full_attention", "linear_attention"]
    with pytest.raises(UnsupportedConfig, match=r"spec of the last decoder layer \(3\), a linear-attention layer"):
        _adapted(_config(zoo_model, layer_types=types), _saved(zoo_model)).architecture
    with pytest.raises(UnsupportedConfig, match=r"\(3\), a dense layer.*without the mtp\.\* tensors"):
        _adapted(_config(zoo_model, mlp_only_layers=[3]), _saved(zoo_model)).architecture


@pytest.mark.parametrize("world,layout", [
    pytest.param(w, lay, id=case_id(MODEL, w, lay), marks=pytest.mark.world(w))
    for w, lay in [(2, L(pp=2)), (2, L(tp=2, sp=True, ep=2, etp=1))]])
def test_roundtrip_is_byte_exact(world, layout, pools, zoo_model, tmp_path):
    src, out = zoo_model(MODEL), tmp_path / "converted"
    results = pools.get(world).run(cases.roundtrip, timeout=300, source=str(src), layout=layout.to_dict(),
                                   out_dir=str(out))
    expected = cases.check_roundtrip(results, src, out)
    assert set(MTP_OWN) <= set(expected) and "mtp.layers.0.mlp.experts.7.down_proj.weight" in expected


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("qwen3-next-mtp-reference-cache"))


def _verify(pools, zoo_model, ref_cache, **kw) -> dict:
    out = pools.get(2).run(verify_cases.verify, timeout=600, source=str(zoo_model(MODEL)),
                           layout=L(pp=2).to_dict(), reference_cache=ref_cache, **kw)
    reports = [r for r in out if r is not None]
    assert len(reports) == 1
    return reports[0]


@pytest.mark.world(2)
def test_mtp_head_verifies_fp32(pools, zoo_model, ref_cache):
    r = _verify(pools, zoo_model, ref_cache)
    assert r["verdict"] == "pass", r["failures"]
    assert r["metrics"]["max_diff"] < 1e-4 and r["metrics"]["router_agreement"] == 1.0
    (depth,) = r["mtp"]["depths"]
    assert r["mtp"]["reference"].startswith("ours")
    assert depth["ok"] and depth["max_diff"] < 1e-4 and depth["top1_agreement"] == 1.0
    assert depth["rel_mean_diff"] < 1e-5


@pytest.mark.world(2)
def test_perturbed_mtp_norm_is_caught_and_located(pools, zoo_model, ref_cache):
    """Negative control: the MTP embedding norm's stored offset x 1.5 (its (1 + w) scale moves by
    ~5%) leaves the main model exact and fails the MTP head, located with the HF tensor named."""
    r = _verify(pools, zoo_model, ref_cache, control="scale:mtp.layers.0.enorm.weight:1.5")
    assert r["verdict"] == "fail"
    assert r["metrics"]["max_diff"] < 1e-4 and all(x["ok"] for x in r["layers"])  # the main model is untouched
    first = r["first_diverging"]
    assert first["probe"] == "mtp.0" and "mtp.pre_fc_norm_embedding.weight" in first["hf_params"]
    assert not r["mtp"]["depths"][0]["ok"] and any(f.startswith("mtp.0 ") for f in r["failures"])
