"""InternVL 3 / 3.5 (``internvl``: InternViT + pixel shuffle + projector over a Qwen text family)
through the bridge on CPU process groups: byte-exact round trips, fp32 verification with image tiles
gated on the loss tokens, strict accounting of the vision weights, the settings carried over and
refused, and negative controls (a perturbed projector / vision weight caught and located)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mcore_bridge import ParallelLayout as L
from mcore_bridge.hf_io import HFCheckpoint
from mcore_bridge.plan import MappingError
from tests import cases, verify_cases
from tests.matrix import case_id

MODEL = "internvl"


def _raw(zoo_model) -> dict:
    return json.loads((zoo_model(MODEL) / "config.json").read_text())


def _family(raw):
    from mcore_bridge.families import family_for

    return family_for(raw)


@pytest.fixture(scope="session")
def ref_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("internvl-reference-cache"))


# ---- settings ---------------------------------------------------------------------------------
def test_language_model_is_the_text_family(zoo_model):
    """The LM part is our Qwen3 family (q/k norms, RoPE), tied by the outer config; the vision side
    is the real transformers modules, with the tile settings read from the config."""
    from mcore_bridge.families import Qwen2, Qwen3
    from mcore_bridge.families.moe import Qwen3MoE

    raw = _raw(zoo_model)
    fam = _family(raw)
    assert isinstance(fam, Qwen3) and fam.name == "internvl" and fam.multimodal
    arch = fam.architecture
    assert arch.config["qk_layernorm"] is True and arch.config["kv_channels"] == 32
    assert arch.model["position_embedding_type"] == "rope" and arch.model["rotary_base"] == 1e6
    assert "rope_scaling" not in arch.model and arch.model["share_embeddings_and_output_weights"] is True
    assert arch.model_class().__name__ == "TiledVisionGPT"
    v = arch.model["vision"]
    assert (v.image_token_id, v.image_size, v.patch_size, v.tokens_per_tile) == (999, 64, 8, 16)
    for kind, cls in (("qwen2", Qwen2), ("qwen3_moe", Qwen3MoE)):
        text = dict(raw["text_config"], model_type=kind, num_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=32)
        assert isinstance(_family(dict(raw, text_config=text)), cls), kind
    # the outer config decides tying, and transformers' InternVLConfig defaults it to True
    untied = {k: v for k, v in raw.items() if k != "tie_word_embeddings"}
    assert _family(untied).tied and not _family(dict(raw, tie_word_embeddings=False)).tied


@pytest.mark.parametrize("change,match", [
    ({"vision_feature_layer": -2}, r"vision_feature_layer=-2: only the last vision layer"),
    ({"vision_feature_select_strategy": "full"}, r"vision_feature_select_strategy='full'"),
    ({"text_config": {"model_type": "llama"}}, r"text_config.model_type='llama' is not mapped"),
    ({"vision_config": {"image_size": [64, 32]}}, r"image_size=\[64, 32\].*only square tiles"),
    ({"text_config": {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6}}}, "rope_type='yarn'"),
])
def test_refusals_name_the_setting(zoo_model, change, match):
    from mcore_bridge.families import UnsupportedConfig

    raw = _raw(zoo_model)
    for key, value in change.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    with pytest.raises(UnsupportedConfig, match=match):
        _family(raw).model_settings()


def test_dynamic_rope_equals_default_up_to_max_positions():
    """InternVL3 declares dynamic-NTK RoPE (factor 2), which megatron lacks: transformers keeps the
    default frequencies up to max_position_embeddings and rescales only beyond, so mapping it to the
    default RoPE is exact up to that length (and only there)."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    kw = dict(hidden_size=64, num_attention_heads=2, head_dim=32, max_position_embeddings=256)
    dynamic = Qwen3RotaryEmbedding(Qwen3Config(**kw, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                       "rope_theta": 1e6}))
    default = Qwen3RotaryEmbedding(Qwen3Config(**kw, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    x = torch.zeros(1, 1, 32)
    within = torch.arange(256)[None]
    assert all(torch.equal(a, b) for a, b in zip(dynamic(x, within), default(x, within)))
    beyond = torch.arange(512)[None]
    assert not torch.allclose(dynamic(x, beyond)[0], default(x, beyond)[0])


def test_pixel_shuffle_matches_transformers():
    from transformers.models.internvl.modeling_internvl import InternVLModel

    from mcore_bridge.families.internvl import pixel_shuffle

    x = torch.randn(3, 8, 8, 32)
    assert torch.equal(pixel_shuffle(x, 0.5), InternVLModel.pixel_shuffle(None, x, 0.5))
    plain = x.reshape(3, 4, 4, 128)  # neighbours merged without InternVL's axis order: differs
    assert not torch.equal(pixel_shuffle(x, 0.5), plain)


# ---- weights ----------------------------------------------------------------------------------
def test_rules_cover_transformers_names_in_both_spellings(zoo_model):
    """The rules name exactly what transformers saves (the hub's spelling) and, after ``adapt``,
    exactly the in-memory state-dict names."""
    from transformers import AutoModelForImageTextToText

    from mcore_bridge.families.qwen_vl import hf_config
    from mcore_bridge.plan import expected_hf_names, inventory

    src = zoo_model(MODEL)
    saved = set(HFCheckpoint(src).names())
    fam = _family(_raw(zoo_model))
    fam.adapt(saved)
    for layout in (L(), L(tp=2, sp=True), L(pp=2)):
        assert expected_hf_names(inventory(fam, layout)) == saved, layout.short()
    assert any(n.startswith("vision_tower.encoder.layer.2.") for n in saved)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(hf_config(fam.full_config))
    memory = set(model.state_dict()) - {"lm_head.weight"}  # tied: the embedding
    fam = _family(_raw(zoo_model))
    fam.adapt(memory)
    assert expected_hf_names(inventory(fam, L())) == memory


def _rewrite(src, dest, drop=(), add=None, rename=None):
    """A copy of checkpoint ``src`` with tensors dropped / added / renamed."""
    from safetensors.torch import save_file

    shutil.copytree(src, dest)
    ckpt = HFCheckpoint(dest)
    tensors = {(rename or (lambda n: n))(n): ckpt.read(n).clone() for n in ckpt.names() if n not in drop}
    ckpt.close()
    tensors.update(add or {})
    for f in dest.glob("*.safetensors*"):
        f.unlink()
    save_file(tensors, str(dest / "model.safetensors"))
    return dest


def test_vision_weights_are_accounted_strictly(zoo_model, tmp_path):
    from mcore_bridge.bridge import Bridge

    src = zoo_model(MODEL)
    for name in ("multi_modal_projector.linear_2.bias", "vision_tower.encoder.layer.1.lambda_2",
                 "vision_tower.layernorm.weight"):
        missing = _rewrite(src, tmp_path / name, drop={name})
        with pytest.raises(MappingError, match=rf"missing 1 tensor\(s\): {name.replace('.', '[.]')}"):
            Bridge(missing)
    extra = _rewrite(src, tmp_path / "extra", add={"vision_tower.encoder.layer.3.mlp.fc1.bias": torch.zeros(64)})
    with pytest.raises(MappingError, match=r"unexpected tensor\(s\).*vision_tower\.encoder\.layer\.3\.mlp\.fc1\.bias"):
        Bridge(extra)


def test_lora_is_refused(zoo_model):
    from mcore_bridge.bridge import Bridge
    from mcore_bridge.lora import AdapterError, LoraSpec

    with pytest.raises(AdapterError, match="vision-language"):
        Bridge(zoo_model(MODEL)).apply_lora([], LoraSpec(r=4))


ROUNDTRIPS = [(1, L()), (2, L(tp=2, sp=True)), (2, L(pp=2))]


@pytest.mark.parametrize("world,layout", [pytest.param(w, lay, id=case_id(MODEL, w, lay), marks=pytest.mark.world(w))
                                          for w, lay in ROUNDTRIPS])
def test_roundtrip_is_byte_exact(world, layout, pools, zoo_model, tmp_path):
    src = zoo_model(MODEL)
    out = tmp_path / "converted"
    results = pools.get(world).run(cases.roundtrip, timeout=300, source=str(src), layout=layout.to_dict(),
                                   out_dir=str(out))
    expected = cases.check_roundtrip(results, src, out)
    assert sum(n.startswith(("vision_tower.", "multi_modal_projector.")) for n in expected) > 50
    assert (out / "preprocessor_config.json").exists()


def _in_memory_name(name: str) -> str:
    if name.startswith("language_model.model."):
        return "model.language_model." + name[len("language_model.model."):]
    return "lm_head.weight" if name == "language_model.lm_head.weight" else "model." + name


@pytest.mark.world(1)
def test_in_memory_spelling_round_trips(pools, zoo_model, tmp_path):
    """A checkpoint holding the in-memory names (``model.language_model.*``...) is read and written
    back in that spelling."""
    src = _rewrite(zoo_model(MODEL), tmp_path / "in-memory", rename=_in_memory_name)
    assert any(n.startswith("model.language_model.layers.") for n in HFCheckpoint(src).names())
    out = tmp_path / "converted"
    results = pools.get(1).run(cases.roundtrip, timeout=300, source=str(src), layout=L().to_dict(), out_dir=str(out))
    cases.check_roundtrip(results, src, out)


# ---- verification -----------------------------------------------------------------------------
def _verify(pools, zoo_model, ref_cache, world, layout, model=MODEL, **kw) -> dict:
    out = pools.get(world).run(verify_cases.verify, timeout=300, source=str(zoo_model(model)),
                               layout=layout.to_dict(), reference_cache=ref_cache, **kw)
    reports = [r for r in out if r is not None]
    assert len(reports) == 1
    return reports[0]


VERIFY = [  # InternVL3.5-style (Qwen3 LM) over TP+SP and PP; InternVL3-style (Qwen2 LM); InternVL3.5-MoE over EP
    (MODEL, 2, L(tp=2, sp=True)), (MODEL, 2, L(pp=2)), ("internvl_qwen2", 1, L()), ("internvl_moe", 2, L(ep=2))]


@pytest.mark.parametrize("model,world,layout", [pytest.param(m, w, lay, id=case_id(m, w, lay), marks=pytest.mark.world(w))
                                                for m, w, lay in VERIFY])
def test_verification_passes_fp32_with_image_tiles(model, world, layout, pools, zoo_model, ref_cache):
    r = _verify(pools, zoo_model, ref_cache, world, layout, model)
    assert r["verdict"] == "pass", r["failures"]
    assert r["gate"] == "with_loss" and "mean_diff" not in r["thresholds"]
    m = r["metrics"]
    assert m["mean_diff_with_loss"] < 1e-5 and m["max_diff"] < 1e-3 and m["top1_agreement_with_loss"] == 1.0
    assert [i.get("tiles") for i in r["inputs"]][:2] == [3, 4]  # 2 tiles + thumbnail; 1, then 2 + thumbnail
    probes = [entry["probe"] for entry in r["layers"]]
    assert probes[:4] == ["vision.block.0", "vision.block.1", "vision.block.2", "vision.merger"]
    assert probes[4:] == ["embedding"] + [f"layer.{i}" for i in range(4)] + ["final_norm"]
    if model == "internvl_moe":
        assert r["metrics"]["router_agreement"] >= 0.99


CONTROLS = [  # (world, layout, control, first diverging probe, an HF tensor behind it)
    (2, L(pp=2), "scale:visual.merger.projector.linear_1.weight:1.01", "vision.merger",
     "multi_modal_projector.linear_1.weight"),
    (1, L(), "scale:visual.blocks.1.mlp.fc1.weight:1.01", "vision.block.1", "vision_tower.encoder.layer.1.mlp.fc1.weight"),
]


@pytest.mark.parametrize("world,layout,control,where,hf_name", [
    pytest.param(w, lay, c, p, h, id=f"{lay.short()}-{p}", marks=pytest.mark.world(w)) for w, lay, c, p, h in CONTROLS])
def test_negative_control_is_caught_and_located(world, layout, control, where, hf_name, pools, zoo_model, ref_cache):
    r = _verify(pools, zoo_model, ref_cache, world, layout, control=control)
    assert r["verdict"] == "fail", r["metrics"]
    first = r["first_diverging"]
    assert first["probe"] == where, first
    assert hf_name in first["hf_params"], first
    assert all(n.startswith(("vision_tower.", "multi_modal_projector.")) for n in first["hf_params"]), first
    assert control.split(":")[1] in first["mcore_params"]
    order = [e["probe"] for e in r["layers"]]
    assert all(e["ok"] for e in r["layers"][: order.index(where)])  # nothing before it drifted


def test_transformers_default_config_maps_at_full_size():
    """transformers' own ``InternVLConfig()`` (InternViT-300M at 448 px, 14 px patches; a default
    Qwen2 language model): 256 tokens per tile as its ``image_seq_length`` says, and the rules name
    exactly the state dict transformers builds for it (on the meta device)."""
    from transformers import AutoModelForImageTextToText, InternVLConfig

    from mcore_bridge.plan import expected_hf_names, inventory

    cfg = InternVLConfig()
    fam = _family(cfg.to_dict())
    v = fam.architecture.model["vision"]
    assert (v.image_size, v.patch_size, v.tokens_per_tile) == (448, 14, cfg.image_seq_length) == (448, 14, 256)
    assert fam.tied and fam.architecture.config["num_layers"] == cfg.text_config.num_hidden_layers
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg)
    memory = set(model.state_dict()) - {"lm_head.weight"}
    fam.adapt(memory)
    assert expected_hf_names(inventory(fam, L(tp=2, sp=True, pp=2))) == memory
    layers = {n.split(".")[4] for n in memory if n.startswith("model.vision_tower.encoder.layer.")}
    assert layers == {str(i) for i in range(24)}  # the whole 24-layer tower is mapped
