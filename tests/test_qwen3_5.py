"""Qwen3.5 (``qwen3_5``, ``qwen3_5_moe``): hybrid gated delta-net / gated attention language model
with a vision tower (Qwen3-VL's, without deepstack). Settings and refusals; the weight layout
against transformers' own modules (Qwen3.5 stores the delta-net projections unfused); byte-exact
round trips (ws1, tp2+sp, ep2); fp32 verification with images gated on the loss tokens; negative
controls (a perturbed vision tensor and a perturbed delta-net tensor, each located)."""

from __future__ import annotations

import json

import pytest
import torch

from mcore_bridge import ParallelLayout as L
from mcore_bridge import transforms as T
from mcore_bridge.errors import UnsupportedConfig
from mcore_bridge.families import family_for
from mcore_bridge.layout import ParallelLayout
from mcore_bridge.plan import expected_hf_names, inventory
from tests import cases, verify_cases
from tests.matrix import case_id


def _config(name: str) -> dict:
    from transformers import AutoConfig

    from mcore_bridge.zoo import ZOO

    return AutoConfig.for_model(**ZOO[name]).to_dict()


def _saved_names(path) -> set[str]:
    from safetensors import safe_open

    names = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            names |= set(h.keys())
    return names


# ---- config mapping ---------------------------------------------------------------------------
def test_settings_carry_hybrid_layers_gate_rope_and_vision():
    fam = family_for(_config("qwen3_5"))
    c, m = fam.architecture.config, fam.architecture.model
    assert type(fam).__name__ == "Qwen35" and fam.hf_prefix == "model.language_model."
    assert c["attention_output_gate"] is True and c["qk_layernorm"] is True and c["kv_channels"] == 32
    assert c["experimental_attention_variant"] == "gated_delta_net"
    assert c["linear_attention_freq"] == [1, 0, 1, 0]  # layer_types: linear, full, linear, full
    assert (c["linear_key_head_dim"], c["linear_value_head_dim"], c["linear_num_key_heads"],
            c["linear_num_value_heads"], c["linear_conv_kernel_dim"]) == (16, 16, 2, 4, 4)
    assert c["mrope_section"] == [2, 1, 1] and m["rotary_percent"] == 0.25 and m["position_embedding_type"] == "mrope"
    assert m["rotary_base"] == 1e7
    v = m["vision"]
    assert v.deepstack_layers == 0 and v.mrope_interleaved and v.vision_class.endswith("Qwen3_5VisionModel")
    assert [fam.layer_mixer(i) for i in range(4)] == ["linear", "attention"] * 2


def test_moe_settings_shared_gate_renormalised_topk_every_layer():
    fam = family_for(_config("qwen3_5_moe"))
    c = fam.architecture.config
    assert c["num_moe_experts"] == 8 and c["moe_router_topk"] == 2 and c["moe_ffn_hidden_size"] == 48
    assert c["moe_shared_expert_intermediate_size"] == 64 and c["moe_shared_expert_gate"] is True
    assert c["moe_router_pre_softmax"] is False  # top-k renormalised (Qwen3_5MoeTopKRouter, always)
    assert c["moe_layer_freq"] == [1, 1, 1, 1] and c["attention_output_gate"] is True


def test_transformers_defaults_where_the_config_is_silent():
    """No layer_types: every 4th layer is full attention (full_attention_interval); no
    partial_rotary_factor: 0.25 -- as transformers' Qwen3_5TextConfig fills them in."""
    from transformers import AutoConfig

    raw = _config("qwen3_5")
    text = {k: v for k, v in raw["text_config"].items() if k != "layer_types"}
    text["num_hidden_layers"] = 8
    text["rope_parameters"] = {k: v for k, v in text["rope_parameters"].items() if k != "partial_rotary_factor"}
    raw = {**raw, "text_config": text}
    fam = family_for(raw)
    hf = AutoConfig.for_model(**raw).text_config
    assert fam.linear() == [t == "linear_attention" for t in hf.layer_types] == [True, True, True, False] * 2
    assert fam.architecture.model["rotary_percent"] == hf.rope_parameters["partial_rotary_factor"] == 0.25


@pytest.mark.parametrize("change,field", [
    ({"layer_types": ["linear_attention", "sliding_attention", "linear_attention", "full_attention"]}, "layer_types"),
    ({"layer_types": ["full_attention"] * 3}, "layer_types"),
    ({"attn_output_gate": False}, "attn_output_gate"),
    ({"linear_num_value_heads": 3}, "linear_num_value_heads"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_refusals_name_the_field(change, field):
    raw = _config("qwen3_5")
    raw = {**raw, "text_config": {**raw["text_config"], **change}}
    with pytest.raises(UnsupportedConfig, match=field):
        family_for(raw).architecture


@pytest.mark.parametrize("rope,field", [
    ({"mrope_section": [2, 2, 1]}, "mrope_section"),  # sums to 5, rotary dim 8 needs 4
    ({"partial_rotary_factor": 0.5}, "mrope_section"),  # rotary dim 16: the section no longer fits
    ({"mrope_interleaved": False}, "mrope_interleaved"),
])
def test_rope_refusals(rope, field):
    raw = _config("qwen3_5")
    text = raw["text_config"]
    raw = {**raw, "text_config": {**text, "rope_parameters": {**text["rope_parameters"], **rope}}}
    with pytest.raises(UnsupportedConfig, match=field):
        family_for(raw).architecture


def test_attention_only_config_has_no_delta_net():
    raw = _config("qwen3_5")
    raw = {**raw, "text_config": {**raw["text_config"], "layer_types": ["full_attention"] * 4}}
    fam = family_for(raw)
    assert "experimental_attention_variant" not in fam.architecture.config
    assert not any(".linear_attn." in n for r in fam.rules() for n in r.hf)


def test_layout_and_lora_refusals():
    from mcore_bridge.errors import AdapterError

    fam = family_for(_config("qwen3_5"))
    with pytest.raises(UnsupportedConfig, match="cp=2"):
        fam.check_layout(ParallelLayout(cp=2))
    with pytest.raises(UnsupportedConfig, match="linear_num_key_heads=2"):  # 2 key heads over tp=4
        fam.check_layout(ParallelLayout(tp=4, sp=True))
    fam.check_layout(ParallelLayout(pp=4))  # no deepstack: the first stage need hold no language layer but its own
    with pytest.raises(AdapterError, match="vision-language"):
        fam.check_lora()


def test_main_model_without_mtp_tensors_converts_alone():
    """The published configs declare one MTP layer (mtp_num_hidden_layers); a checkpoint without any
    mtp.* tensor is the main model alone (the MTP layer itself: tests/test_qwen3_5_mtp.py)."""
    fam = family_for(_config("qwen3_5_moe"))
    fam.adapt({"model.language_model.embed_tokens.weight", "model.language_model.norm.weight"})
    assert fam.mtp_layers == 0 and "mtp_num_layers" not in fam.architecture.config


# ---- weights ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_5_moe"])
def test_rules_match_transformers_checkpoint(name, zoo_model):
    """Every tensor transformers saves (stacked experts included) is claimed, nothing more, in
    every layout; the vision tower has no deepstack merger."""
    path = zoo_model(name)
    saved = _saved_names(path)
    fam = family_for(json.loads((path / "config.json").read_text()))
    fam.adapt(saved)
    assert not any("deepstack" in n for n in saved) and any(n.startswith("model.visual.merger.") for n in saved)
    layouts = [ParallelLayout(), ParallelLayout(tp=2), ParallelLayout(pp=2)]
    layouts += [ParallelLayout(ep=2), ParallelLayout(tp=2, sp=True, ep=2, etp=1)] if "moe" in name else []
    for layout in layouts:
        assert expected_hf_names(inventory(fam, layout)) == saved, layout.short()
    assert {n.split(".linear_attn.")[1] for n in saved if ".layers.0.linear_attn." in n} == {
        "in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight", "in_proj_a.weight", "conv1d.weight",
        "A_log", "dt_bias", "norm.weight", "out_proj.weight"}


def _hf_delta_net():
    from transformers import AutoConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    from mcore_bridge.zoo import ZOO

    cfg = AutoConfig.for_model(**ZOO["qwen3_5"]).text_config
    torch.manual_seed(0)
    net = Qwen3_5GatedDeltaNet(cfg, 0)
    for p in net.parameters():
        torch.nn.init.normal_(p)
    return cfg, net


@pytest.mark.parametrize("tp", [1, 2])
def test_delta_net_in_proj_shards_hold_megatrons_layout(tp):
    """megatron's GatedDeltaNet splits its ``in_proj`` output as [q, k, v, z, b, a] per rank
    (q/k/v through the depthwise conv1d, [q; k; v] channels); each rank's shard built from
    transformers' module computes exactly that rank's heads of transformers' projections."""
    cfg, net = _hf_delta_net()
    fam = family_for(_config("qwen3_5"))
    rules = {r.mcore.split(".", 3)[-1]: r for r in fam.rules() if r.mixer == "linear"}
    sd = net.state_dict()
    hf = lambda r: [sd[n.split("linear_attn.")[1]] for n in r.hf]  # noqa: E731
    x = torch.randn(5, cfg.hidden_size)
    net.requires_grad_(False)
    qk, v, nv = 2 * 16, 4 * 16, 4
    for rank in range(tp):
        in_proj = rules["self_attention.in_proj.weight"]
        tensors = hf(in_proj)
        shard = in_proj.transform.split(tensors, in_proj.transform.local_shape([t.shape for t in tensors], tp), tp, rank)
        q, k, vv, z, b, a = torch.split(x @ shard.T, [qk // tp, qk // tp, v // tp, v // tp, nv // tp, nv // tp], -1)
        qkv_full = net.in_proj_qkv(x)
        for got, full in ((q, qkv_full[:, :qk]), (k, qkv_full[:, qk:2 * qk]), (vv, qkv_full[:, 2 * qk:]),
                          (z, net.in_proj_z(x)), (b, net.in_proj_b(x)), (a, net.in_proj_a(x))):
            n = full.shape[-1] // tp
            torch.testing.assert_close(got, full[:, rank * n:(rank + 1) * n], rtol=1e-6, atol=1e-5)  # matmul blocking
        conv = rules["self_attention.conv1d.weight"]
        cshard = conv.transform.split(hf(conv), conv.transform.local_shape([sd["conv1d.weight"].shape], tp), tp, rank)
        cq, ck, cv = torch.split(cshard, [qk // tp, qk // tp, v // tp])
        w = sd["conv1d.weight"]
        assert torch.equal(cq, w[rank * qk // tp:(rank + 1) * qk // tp])
        assert torch.equal(cv, w[2 * qk + rank * v // tp:2 * qk + (rank + 1) * v // tp])
        assert torch.equal(ck, w[qk + rank * qk // tp:qk + (rank + 1) * qk // tp])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_split_in_proj_blocks_round_trip_byte_exact(tp):
    """Shards of every rank rebuild the HF tensors bit for bit (export); the in-place assembly
    (load) equals the reference split."""
    g = torch.Generator().manual_seed(1)
    blocks = T.FusedBlocks(((8, 8, 16), (16,), (4,), (4,)))
    hf2 = [torch.randn(32, 7, generator=g), torch.randn(16, 7, generator=g), torch.randn(4, 7, generator=g),
           torch.randn(4, 7, generator=g)]
    for t, tensors in ((blocks, hf2),):
        shapes = [x.shape for x in tensors]
        local = t.local_shape(shapes, tp)
        shards = [t.split(tensors, local, tp, r) for r in range(tp)]
        into = torch.empty(local)
        regions = t.slices(shapes, local, tp, tp - 1)
        t.to_mcore_into([tensors[i][r] for i, r in zip(t.region_sources(len(regions)), regions)], into, tp, tp - 1)
        assert torch.equal(into, shards[-1])
        for got, want in zip(t.to_hf(shards, shapes), tensors):
            assert torch.equal(got, want)
    # negative control: a shard of the wrong rank does not rebuild the tensors
    shards = [blocks.split(hf2, blocks.local_shape([x.shape for x in hf2], 2), 2, r) for r in (1, 0)]
    assert not torch.equal(blocks.to_hf(shards, [x.shape for x in hf2])[0], hf2[0])


# ---- through megatron-core (the delta-net on CPU: runtime/compat.py) ---------------------------------
RT = [("qwen3_5", 1, L()), ("qwen3_5", 2, L(tp=2, sp=True)), ("qwen3_5_moe", 2, L(ep=2))]


@pytest.mark.parametrize("model,world,layout", [pytest.param(m, w, lay, id=case_id(m, w, lay),
                                                              marks=pytest.mark.world(w)) for m, w, lay in RT])
def test_roundtrip_is_byte_exact(model, world, layout, pools, zoo_model, tmp_path):
    src = zoo_model(model)
    out = tmp_path / "converted"
    results = pools.get(world).run(cases.roundtrip, timeout=300, source=str(src), layout=layout.to_dict(),
                                   out_dir=str(out))
    expected = cases.check_roundtrip(results, src, out)
    assert sum(".visual." in f".{n}" for n in expected) > 20 and sum(".linear_attn." in n for n in expected) == 18
    if model == "qwen3_5_moe":
        # transformers 5 saves the experts it stacks in memory one tensor per expert (its conversion mapping)
        assert "model.language_model.layers.0.mlp.experts.7.gate_proj.weight" in expected


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("q35-reference-cache"))


def _verify(pools, zoo_model, ref_cache, model, world, layout, **kw) -> dict:
    out = pools.get(world).run(verify_cases.verify, timeout=300, source=str(zoo_model(model)),
                               layout=layout.to_dict(), reference_cache=ref_cache, **kw)
    reports = [r for r in out if r is not None]
    assert len(reports) == 1
    return reports[0]


D = "decoder.layers"
VERIFY = [  # (model, world, layout, [(control, first diverging probe)])
    ("qwen3_5", 2, L(tp=2, sp=True), [("scale:visual.blocks.1.attn.qkv.weight:1.01", "vision.block.1"),
                                      (f"scale:{D}.2.self_attention.in_proj.weight:1.01", "layer.2"),
                                      ("mrope_contiguous", "layer.1")]),  # layer 0 is a delta-net: no RoPE
    ("qwen3_5_moe", 2, L(ep=2), [(f"scale:{D}.0.self_attention.conv1d.weight:1.05", "layer.0")]),
]


@pytest.mark.parametrize("model,world,layout,controls", [
    pytest.param(m, w, lay, c, id=case_id(m, w, lay), marks=pytest.mark.world(w)) for m, w, lay, c in VERIFY])
def test_verification_passes_fp32_with_images_and_controls_are_located(model, world, layout, controls, pools,
                                                                       zoo_model, ref_cache):
    r = _verify(pools, zoo_model, ref_cache, model, world, layout, detection=model == "qwen3_5_moe")
    assert r["verdict"] == "pass", r["failures"]
    if model == "qwen3_5_moe":  # verify's standard positive controls: a delta-net out_proj, two experts swapped
        assert r["detection"]["caught"] and r["detection"]["located"], r["detection"]
        assert {c["control"].split(":")[0] for c in r["detection"]["controls"]} == {"scale", "swap_experts"}
    m = r["metrics"]
    assert r["gate"] == "with_loss"
    assert m["mean_diff_with_loss"] < 1e-5 and m["max_diff"] < 1e-3 and m["top1_agreement_with_loss"] == 1.0
    assert len([i for i in r["inputs"] if i.get("images")]) == 2
    probes = [entry["probe"] for entry in r["layers"]]
    assert "vision.merger" in probes and not any(p.startswith("vision.deepstack") for p in probes)
    assert probes[-6:] == ["embedding"] + [f"layer.{i}" for i in range(4)] + ["final_norm"]
    if model == "qwen3_5_moe":
        assert m["router_agreement"] >= 0.99
    for control, where in controls:
        bad = _verify(pools, zoo_model, ref_cache, model, world, layout, control=control)
        assert bad["verdict"] == "fail", (control, bad["metrics"])
        first = bad["first_diverging"]
        assert first["probe"] == where, (control, first)
        if control.startswith("scale:"):
            assert control.split(":")[1] in first["mcore_params"], first


def test_stacked_expert_storage_is_read_as_the_per_expert_one(zoo_model, tmp_path):
    """transformers 5 saves Qwen3.5-MoE experts one tensor per expert; a checkpoint holding its
    in-memory stacks (``experts.gate_up_proj [E, 2F, H]``, gate rows first) reads the same tensors."""
    import shutil

    from safetensors.torch import load_file, save_file

    from mcore_bridge.bridge import Bridge
    from mcore_bridge.hf_io import HFCheckpoint

    src = zoo_model("qwen3_5_moe")
    dest = tmp_path / "stacked"
    shutil.copytree(src, dest)
    for f in dest.glob("*.safetensors"):
        state = load_file(str(f))
        for layer in range(4):
            p = f"model.language_model.layers.{layer}.mlp.experts."
            if f"{p}0.gate_proj.weight" not in state:
                continue
            gate_up = [torch.cat([state.pop(f"{p}{e}.gate_proj.weight"), state.pop(f"{p}{e}.up_proj.weight")])
                       for e in range(8)]
            state[p + "gate_up_proj"] = torch.stack(gate_up)
            state[p + "down_proj"] = torch.stack([state.pop(f"{p}{e}.down_proj.weight") for e in range(8)])
        save_file(state, str(f), metadata={"format": "pt"})
    (dest / "model.safetensors.index.json").unlink(missing_ok=True)
    per_expert, stacked = Bridge(src), Bridge(dest)
    assert per_expert.expert_storage is None and stacked.expert_storage == "out_in"
    a, b = HFCheckpoint(src), stacked.reader.hf
    assert sorted(b.names()) == sorted(a.names())
    for name in ("model.language_model.layers.3.mlp.experts.5.up_proj.weight",
                 "model.language_model.layers.0.mlp.experts.7.gate_proj.weight",
                 "model.language_model.layers.2.mlp.experts.1.down_proj.weight"):
        assert torch.equal(a.read(name), b.read(name)), name
    assert not torch.equal(a.read("model.language_model.layers.0.mlp.experts.7.gate_proj.weight"),
                           b.read("model.language_model.layers.0.mlp.experts.7.up_proj.weight"))  # control


def test_standard_detection_controls_exist_on_a_delta_net_layer():
    """verify's positive controls pick the middle layer (2, a delta-net layer here, MoE: no dense
    fc2, no attention linear_proj): its out_proj, and two experts to swap."""
    from mcore_bridge.bridge import Bridge
    from verify import detection

    assert detection.standard_controls(Bridge("builtin:qwen3_5_moe")) == [
        ("scale:decoder.layers.2.self_attention.out_proj.weight:1.01", 2), ("swap_experts:2:0:1", 2)]
    assert detection.standard_controls(Bridge("builtin:qwen3_5")) == [
        ("scale:decoder.layers.2.mlp.linear_fc2.weight:1.01", 2)]
