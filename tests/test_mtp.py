"""Multi-token prediction (MTP) layers (``families/mtp.py``): DeepSeek-V3's MTP layer, stored as HF
layer ``num_hidden_layers`` with its embedding / head copies, converts into megatron-core's
``MultiTokenPredictionBlock`` and back byte-exactly on CPU layouts (MTP on the last pipeline stage);
the settings, the rules, refusals and the checkpoint checks (copies equal, nothing dropped)."""

from __future__ import annotations

import json

import pytest

from mcore_bridge import ParallelLayout as L
from mcore_bridge.families import UnsupportedConfig, family_for
from mcore_bridge.plan import MappingError, check_names, expected_hf_names, inventory
from tests import cases
from tests.matrix import case_id

MODEL = "deepseek_v3_mtp"
MTP_ONLY = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
            "shared_head.head.weight", "embed_tokens.weight")


def _config(zoo_model, **change):
    return {**json.loads((zoo_model(MODEL) / "config.json").read_text()), **change}


def _saved_names(path) -> set[str]:
    from mcore_bridge.hf_io import HFCheckpoint

    return set(HFCheckpoint(path).names())


def test_settings_and_rules_cover_the_saved_checkpoint(zoo_model):
    fam = family_for(_config(zoo_model))
    assert fam.mtp_layers == 1 and fam.architecture.config["mtp_num_layers"] == 1
    saved = _saved_names(zoo_model(MODEL))
    assert {"model.layers.4." + n for n in MTP_ONLY} <= saved  # the zoo stores what DeepSeek-V3 stores
    for layout in (L(), L(tp=2, sp=True), L(pp=2), L(ep=2), L(pp=2, vpp=2, ep=2)):
        units = inventory(fam, layout)
        assert expected_hf_names(units) == saved, layout.short()
        mtp = [u for u in units if u.rule.mcore.startswith("mtp.")]
        assert {u.owner[0] for u in mtp} == {layout.pp - 1} and {u.chunk for u in mtp} == {layout.vpp - 1}
        assert sum(u.expert is not None for u in mtp) == 8 * 2  # the MTP layer's routed experts (fc1, fc2)
    rows = {r.mcore.replace(".mtp_model_layer.", ".transformer_layer."): r for r in fam.rules()}  # 0.19 / 0.16
    assert rows["mtp.layers.0.eh_proj.weight"].hf == ("model.layers.4.eh_proj.weight",)
    assert rows["mtp.layers.0.final_layernorm.weight"].hf == ("model.layers.4.shared_head.norm.weight",)
    assert rows["mtp.layers.0.transformer_layer.mlp.router.expert_bias"].hf == (
        "model.layers.4.mlp.gate.e_score_correction_bias",)
    assert rows["embedding.word_embeddings.weight"].hf == ("model.embed_tokens.weight",
                                                           "model.layers.4.embed_tokens.weight")
    assert rows["output_layer.weight"].hf == ("lm_head.weight", "model.layers.4.shared_head.head.weight")


def test_nothing_is_dropped(zoo_model):
    """Strict accounting: an MTP tensor missing, or a second MTP layer the config does not declare,
    is refused by name; a checkpoint without any MTP tensor converts as the main model alone."""
    fam = family_for(_config(zoo_model))
    units, saved = inventory(fam, L()), _saved_names(zoo_model(MODEL))
    with pytest.raises(MappingError, match=r"missing 1 tensor\(s\): model\.layers\.4\.hnorm\.weight"):
        check_names(units, saved - {"model.layers.4.hnorm.weight"}, "ckpt")
    with pytest.raises(MappingError, match=r"unexpected tensor\(s\).*model\.layers\.5\.eh_proj\.weight"):
        check_names(units, saved | {"model.layers.5.eh_proj.weight"}, "ckpt")
    main = {n for n in saved if not n.startswith("model.layers.4.")}
    stripped = family_for(_config(zoo_model))
    stripped.adapt(main)
    assert stripped.mtp_layers == 0 and "mtp_num_layers" not in stripped.architecture.config
    assert expected_hf_names(inventory(stripped, L())) == main
    partial = family_for(_config(zoo_model))
    partial.adapt(main | {"model.layers.4.enorm.weight"})  # some MTP tensors: MTP stays, the rest is missing
    with pytest.raises(MappingError, match=r"missing \d+ tensor\(s\): model\.layers\.4\."):
        check_names(inventory(partial, L()), main | {"model.layers.4.enorm.weight"}, "ckpt")


def test_mtp_layer_kind_must_match_the_last_decoder_layer(zoo_model):
    """megatron builds the MTP transformer layer from the last decoder layer's spec: with
    first_k_dense_replace=4 every decoder layer is dense but HF's MTP layer 4 is MoE -> refused."""
    with pytest.raises(UnsupportedConfig, match=r"MTP layer 4 is a moe layer.*last decoder layer, a dense layer"):
        family_for(_config(zoo_model, first_k_dense_replace=4)).architecture
    family_for(_config(zoo_model, first_k_dense_replace=3)).architecture  # last layer MoE: fine


LAYOUTS = [(1, L()), (2, L(pp=2)), (2, L(tp=2, sp=True)), (2, L(ep=2)), (4, L(pp=2, vpp=2, ep=2))]


@pytest.mark.parametrize("world,layout", [
    pytest.param(w, lay, id=case_id(MODEL, w, lay), marks=pytest.mark.world(w)) for w, lay in LAYOUTS])
def test_mtp_roundtrip_is_byte_exact(world, layout, pools, zoo_model, tmp_path):
    src = zoo_model(MODEL)
    out = tmp_path / "converted"
    results = pools.get(world).run(cases.roundtrip, timeout=600, source=str(src), layout=layout.to_dict(),
                                   out_dir=str(out))
    expected = cases.check_roundtrip(results, src, out)
    assert {"model.layers.4." + n for n in MTP_ONLY} <= set(expected)


# ---- verification: main logits vs transformers, MTP head vs our reference of the formula ------------
@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mtp-reference-cache"))


def _verify(pools, zoo_model, ref_cache, world, layout, **kw) -> dict:
    from tests import verify_cases

    out = pools.get(world).run(verify_cases.verify, timeout=600, source=str(zoo_model(MODEL)),
                               layout=layout.to_dict(), reference_cache=ref_cache, **kw)
    reports = [r for r in out if r is not None]
    assert len(reports) == 1
    return reports[0]


VERIFY = [(1, L()), (2, L(pp=2)), (2, L(tp=2, sp=True, ep=2, etp=1))]


@pytest.mark.parametrize("world,layout", [
    pytest.param(w, lay, id=case_id(MODEL, w, lay), marks=pytest.mark.world(w)) for w, lay in VERIFY])
def test_mtp_verifies_fp32(world, layout, pools, zoo_model, ref_cache):
    r = _verify(pools, zoo_model, ref_cache, world, layout)
    assert r["verdict"] == "pass", r["failures"]
    assert r["metrics"]["max_diff"] < 1e-4 and r["metrics"]["router_agreement"] == 1.0
    (depth,) = r["mtp"]["depths"]
    assert r["mtp"]["reference"].startswith("ours")
    assert depth["ok"] and depth["max_diff"] < 1e-4 and depth["top1_agreement"] == 1.0
    assert depth["rel_mean_diff"] < 1e-5 and depth["router_agreement"] == 1.0  # the MTP layer's own routing
    from verify.report import render_markdown, validate_report

    markdown = render_markdown(validate_report(r))
    assert "## Multi-token prediction heads" in markdown and "ours (verify/mtp.py)" in markdown


@pytest.mark.world(2)
def test_perturbed_mtp_weight_is_caught_and_located(pools, zoo_model, ref_cache):
    """Negative control: the MTP embedding norm x 1.01 leaves the main model exact and fails the MTP
    head, located at the MTP layer with its parameters named. (eh_proj x 1.01 is nearly invisible:
    the decoder layer's pre-norms and shared_head.norm absorb a uniform scale of its output; measured
    rel drift 9.5e-5, just under the fp32 limit 1e-4.)"""
    r = _verify(pools, zoo_model, ref_cache, 2, L(pp=2), control="scale:mtp.layers.0.enorm.weight:1.01")
    assert r["verdict"] == "fail"
    assert r["metrics"]["max_diff"] < 1e-4 and all(x["ok"] for x in r["layers"])  # the main model is untouched
    first = r["first_diverging"]
    assert first["probe"] == "mtp.0" and "model.layers.4.enorm.weight" in first["hf_params"]
    assert {"mtp.layers.0.enorm.weight", "mtp.layers.0.eh_proj.weight"} <= set(first["mcore_params"])
    assert not r["mtp"]["depths"][0]["ok"] and any(f.startswith("mtp.0 ") for f in r["failures"])


def load_error(source: str, layout: dict) -> str | None:
    """(pool case) The error of loading ``source`` into a model built for it, or None."""
    from mcore_bridge.bridge import Bridge

    bridge = Bridge(source, L(**layout))
    bridge.setup("cpu")
    models = bridge.build_model()
    try:
        bridge.load_weights(models)
    except Exception as e:  # noqa: BLE001  (the test looks at which error each rank raised)
        return f"{type(e).__name__}: {e}"
    return None


@pytest.mark.world(2)
def test_copies_that_differ_are_refused_by_name(pools, zoo_model, tmp_path):
    """The MTP layer's embedding copy must equal the main embedding (megatron keeps one tensor):
    a checkpoint where it differs in one row is refused on every rank, naming both tensors."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(zoo_model(MODEL), bad)
    (path,) = bad.glob("*.safetensors")
    tensors = load_file(path)
    tensors["model.layers.4.embed_tokens.weight"][999, 3] += 0.5  # a row only the last vocab shard holds
    save_file(tensors, path, metadata={"format": "pt"})
    errors = pools.get(2).run(load_error, timeout=600, source=str(bad), layout=L(pp=2).to_dict())
    assert all(errors), errors  # every rank fails, none hangs
    assert any("model.layers.4.embed_tokens.weight differs from model.embed_tokens.weight (max |diff| 0.5" in e
               for e in errors), errors


def te_spec_error(source: str, layout: dict) -> str | None:
    """(pool case) The error of writing this model's sharded state in the TE key layout."""
    from mcore_bridge import dist_ckpt
    from mcore_bridge.bridge import Bridge
    from mcore_bridge.errors import UsageError

    bridge = Bridge(source, L(**layout))
    bridge.setup("cpu")
    models = bridge.build_model()
    try:
        dist_ckpt.sharded_state(models, spec="te")
    except UsageError as e:
        return str(e)
    return None


@pytest.mark.world(1)
def test_te_key_layout_with_mtp_is_refused_not_mislabelled(pools, zoo_model):
    """megatron's TE MTP block has other keys (TE extra states, fused norms) than the local one:
    the TE writer does not map them yet, so it refuses instead of writing local names as TE."""
    (err,) = pools.get(1).run(te_spec_error, timeout=600, source=str(zoo_model(MODEL)), layout={})
    assert err and "multi-token-prediction" in err and "spec 'local'" in err
    (ok,) = pools.get(1).run(te_spec_error, timeout=600, source=str(zoo_model("deepseek_v3")), layout={})
    assert ok is None  # control: the same family without MTP layers writes the TE layout


def test_lora_with_mtp_is_refused(zoo_model):
    """PEFT's model has no MTP layer: LoRA on an MTP model is refused before anything is wrapped."""
    from mcore_bridge.bridge import Bridge
    from mcore_bridge.lora import AdapterError

    with pytest.raises(AdapterError, match=r"multi-token-prediction layers \(deepseek_v3, num_nextn_predict_layers=1"):
        Bridge(str(zoo_model(MODEL))).family.check_lora()
    Bridge(str(zoo_model("deepseek_v3"))).family.check_lora()  # control: no MTP tensors, no MTP layers


def test_grad_verification_with_mtp_is_refused(zoo_model):
    """megatron's MTP loss flows into every gradient; transformers has none: refused up front."""
    from mcore_bridge.errors import UsageError
    from verify.run import run_layout

    with pytest.raises(UsageError, match="multi-token-prediction layers: megatron adds the MTP loss"):
        run_layout(str(zoo_model(MODEL)), L(), grad=True)


def test_copies_transform():
    """``Copies``: each copy split like the inner transform, equal copies required, export writes
    each copy with its own storage (safetensors refuses tensors sharing memory)."""
    import torch

    from mcore_bridge.transforms import VOCAB, Copies, ShapeMismatch

    t = Copies(VOCAB, 2)
    full = torch.randn(10, 4)
    hf = [(10, 4), (10, 4)]
    assert t.slices(hf, (6, 4), 2, 1) == [(slice(6, 10), slice(None))] * 2  # padded vocab 12, rank 1
    out = torch.empty(6, 4)
    t.to_mcore_into([full[6:], full[6:].clone()], out, 2, 1)
    assert torch.equal(out[:4], full[6:]) and not out[4:].any()
    with pytest.raises(ShapeMismatch, match="the copies differ"):
        t.to_mcore_into([full[6:], full[6:] + 1], out, 2, 1)
    with pytest.raises(ShapeMismatch, match="copies' shapes differ"):
        t.local_shape([(10, 4), (11, 4)], 1)
    a, b = t.to_hf([torch.cat([full, torch.zeros(2, 4)])], hf)
    assert torch.equal(a, full) and torch.equal(b, full) and a.data_ptr() != b.data_ptr()


# ---- GLM-4.5: the same MTP layout through the same mixin (one base class in families/glm4_moe.py) ----
GLM = "glm4_moe_mtp"


@pytest.mark.parametrize("world,layout", [
    pytest.param(w, lay, id=case_id(GLM, w, lay), marks=pytest.mark.world(w)) for w, lay in [(1, L()), (2, L(pp=2))]])
def test_glm4_moe_mtp_roundtrip_is_byte_exact(world, layout, pools, zoo_model, tmp_path):
    src = zoo_model(GLM)
    out = tmp_path / "converted"
    results = pools.get(world).run(cases.roundtrip, timeout=600, source=str(src), layout=layout.to_dict(),
                                   out_dir=str(out))
    expected = cases.check_roundtrip(results, src, out)
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    assert {f"model.layers.{layers}." + n for n in MTP_ONLY} <= set(expected)


def test_glm4_moe_mtp_verifies_fp32(pools, zoo_model, ref_cache):
    from tests import verify_cases

    out = pools.get(1).run(verify_cases.verify, timeout=600, source=str(zoo_model(GLM)), layout=L().to_dict(),
                           reference_cache=ref_cache)
    (r,) = [r for r in out if r is not None]
    assert r["verdict"] == "pass", r["failures"]
    (depth,) = r["mtp"]["depths"]
    assert depth["ok"] and depth["max_diff"] < 1e-4 and depth["top1_agreement"] == 1.0
    assert depth["router_agreement"] == 1.0


def test_mtp_model_runs_the_standard_positive_controls(pools, zoo_model, ref_cache):
    """The standard controls (x1.01 of a mid-depth weight, two swapped experts) skip the MTP layer's
    own experts (``mtp.layers.0.transformer_layer...``) and are caught in the decoder layer they name."""
    r = _verify(pools, zoo_model, ref_cache, 1, L(), detection=True)
    assert r["verdict"] == "pass", r["failures"]
    assert r["detection"]["caught"] and r["detection"]["located"], r["detection"]
    assert any(c["control"].startswith("swap_experts:") for c in r["detection"]["controls"])


def test_bf16_mtp_limits_come_from_hf_s_own_bf16_mtp_drift(pools, zoo_model, ref_cache):
    """bf16: each MTP depth is judged against HF's own bf16-vs-fp32 drift at that depth (3x), as the
    decoder layers are, not against the fp32-level floor (on an H200, GLM-4.5-Air's unperturbed MTP
    layer drifted 3.1e-2 in bf16 and failed a fixed 1e-3)."""
    r = _verify(pools, zoo_model, ref_cache, 1, L(), dtype="bf16")
    assert r["verdict"] == "pass", r["failures"]
    (depth,) = r["mtp"]["depths"]
    assert depth["ok"] and depth["threshold"] > 1e-3  # the calibrated limit, above the bf16 floor here
    assert depth["rel_mean_diff"] > 1e-3  # ... which this tiny model's bf16 MTP layer needs


def test_bf16_perturbed_mtp_weight_is_still_caught_and_located(pools, zoo_model, ref_cache):
    """The negative control of the calibrated bf16 MTP limits: a x1.5 MTP embedding norm."""
    r = _verify(pools, zoo_model, ref_cache, 1, L(), dtype="bf16", control="scale:mtp.layers.0.enorm.weight:1.5")
    assert r["verdict"] == "fail"
    assert all(x["ok"] for x in r["layers"])  # the main model is untouched
    assert r["first_diverging"]["probe"] == "mtp.0" and any(f.startswith("mtp.0 ") for f in r["failures"])
