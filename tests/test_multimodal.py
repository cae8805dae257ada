"""Vision-language models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE) through the bridge on CPU
process groups: byte-exact round trips, fp32 verification with images gated on the loss tokens,
strict accounting of the vision tower, transformers' own 3-D positions, and negative controls (a
perturbed vision weight located in the vision tower, a wrong multimodal RoPE split)."""

from __future__ import annotations

import json

import pytest
import torch

from mcore_bridge import ParallelLayout as L
from mcore_bridge import zoo
from mcore_bridge.hf_io import HFCheckpoint
from mcore_bridge.layout import LayoutError
from mcore_bridge.plan import MappingError
from tests import cases, verify_cases
from tests.matrix import case_id

VL = [m for m in zoo.MULTIMODAL if m.startswith("qwen")]  # Gemma 3: tests/test_gemma3_vl.py
LAYOUTS = {  # tp in {1, 2} with sp, pp in {1, 2}; ep for the MoE model
    "qwen2_vl": [(1, L()), (2, L(tp=2, sp=True)), (4, L(tp=2, sp=True, pp=2))],
    "qwen2_5_vl": [(2, L(pp=2)), (4, L(tp=2, sp=True, pp=2))],
    "qwen3_vl": [(1, L()), (2, L(tp=2, sp=True)), (2, L(pp=2)), (4, L(tp=2, sp=True, pp=2))],
    "qwen3_vl_moe": [(2, L(ep=2)), (4, L(tp=2, sp=True, ep=2)), (4, L(pp=2, ep=2)),
                     (4, L(tp=2, sp=True, ep=2, etp=1))],
}


def _params(models=VL):
    return [pytest.param(m, w, lay, id=case_id(m, w, lay), marks=pytest.mark.world(w))
            for m in models for w, lay in LAYOUTS[m]]


@pytest.fixture(scope="session")
def ref_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("vl-reference-cache"))


# ---- weights ----------------------------------------------------------------------------------
@pytest.mark.parametrize("model,world,layout", _params())
def test_vl_roundtrip_is_byte_exact(model, world, layout, pools, zoo_model, tmp_path):
    src = zoo_model(model)
    out = tmp_path / "converted"
    results = pools.get(world).run(cases.roundtrip, timeout=300, source=str(src), layout=layout.to_dict(),
                                   out_dir=str(out))
    expected = cases.check_roundtrip(results, src, out)
    assert sum(".visual." in f".{n}" for n in expected) > 20  # the vision tower travels too
    assert (out / "preprocessor_config.json").exists()


def test_checkpoint_spelling_and_storage(zoo_model):
    """Qwen2-VL / 2.5-VL are written in the older layout, Qwen3-VL in transformers 5 names; the
    MoE stacks its experts. The family follows what the checkpoint holds."""
    from mcore_bridge.bridge import Bridge

    expect = {"qwen2_vl": ("model.layers.0.", "visual.blocks.0."),
              "qwen2_5_vl": ("model.layers.0.", "visual.blocks.0."),
              "qwen3_vl": ("model.language_model.layers.0.", "model.visual.blocks.0."),
              "qwen3_vl_moe": ("model.language_model.layers.0.", "model.visual.blocks.0.")}
    for model, (lm, vision) in expect.items():
        names = HFCheckpoint(zoo_model(model)).names()
        assert any(n.startswith(lm) for n in names) and any(n.startswith(vision) for n in names), model
        b = Bridge(zoo_model(model))
        assert b.family.spelling == (lm[: -len("layers.0.")], vision[: -len("blocks.0.")])
        assert b.expert_storage == ("out_in" if model == "qwen3_vl_moe" else None)


def _without(src, dest, drop=(), add=None):
    """A copy of checkpoint ``src`` with tensors dropped / added."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dest)
    ckpt = HFCheckpoint(dest)
    tensors = {n: ckpt.read(n).clone() for n in ckpt.names() if n not in drop}
    ckpt.close()
    tensors.update(add or {})
    for f in dest.glob("*.safetensors*"):
        f.unlink()
    save_file(tensors, str(dest / "model.safetensors"))
    return dest


def test_vision_tower_is_accounted_strictly(zoo_model, tmp_path):
    from mcore_bridge.bridge import Bridge

    src = zoo_model("qwen3_vl")
    missing = _without(src, tmp_path / "missing", drop={"model.visual.blocks.2.attn.qkv.weight"})
    with pytest.raises(MappingError, match=r"missing 1 tensor\(s\): model\.visual\.blocks\.2\.attn\.qkv\.weight"):
        Bridge(missing)
    extra = _without(src, tmp_path / "extra", add={"model.visual.blocks.3.attn.qkv.weight": torch.zeros(96, 32)})
    with pytest.raises(MappingError, match=r"unexpected tensor\(s\).*model\.visual\.blocks\.3\.attn\.qkv\.weight"):
        Bridge(extra)


def test_config_errors_name_the_setting(zoo_model):
    from mcore_bridge.bridge import Bridge
    from mcore_bridge.families import UnsupportedConfig, family_for

    raw = json.loads((zoo_model("qwen2_vl") / "config.json").read_text())
    bad = json.loads(json.dumps(raw))
    bad["text_config"]["rope_parameters"]["mrope_section"] = [2, 3, 4]
    with pytest.raises(UnsupportedConfig, match=r"mrope_section=\[2, 3, 4\] sums to 9.*expected a sum of 8"):
        family_for(bad).model_settings()
    del bad["text_config"]["rope_parameters"]["mrope_section"]
    with pytest.raises(UnsupportedConfig, match="no 3-part mrope_section"):
        family_for(bad).model_settings()
    with pytest.raises(LayoutError, match=r"deepstack .* layers 0-1, .* puts 1 there: use --decoder-first-pipeline"):
        Bridge(zoo_model("qwen3_vl"), L(pp=4))
    assert Bridge(zoo_model("qwen3_vl"), L(pp=2)).layout.pp == 2  # two layers on the first stage: enough


def test_lora_is_refused_on_vl(zoo_model):
    from mcore_bridge.bridge import Bridge
    from mcore_bridge.lora import AdapterError, LoraSpec

    with pytest.raises(AdapterError, match="vision-language"):
        Bridge(zoo_model("qwen2_vl")).apply_lora([], LoraSpec(r=4))


# ---- inputs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model", VL)
def test_samples_use_transformers_positions(model, zoo_model):
    """Image samples carry genuinely 3-D positions; the HF model given them computes exactly what
    it computes when it derives them itself (from ``mm_token_type_ids``)."""
    from mcore_bridge.families import family_for
    from verify.forward import hf_forward, hf_model
    from verify.inputs import multimodal_samples

    src = zoo_model(model)
    family = family_for(json.loads((src / "config.json").read_text()))
    samples = multimodal_samples(family, src)
    hf = hf_model(src)
    vision = family.vision_settings()
    for s in samples:
        n_image = int((s.input_ids == vision.image_token_id).sum())
        if not s.vision:
            assert n_image == 0 and torch.equal(s.position_ids[0], s.position_ids[1])
            continue
        merge = hf.config.vision_config.spatial_merge_size
        assert n_image == int(s.vision["image_grid_thw"].prod(-1).sum()) // merge ** 2
        assert not torch.equal(s.position_ids[1], s.position_ids[2])  # h and w differ on the image
        assert (s.labels[s.input_ids == vision.image_token_id] == -100).all()
        mm = (s.input_ids == vision.image_token_id).int()[None]
        with torch.no_grad():
            ours = hf_forward(hf, s.input_ids[None], s.position_ids[:, None], s.vision)
            hf.model.rope_deltas = None
            theirs = hf(input_ids=s.input_ids[None], mm_token_type_ids=mm, use_cache=False, **s.vision).logits
        assert torch.equal(ours, theirs), s.name


# ---- verification -----------------------------------------------------------------------------
def _verify(pools, zoo_model, ref_cache, model, world, layout, **kw) -> dict:
    out = pools.get(world).run(verify_cases.verify, timeout=300, source=str(zoo_model(model)),
                               layout=layout.to_dict(), reference_cache=ref_cache, **kw)
    reports = [r for r in out if r is not None]
    assert len(reports) == 1
    return reports[0]


@pytest.mark.parametrize("model,world,layout", _params())
def test_vl_verification_passes_fp32_with_images(model, world, layout, pools, zoo_model, ref_cache):
    r = _verify(pools, zoo_model, ref_cache, model, world, layout)
    assert r["verdict"] == "pass", r["failures"]
    assert r["gate"] == "with_loss" and "mean_diff" not in r["thresholds"]
    m = r["metrics"]
    assert m["mean_diff_with_loss"] < 1e-5 and m["max_diff"] < 1e-3 and m["top1_agreement_with_loss"] == 1.0
    images = [i for i in r["inputs"] if i.get("images")]
    assert len(images) == 2 and any(i["name"].startswith("random") for i in r["inputs"])
    probes = [entry["probe"] for entry in r["layers"]]
    depth = 3
    assert [p for p in probes if p.startswith("vision.block.")] == [f"vision.block.{i}" for i in range(depth)]
    assert "vision.merger" in probes and probes.index("vision.merger") < probes.index("embedding")
    assert ("vision.deepstack.1" in probes) == model.startswith("qwen3")
    assert probes[-6:] == ["embedding"] + [f"layer.{i}" for i in range(4)] + ["final_norm"]
    if model == "qwen3_vl_moe":
        assert r["metrics"]["router_agreement"] >= 0.99


CONTROLS = [  # (model, world, layout, control, first diverging probe)
    ("qwen2_vl", 2, L(tp=2, sp=True), "scale:visual.blocks.1.mlp.fc1.weight:1.01", "vision.block.1"),
    ("qwen3_vl", 2, L(pp=2), "scale:visual.blocks.2.attn.qkv.weight:1.01", "vision.block.2"),
    ("qwen3_vl_moe", 2, L(ep=2), "scale:visual.deepstack_merger_list.0.linear_fc2.weight:1.05",
     "vision.deepstack.0"),
    ("qwen2_vl", 1, L(), "mrope_section:3,3,2", "layer.0"),
    ("qwen2_5_vl", 2, L(tp=2, sp=True), "mrope_section:4,2,2", "layer.0"),
    ("qwen3_vl", 1, L(), "mrope_contiguous", "layer.0"),
]


@pytest.mark.parametrize("model,world,layout,control,where", [
    pytest.param(m, w, lay, c, p, id=f"{m}-{lay.short()}-{c.split(':')[0]}-{p}", marks=pytest.mark.world(w))
    for m, w, lay, c, p in CONTROLS])
def test_vl_negative_control_is_caught_and_located(model, world, layout, control, where, pools, zoo_model,
                                                    ref_cache):
    r = _verify(pools, zoo_model, ref_cache, model, world, layout, control=control)
    assert r["verdict"] == "fail", r["metrics"]
    first = r["first_diverging"]
    assert first["probe"] == where, first
    if where.startswith("vision."):
        assert first["hf_params"] and all(".visual." in f".{n}" for n in first["hf_params"]), first
        assert all(n.startswith("visual.") for n in first["mcore_params"]), first
        assert control.split(":")[1] in first["mcore_params"]
        before = [e for e in r["layers"] if e["probe"].startswith("vision.")][: [e["probe"] for e in r["layers"]].index(where)]
        assert all(e["ok"] for e in before)
