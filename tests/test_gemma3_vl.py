"""Gemma 3 vision-language (``gemma3``, e.g. google/gemma-3-4b-it): the published config's megatron
settings, refusals, rules equal to transformers' names in the three on-disk spellings, strict
accounting of the vision weights, the attention masks equal to transformers' (bidirectional within
an image, sliding window folded in), byte-exact round trips, fp32 verification with images against
transformers, and negative controls (projector, vision block, causal images, window) caught and
located."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mcore_bridge import ParallelLayout as L
from mcore_bridge.families import UnsupportedConfig, family_for
from mcore_bridge.hf_io import HFCheckpoint
from mcore_bridge.plan import MappingError, expected_hf_names, inventory
from tests import cases, verify_cases

PUBLISHED = Path(__file__).parent / "published" / "google__gemma-3-4b-it.json"


def _raw(src) -> dict:
    return json.loads((Path(src) / "config.json").read_text())


# ---- settings and refusals (one process) --------------------------------------------------------
def test_published_config_maps_to_megatron_settings():
    raw = json.loads(PUBLISHED.read_text())
    fam = family_for(raw)
    c, m = fam.architecture.config, fam.architecture.model
    assert fam.name == "gemma3" and fam.multimodal and fam.tied  # Gemma3Config's default: tied
    assert (c["num_layers"], c["hidden_size"], c["ffn_hidden_size"]) == (34, 2560, 10240)
    assert (c["num_attention_heads"], c["num_query_groups"], c["kv_channels"]) == (8, 4, 256)  # text defaults
    assert c["softmax_scale"] == 256 ** -0.5 and c["qk_layernorm"]
    assert "window_size" not in c and "window_attn_skip_freq" not in c  # the window is in the masks
    sliding = tuple(i for i in range(34) if (i + 1) % 6)  # every 6th layer global
    assert m["sliding_window"] == 1024 and m["sliding_layers"] == sliding == m["local_rope_layers"]
    assert m["rotary_base"] == 1e6 and m["seq_len_interpolation_factor"] == 8.0 and m["local_rotary_base"] == 1e4
    assert (m["vocab_size"], m["image_token_id"], m["tokens_per_image"]) == (262208, 262144, 256)
    assert m["share_embeddings_and_output_weights"] and m["bidirectional_images"]
    names = fam.vision_names()  # transformers' SigLIP tower (27 blocks of 16 tensors) + projector
    assert sum(n.startswith("vision_tower.encoder.layers.") for n in names) == 27 * 16
    assert {"multi_modal_projector.mm_input_projection_weight", "multi_modal_projector.mm_soft_emb_norm.weight",
            "vision_tower.post_layernorm.weight"} <= set(names)


def test_spec_takes_the_models_mask():
    from megatron.core.transformer.enums import AttnMaskType

    from mcore_bridge.families.gemma3_vl_model import Gemma3VLGPT
    from mcore_bridge.model import transformer_config

    fam = family_for(json.loads(PUBLISHED.read_text()))
    spec = fam.architecture.layer_spec(transformer_config(fam, L(pp=2), torch.float32, "cpu"), None, 0)
    assert {s.submodules.self_attention.params["attn_mask_type"] for s in spec.layer_specs} == {AttnMaskType.arbitrary}
    assert fam.architecture.model_class() is Gemma3VLGPT


@pytest.mark.parametrize("edit,match", [
    (lambda r: r["text_config"].update(final_logit_softcapping=30.0), "final_logit_softcapping=30.0"),
    (lambda r: r["text_config"].update(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (lambda r: r["text_config"].update(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (lambda r: r.update(mm_tokens_per_image=255), r"mm_tokens_per_image=255: .* 64 x 64 patches .* into 256 tokens"),
    (lambda r: r.pop("vision_config"), "no vision_config"),
], ids=["final-softcap", "attn-softcap", "bidirectional-text", "not-square", "no-vision"])
def test_refusals_name_the_field(edit, match):
    raw = json.loads(PUBLISHED.read_text())
    edit(raw)
    with pytest.raises(UnsupportedConfig, match=match):
        family_for(raw).architecture
    raw = json.loads(PUBLISHED.read_text())
    raw["mm_tokens_per_image"] = 36  # 64 // 6 = 10: 6 x 6 tokens (rows 60-63 dropped), as transformers computes
    assert family_for(raw).architecture.model["tokens_per_image"] == 36


# ---- names: the three spellings and strict accounting -------------------------------------------
def _google(names) -> set:
    """The saved names as Google publishes them (``vision_tower.vision_model.*``)."""
    return {n.replace("vision_tower.", "vision_tower.vision_model.", 1) for n in names}


def test_rules_equal_transformers_names_in_every_spelling(zoo_model):
    from transformers import AutoConfig, AutoModelForImageTextToText

    src = zoo_model("gemma3")
    saved = set(HFCheckpoint(src).names())
    with torch.device("meta"):
        module = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(src))
    runtime = set(module.state_dict()) - {"lm_head.weight"}  # tied
    assert "lm_head.weight" not in saved and any(n.startswith("language_model.model.") for n in saved)
    for names, spelling in ((saved, "SAVED"), (runtime, "CURRENT"), (_google(saved), "PUBLISHED")):
        fam = family_for(_raw(src))
        fam.adapt(names)
        from mcore_bridge.families import gemma3_vl

        assert fam.spelling == getattr(gemma3_vl, spelling)
        for layout in (L(), L(tp=2, sp=True), L(pp=2)):
            assert expected_hf_names(inventory(fam, layout)) == names, (spelling, layout.short())


def _copy(src, dest, rename=lambda n: n, drop=(), add=None):
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dest)
    ckpt = HFCheckpoint(dest)
    tensors = {rename(n): ckpt.read(n).clone() for n in ckpt.names() if n not in drop}
    ckpt.close()
    tensors.update(add or {})
    for f in dest.glob("*.safetensors*"):
        f.unlink()
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_vision_weights_are_accounted_strictly(zoo_model, tmp_path):
    from mcore_bridge.bridge import Bridge

    src = zoo_model("gemma3")
    proj = "multi_modal_projector.mm_soft_emb_norm.weight"
    with pytest.raises(MappingError, match=rf"missing 1 tensor\(s\): {proj}"):
        Bridge(_copy(src, tmp_path / "missing", drop={proj}))
    extra = "vision_tower.encoder.layers.3.mlp.fc1.weight"  # the tower has 3 blocks
    with pytest.raises(MappingError, match=rf"unexpected tensor\(s\).*{extra}"):
        Bridge(_copy(src, tmp_path / "extra", add={extra: torch.zeros(64, 32)}))


def test_standard_detection_control_is_not_undone_by_the_post_mlp_norm(zoo_model):
    """Gemma's norm after the MLP cancels a scaled linear_fc2 (measured at ws1: builtin:gemma3 and
    gemma3_text were "caught, not located", gemma3 at 1.2e-5 against the 1e-5 gate); the standard
    control scales linear_fc1 instead."""
    from mcore_bridge.bridge import Bridge
    from verify import detection

    assert detection.standard_controls(Bridge(zoo_model("gemma3"))) == [
        ("scale:decoder.layers.2.mlp.linear_fc1.weight:1.01", 2)]


def test_lora_is_refused(zoo_model):
    from mcore_bridge.bridge import Bridge
    from mcore_bridge.lora import AdapterError, LoraSpec

    with pytest.raises(AdapterError, match="vision-language"):
        Bridge(zoo_model("gemma3")).apply_lora([], LoraSpec(r=4))


# ---- masks ------------------------------------------------------------------------------------
def test_masks_equal_transformers_and_images_see_each_other(zoo_model):
    """Ours against transformers' own ``create_masks_for_vision_model`` (eager: explicit masks), on
    images mid-sequence, at the start, two adjacent blocks and one longer than the window."""
    from transformers import AutoConfig
    from transformers.models.gemma3.modeling_gemma3 import (create_masks_for_vision_model,
                                                            get_block_sequence_ids_for_mask)

    from mcore_bridge.families.gemma3_vl_model import attention_masks

    cfg = AutoConfig.from_pretrained(zoo_model("gemma3")).get_text_config()
    cfg._attn_implementation = "eager"
    seq, window = 48, cfg.sliding_window
    tt = torch.zeros(3, seq, dtype=torch.long)
    tt[0, 5:21] = 1
    tt[0, 30:34] = 1
    tt[1, 0:3] = 1
    tt[2, 10:40] = 1  # 30 image tokens, the window is 20
    pos = torch.arange(seq)[None].expand(3, -1)
    blocks = get_block_sequence_ids_for_mask(tt)
    hf = create_masks_for_vision_model(cfg, torch.zeros(3, seq, 8), None, None, pos, blocks)
    ours = attention_masks(3, seq, window, tt)
    for channel, kind in enumerate(("full_attention", "sliding_attention")):
        assert torch.equal(hf[kind][:, 0] != 0, ours[:, channel]), kind  # eager: 0 where visible
    assert not ours[0, 0, 5, 20] and ours[0, 0, 5, 30]  # first image sees its last token, not the next image
    # sliding layers bound only the past: 25 tokens back is out of the window, 29 ahead in the image is not
    assert ours[2, 1, 35, 10] and not ours[2, 0, 35, 10] and not ours[2, 1, 10, 39]
    assert torch.equal(attention_masks(1, seq, window)[0, 0], ~torch.ones(seq, seq, dtype=torch.bool).tril())


def test_megatron_local_softmax_takes_an_arbitrary_mask_but_not_with_a_window():
    """The measured reason for folding the window into the mask: megatron-core's local attention
    softmax applies a given mask (``AttnMaskType.arbitrary``), but on a window layer it builds its
    own sliding-window mask and drops the given one."""
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import attention_mask_func

    from mcore_bridge.families.gemma3_vl_model import attention_masks
    from mcore_bridge.runtime import compat

    def softmax(window):
        return FusedScaleMaskSoftmax(input_in_fp16=False, input_in_bf16=False, attn_mask_type=AttnMaskType.arbitrary,
                                     scaled_masked_softmax_fusion=False, mask_func=attention_mask_func,
                                     softmax_in_fp32=True, scale=None, window_size=window)

    seq = 12
    tt = torch.zeros(1, seq, dtype=torch.long)
    tt[0, 2:8] = 1  # one image of 6 tokens
    mask = attention_masks(1, seq, 4, tt)[:, 1:]  # sliding: window 4 AND (causal OR same image)
    scores = torch.randn(1, 2, seq, seq, generator=torch.Generator().manual_seed(0))
    with compat.scope("cpu"):
        folded = softmax(None)(scores.clone(), mask)
        windowed = softmax((3, 0))(scores.clone(), mask)
    assert torch.equal(folded == 0, mask.expand_as(folded))  # the given mask, exactly
    assert (windowed[0, :, 2, 3:8] == 0).all() and (folded[0, :, 2, 3:8] > 0).all()  # window: no look ahead


def test_transformers_uses_the_bidirectional_mask(zoo_model):
    """Why it must be expressed: transformers' logits with ``token_type_ids`` (what its processor
    gives) differ from those without (causal) far beyond fp32 noise."""
    from verify.forward import hf_forward, hf_model
    from verify.inputs import multimodal_samples

    src = zoo_model("gemma3")
    sample = multimodal_samples(family_for(_raw(src)), src)[0]
    model = hf_model(src)
    with torch.no_grad():
        bidirectional = hf_forward(model, sample.input_ids[None], None, sample.vision)
        causal = hf_forward(model, sample.input_ids[None], None, {"pixel_values": sample.vision["pixel_values"]})
    loss = sample.labels != -100
    assert (bidirectional - causal)[0][loss].abs().mean() > 1e-2


# ---- multi-process: round trips, verification, negative controls ------------------------------
ROUNDTRIP = [(1, L(), "saved"), (2, L(tp=2, sp=True), "saved"), (2, L(pp=2), "google")]


@pytest.mark.parametrize("world,layout,spelling", [
    pytest.param(w, lay, s, id=f"{lay.short() or 'ws1'}-{s}", marks=pytest.mark.world(w)) for w, lay, s in ROUNDTRIP])
def test_roundtrip_is_byte_exact(world, layout, spelling, pools, zoo_model, tmp_path):
    src = zoo_model("gemma3")
    if spelling == "google":  # as published on the hub: written back in that spelling
        src = _copy(src, tmp_path / "google", rename=lambda n: next(iter(_google([n]))))
    out = tmp_path / "converted"
    results = pools.get(world).run(cases.roundtrip, timeout=300, source=str(src), layout=layout.to_dict(),
                                   out_dir=str(out))
    names = cases.check_roundtrip(results, src, out)
    assert sum(n.startswith(("vision_tower.", "multi_modal_projector.")) for n in names) == 3 * 16 + 7
    assert (spelling == "google") == any(n.startswith("vision_tower.vision_model.") for n in names)
    assert (out / "preprocessor_config.json").exists()


@pytest.fixture(scope="session")
def ref_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("gemma3-reference-cache"))


def _verify(pools, zoo_model, ref_cache, layout, **kw) -> dict:
    out = pools.get(layout.model_parallel_size).run(verify_cases.verify, timeout=300, source=str(zoo_model("gemma3")),
                                                    layout=layout.to_dict(), reference_cache=ref_cache, **kw)
    return [r for r in out if r is not None][0]


@pytest.mark.parametrize("layout", [pytest.param(lay, id=lay.short() or "ws1",
                                                  marks=pytest.mark.world(lay.model_parallel_size))
                                    for lay in (L(), L(tp=2, sp=True), L(pp=2))])
def test_verifies_fp32_with_images(layout, pools, zoo_model, ref_cache):
    r = _verify(pools, zoo_model, ref_cache, layout)
    assert r["verdict"] == "pass", r["failures"]
    assert r["gate"] == "with_loss"
    m = r["metrics"]
    assert m["mean_diff_with_loss"] < 1e-5 and m["max_diff"] < 1e-3 and m["top1_agreement_with_loss"] == 1.0
    assert [i["images"] for i in r["inputs"] if i.get("images")] == [[[32, 32]], [[32, 32], [32, 32]]]
    assert max(i["tokens"] for i in r["inputs"]) > 20  # longer than the window
    probes = [e["probe"] for e in r["layers"]]
    assert probes == [f"vision.block.{i}" for i in range(3)] + ["vision.merger", "embedding"] + \
        [f"layer.{i}" for i in range(4)] + ["final_norm"]


CONTROLS = [  # (id, layout, control, first diverging probe)
    ("projector", L(), "scale:visual.multi_modal_projector.mm_input_projection_weight:1.01", "vision.merger"),
    ("vision-block", L(tp=2, sp=True), "scale:visual.vision_tower.encoder.layers.1.mlp.fc1.weight:1.01",
     "vision.block.1"),
    ("causal-images", L(), "model:bidirectional_images:false", "layer.0"),  # megatron's default: causal
    ("window-off-by-one", L(), "model:sliding_window:21", "layer.0"),
]


@pytest.mark.parametrize("layout,control,where", [
    pytest.param(lay, c, w, id=f"{lay.short() or 'ws1'}-{i}", marks=pytest.mark.world(lay.model_parallel_size))
    for i, lay, c, w in CONTROLS])
def test_negative_control_is_caught_and_located(layout, control, where, pools, zoo_model, ref_cache):
    r = _verify(pools, zoo_model, ref_cache, layout, control=control)
    assert r["verdict"] == "fail", r["metrics"]
    first = r["first_diverging"]
    assert first["probe"] == where, first
    before = r["layers"][: [e["probe"] for e in r["layers"]].index(where)]
    assert all(e["ok"] for e in before)
    if where.startswith("vision."):
        assert control.split(":")[1] in first["mcore_params"]
        assert all(n.startswith(("vision_tower.", "multi_modal_projector.")) for n in first["hf_params"]), first


@pytest.mark.world(2)
def test_megatron_dist_checkpoint_reshards(pools, zoo_model, tmp_path):
    """HF -> torch_dist at tp2+sp -> read at pp2 -> HF, byte-exact: the Gemma norms (``OffsetRMSNorm``,
    replicated over TP) and the vision tower go through megatron's dist_checkpointing."""
    src = zoo_model("gemma3")
    pools.get(2).run(cases.mcore_save, timeout=300, source=str(src), layout=L(tp=2, sp=True).to_dict(),
                     out_dir=str(tmp_path / "dist"))
    pools.get(2).run(cases.mcore_to_hf, timeout=300, ckpt=str(tmp_path / "dist"), layout=L(pp=2).to_dict(),
                     out_dir=str(tmp_path / "hf"), hf_dir=None)
    a, b = HFCheckpoint(src), HFCheckpoint(tmp_path / "hf")
    assert sorted(a.names()) == sorted(b.names())
    assert all(cases.same_bytes(a.read(n), b.read(n)) for n in a.names())
