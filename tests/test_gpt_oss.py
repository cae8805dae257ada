"""gpt-oss without a process group: the published configs (openai/gpt-oss-20b, -120b, verbatim
under tests/published/) mapped to the megatron settings each feature needs, refusals, and the
semantics of each mapping measured against transformers' own code: yarn frequencies (HF's
``truncate: false``), the sliding-window mask, the clamped SwiGLU, and the interleaved stacked
experts read per expert (and written back) through ``stacked``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mcore_bridge import stacked
from mcore_bridge.families import UnsupportedConfig, family_for
from mcore_bridge.hf_io import HFCheckpoint
from mcore_bridge.layout import ParallelLayout
from mcore_bridge.plan import expected_hf_names, inventory

transformers = pytest.importorskip("transformers")

PUBLISHED = Path(__file__).parent / "published"
FLAGSHIPS = {"openai__gpt-oss-20b.json": (24, 32), "openai__gpt-oss-120b.json": (36, 128)}


def published(name: str) -> dict:
    return json.loads((PUBLISHED / name).read_text())


@pytest.mark.parametrize("name", list(FLAGSHIPS))
def test_published_config_maps_to_megatron_settings(name):
    layers, experts = FLAGSHIPS[name]
    raw = published(name)
    fam = family_for(raw)
    assert fam.name == "gpt_oss"
    c, m = fam.architecture.config, fam.architecture.model
    assert (c["num_layers"], c["hidden_size"], c["num_attention_heads"], c["num_query_groups"], c["kv_channels"]) == \
        (layers, 2880, 64, 8, 64)
    assert c["layernorm_epsilon"] == 1e-5 and c["normalization"] == "RMSNorm"
    # sinks, biases
    assert c["softmax_type"] == "learnable" and c["add_bias_linear"] and c["add_qkv_bias"]
    # sliding layers as HF's layer_types says: the even ones, a window of 128 tokens incl. the query
    assert c["window_size"] == (127, 0)
    assert c["window_attn_skip_freq"] == [1 if k == "sliding_attention" else 0 for k in raw["layer_types"]]
    assert c["window_attn_skip_freq"][:4] == [1, 0, 1, 0]
    # clamped SwiGLU
    from megatron.core.activations import quick_gelu

    assert c["gated_linear_unit"] and c["activation_func"] is quick_gelu
    assert c["activation_func_clamp_value"] == 7.0 and c["glu_linear_offset"] == 1.0
    # router and experts
    assert (c["num_moe_experts"], c["moe_router_topk"], c["moe_ffn_hidden_size"]) == (experts, 4, 2880)
    assert c["moe_router_score_function"] == "softmax" and c["moe_router_pre_softmax"] is False
    assert c["moe_layer_freq"] == [1] * layers
    # yarn, truncate false
    assert m["position_embedding_type"] == "yarn" and m["rotary_base"] == 150000.0
    assert (c["yarn_rotary_scaling_factor"], c["yarn_original_max_position_embeddings"]) == (32.0, 4096)
    assert (c["yarn_beta_fast"], c["yarn_beta_slow"]) == (32.0, 1.0)
    assert c["yarn_correction_range_round_to_int"] is False
    assert c["yarn_mscale"] is None and c["yarn_mscale_all_dim"] is None
    assert m["vocab_size"] == 201088 and m["share_embeddings_and_output_weights"] is False
    # transformers reads the same file the same way
    hf = transformers.GptOssConfig.from_dict({k: v for k, v in raw.items() if k != "quantization_config"})
    assert [1 if k == "sliding_attention" else 0 for k in hf.layer_types] == c["window_attn_skip_freq"]


@pytest.mark.parametrize("name", list(FLAGSHIPS))
def test_published_config_builds_a_megatron_config(name):
    from mcore_bridge.families.gpt_oss_megatron import YarnTransformerConfig
    from mcore_bridge.model import transformer_config

    fam = family_for(published(name))
    layout = ParallelLayout(tp=8, sp=True, ep=8, etp=1)
    layout.validate(**fam.layout_dims())
    config = transformer_config(fam, layout, torch.bfloat16, "cpu")
    assert isinstance(config, YarnTransformerConfig)
    assert config.softmax_type == "learnable" and config.window_size == (127, 0)
    assert config.yarn_rotary_scaling_factor == 32.0 and config.yarn_correction_range_round_to_int is False


def test_rules_name_every_tensor_transformers_saves(zoo_model):
    """The per-expert rule names are exactly the stacked checkpoint seen through its view, at any
    layout, and the view's stacks are exactly what transformers saved."""
    path = zoo_model("gpt_oss")
    ckpt = HFCheckpoint(path)
    fam = family_for(ckpt.config)
    view, orientation = stacked.open_checkpoint(ckpt, fam)
    assert orientation == stacked.IN_OUT
    assert {n for n in ckpt.tensors if "experts" in n} == {
        f"model.layers.{i}.mlp.experts.{s}" for i in range(4)
        for s in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")}
    for layout in (ParallelLayout(), ParallelLayout(tp=2, sp=True), ParallelLayout(ep=2), ParallelLayout(pp=2)):
        assert expected_hf_names(inventory(fam, layout)) == set(view.tensors), layout.short()
    assert "model.layers.0.self_attn.sinks" in view.tensors and "model.layers.3.mlp.router.bias" in view.tensors


def test_interleaved_stack_reads_gate_at_even_and_up_at_odd_positions(zoo_model):
    ckpt = HFCheckpoint(zoo_model("gpt_oss"))
    fam = family_for(ckpt.config)
    view, _ = stacked.open_checkpoint(ckpt, fam)
    p = "model.layers.1.mlp.experts."
    gate_up, bias = ckpt.read(p + "gate_up_proj"), ckpt.read(p + "gate_up_proj_bias")  # [E, H, 2F], [E, 2F]
    down, down_bias = ckpt.read(p + "down_proj"), ckpt.read(p + "down_proj_bias")  # [E, F, H], [E, H]
    for e in (0, 5):
        assert torch.equal(view.read(p + f"{e}.gate_proj.weight"), gate_up[e][:, 0::2].t())
        assert torch.equal(view.read(p + f"{e}.up_proj.weight"), gate_up[e][:, 1::2].t())
        assert torch.equal(view.read(p + f"{e}.gate_proj.bias"), bias[e][0::2])
        assert torch.equal(view.read(p + f"{e}.up_proj.bias"), bias[e][1::2])
        assert torch.equal(view.read(p + f"{e}.down_proj.weight"), down[e].t())
        assert torch.equal(view.read(p + f"{e}.down_proj.bias"), down_bias[e])
        # an expert-TP slice (rows 8:16 of F = 32) reads a 15-wide span of the 2F axis, nothing else
        region = (slice(8, 16), slice(None))
        assert torch.equal(view.read(p + f"{e}.up_proj.weight", region), gate_up[e][:, 1::2].t()[8:16])
        v = view.views[p + f"{e}.up_proj.weight"]
        assert v.stacked_region(region) == (slice(e, e + 1), slice(0, 64), slice(17, 32))
        assert torch.equal(view.read(p + f"{e}.gate_proj.bias", (slice(8, 16),)), bias[e][0::2][8:16])
    # control: read as [gate; up] halves, the same bytes give other tensors
    fam_c = type(fam)(dict(ckpt.config))
    fam_c.stacked_gate_up = stacked.CONCATENATED
    concatenated = stacked.view_table(fam_c, stacked.IN_OUT)
    wrong = concatenated[p + "0.gate_proj.weight"].from_stacked(gate_up[0:1])
    assert not torch.equal(wrong, gate_up[0][:, 0::2].t())


def test_interleaved_experts_restack_byte_exact(zoo_model):
    ckpt = HFCheckpoint(zoo_model("gpt_oss"))
    fam = family_for(ckpt.config)
    view, orientation = stacked.open_checkpoint(ckpt, fam)
    views, shapes = stacked.view_table(fam, orientation), stacked.stacked_shapes(fam, orientation)
    per_expert = [(n, view.read(n).clone()) for n in views]
    out = dict(stacked.restack(iter(per_expert[::-1]), views, shapes))  # any arrival order
    assert set(out) == set(shapes)
    for name, tensor in out.items():
        assert torch.equal(tensor, ckpt.read(name)), name


def _published_hf_config(**rope):
    raw = published("openai__gpt-oss-20b.json")
    raw = {k: v for k, v in raw.items() if k != "quantization_config"}
    raw["rope_scaling"] = {**raw["rope_scaling"], **rope}
    return raw


@pytest.mark.parametrize("truncate", [False, True])
def test_megatron_yarn_equals_transformers_yarn(truncate):
    """megatron's YarnRotaryEmbedding built from our settings gives HF's inverse frequencies and
    attention factor, with HF's ``truncate`` both ways; the flag matters (control)."""
    from megatron.core.models.common.embeddings import YarnRotaryEmbedding
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mcore_bridge.runtime import compat

    raw = _published_hf_config(truncate=truncate)
    hf_cfg = transformers.GptOssConfig.from_dict(raw)
    hf_inv, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    fam = family_for(raw)
    c, m = fam.architecture.config, fam.architecture.model

    def megatron_freqs(round_to_int):
        with compat.scope("cpu"):
            rope = YarnRotaryEmbedding(
                kv_channels=c["kv_channels"], rotary_base=m["rotary_base"], use_cpu_initialization=True,
                scaling_factor=c["yarn_rotary_scaling_factor"],
                original_max_position_embeddings=c["yarn_original_max_position_embeddings"],
                beta_fast=c["yarn_beta_fast"], beta_slow=c["yarn_beta_slow"], mscale=c["yarn_mscale"],
                mscale_all_dim=c["yarn_mscale_all_dim"], correction_range_round_to_int=round_to_int)
            emb, mscale = rope.get_emb(2)
        return emb[1, 0, 0, : c["kv_channels"] // 2], mscale  # position 1: the inverse frequencies

    inv, mscale = megatron_freqs(c["yarn_correction_range_round_to_int"])
    assert torch.equal(inv, hf_inv), (inv - hf_inv).abs().max()
    assert mscale == hf_factor == pytest.approx(0.1 * math.log(32) + 1)
    wrong, _ = megatron_freqs(not c["yarn_correction_range_round_to_int"])
    assert (wrong - hf_inv).abs().max() > 1e-4


def test_sliding_window_mask_equals_transformers():
    """A query sees itself and the W - 1 keys before it, as HF's sliding mask; (W, 0) does not."""
    from megatron.core.transformer.utils import get_sliding_window_causal_mask
    from transformers.masking_utils import causal_mask_function, sliding_window_overlay, and_masks

    from mcore_bridge.runtime import compat

    W, S = 4, 12
    fam = family_for(_published_hf_config() | {"sliding_window": W})
    window = fam.architecture.config["window_size"]
    hf_fn = and_masks(causal_mask_function, sliding_window_overlay(W))
    t = torch.tensor
    hf_visible = torch.tensor([[bool(hf_fn(t(0), t(0), t(q), t(k))) for k in range(S)] for q in range(S)])
    with compat.scope("cpu"):
        masked = get_sliding_window_causal_mask(S, S, window)  # True = masked
        wrong = get_sliding_window_causal_mask(S, S, (W, 0))
    assert torch.equal(~masked.cpu(), hf_visible)
    assert hf_visible[S - 1].sum() == W
    assert not torch.equal(~wrong.cpu(), hf_visible)


def test_clamped_glu_equals_transformers_experts():
    """megatron's GLU as configured (quick_gelu, clamp, +1) equals GptOssExperts._apply_gate on
    [gate; up] de-interleaved, beyond the limit both ways; without the clamp it does not."""
    from megatron.core.activations import quick_gelu
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    c = family_for(published("openai__gpt-oss-20b.json")).architecture.config
    gate_up = torch.randn(64, 2 * 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    want = GptOssExperts(transformers.GptOssConfig(intermediate_size=48, hidden_size=16,
                                                   num_local_experts=2))._apply_gate(gate_up)
    fc1 = torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=-1)  # megatron's [gate; up] order

    def megatron_glu(x, clamp):  # the body of megatron.core.transformer.mlp.MLP.forward's glu()
        x_glu, x_linear = torch.chunk(x, 2, dim=-1)
        if clamp is not None:
            x_glu = x_glu.clamp(min=None, max=clamp)
            x_linear = x_linear.clamp(min=-clamp, max=clamp)
        return c["activation_func"](x_glu) * (x_linear + c["glu_linear_offset"])

    assert c["activation_func"] is quick_gelu
    assert torch.equal(megatron_glu(fc1, c["activation_func_clamp_value"]), want)
    assert not torch.allclose(megatron_glu(fc1, None), want)


def test_megatron_glu_is_what_the_test_restates():
    """The restated GLU above is megatron's (guards against a megatron-core change)."""
    import inspect

    from megatron.core.transformer import mlp

    src = inspect.getsource(mlp.MLP.forward)
    for line in ("x_glu, x_linear = torch.chunk(x, 2, dim=-1)", "x_glu = x_glu.clamp(min=None, max=val)",
                 "x_linear = x_linear.clamp(min=-val, max=val)", "x_linear + self.config.glu_linear_offset"):
        assert line in src, line


def hf_raw(**kw):
    raw = _published_hf_config()
    raw.update(kw)
    return raw


@pytest.mark.parametrize("change,message", [
    (dict(swiglu_alpha=1.5), "swiglu_alpha=1.5"),
    (dict(attention_bias=False), "attention_bias=false"),
    (dict(layer_types=["sliding_attention", "chunked_attention"] * 12), r"layer_types\[1\]='chunked_attention'"),
    (dict(layer_types=["full_attention"] * 3), "layer_types has 3 entries"),
    (dict(sliding_window=None), "sliding_window is unset"),
    (dict(swiglu_limit=None), "swiglu_limit"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 32.0, "attention_factor": 1.0,
                        "original_max_position_embeddings": 4096}), "attention_factor=1.0"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 32.0, "partial_rotary_factor": 0.5,
                        "original_max_position_embeddings": 4096}), "partial_rotary_factor=0.5"),
])
def test_refuses_what_megatron_cannot_express(change, message):
    with pytest.raises(UnsupportedConfig, match=message):
        family_for(hf_raw(**change)).model_settings()


def test_full_attention_only_needs_no_window():
    c = family_for(hf_raw(layer_types=["full_attention"] * 24)).model_settings()["config"]
    assert "window_size" not in c and "window_attn_skip_freq" not in c
    assert c["softmax_type"] == "learnable"


@pytest.mark.parametrize("layout,message", [
    (ParallelLayout(tp=2, sp=True), r"etp=2 \(etp defaults to tp\): use --etp 1"),
    (ParallelLayout(ep=2, etp=2), "etp=2: use --etp 1"),
])
def test_expert_tp_is_refused_with_the_reason(layout, message):
    from mcore_bridge.layout import LayoutError

    fam = family_for(published("openai__gpt-oss-20b.json"))
    with pytest.raises(LayoutError, match="Bias in Moe is only supported when ETP==1") as e:
        fam.check_layout(layout)
    assert e.match(message)
    fam.check_layout(ParallelLayout(tp=2, sp=True, ep=2, etp=1))  # etp 1: accepted


def test_megatron_really_refuses_expert_biases_at_etp2():
    """The refusal above is megatron-core's own limit, measured: its config rejects the same."""
    from mcore_bridge.model import transformer_config

    fam = family_for(published("openai__gpt-oss-20b.json"))
    with pytest.raises(AssertionError, match="Bias in Moe is only supported when ETP==1"):
        transformer_config(fam, ParallelLayout(tp=2, sp=True), torch.float32, "cpu")


def test_grouped_experts_are_refused_for_biased_experts():
    from mcore_bridge.errors import UsageError
    from mcore_bridge.model import _check_grouped_experts

    fam = family_for(published("openai__gpt-oss-20b.json"))
    with pytest.raises(UsageError, match="gpt_oss's experts have biases.*GroupedMLP asserts add_bias_linear=False"):
        _check_grouped_experts(fam, True)
    _check_grouped_experts(fam, False)


def test_declares_its_classes_and_spec():
    """YarnTransformerConfig (TransformerConfig with the yarn_* fields declared), GPTModel, and
    megatron's decoder block spec with every layer MoE."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from mcore_bridge.model import transformer_config

    fam = family_for(hf_raw(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2))
    arch = fam.architecture
    assert arch.config_class().__name__ == "YarnTransformerConfig" and arch.model_class().__name__ == "GPTModel"
    assert issubclass(arch.config_class(), TransformerConfig)
    config = transformer_config(fam, ParallelLayout(), torch.float32, "cpu")
    spec = arch.layer_spec(config, None, 0)
    assert isinstance(spec, TransformerBlockSubmodules) and len(spec.layer_specs) == 4
    assert all("experts" in str(s.submodules.mlp) for s in spec.layer_specs)
    # without the subclass, megatron's GPTModel(position_embedding_type="yarn") has no fields to read
    assert not hasattr(TransformerConfig, "yarn_rotary_scaling_factor")


def test_out_in_stacks_read_the_same_experts(zoo_model, tmp_path):
    """The same experts stored [E, 2F, H] / [E, H, F] (nn.Linear orientation, as the dequantised
    MXFP4 blocks come): detected as such, and every per-expert view equals the [E, H, 2F] one."""
    import shutil

    from safetensors.torch import save_file

    src = zoo_model("gpt_oss")
    ckpt = HFCheckpoint(src)
    tensors = {n: ckpt.read(n).clone() for n in ckpt.tensors}
    for n in list(tensors):
        if n.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[n] = tensors[n].transpose(1, 2).contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(src / "config.json", tmp_path / "config.json")
    fam = family_for(ckpt.config)
    a, a_kind = stacked.open_checkpoint(ckpt, fam)
    b, b_kind = stacked.open_checkpoint(HFCheckpoint(tmp_path), fam)
    assert (a_kind, b_kind) == (stacked.IN_OUT, stacked.OUT_IN)
    assert set(a.tensors) == set(b.tensors)
    for name in a.views:
        assert torch.equal(a.read(name), b.read(name)), name
        region = (slice(4, 12),) + ((slice(None),) if len(a.views[name].shape) == 2 else ())
        assert torch.equal(a.read(name, region), b.read(name, region)), name


def test_verify_matrix_skips_expert_tp_with_the_reason():
    from verify.matrix import expand

    fam = family_for(published("openai__gpt-oss-20b.json"))
    valid, skipped = expand("tp=2 sp=1 ep=1,2", fam.layout_dims(), fam.check_layout)  # etp = tp = 2
    assert valid == [] and len(skipped) == 2
    assert all("Bias in Moe is only supported when ETP==1" in r for _, r in skipped)
    valid, skipped = expand("tp=2 sp=1 ep=1,2 etp=1", fam.layout_dims(), fam.check_layout)
    assert [lay.etp for lay in valid] == [1, 1] and skipped == []
    assert len(expand("tp=2 sp=1 ep=1,2", fam.layout_dims())[0]) == 2  # control: without the check


def test_export_writes_experts_stacked_only(zoo_model):
    """transformers knows gpt-oss experts only stacked: without a source checkpoint the export
    storage is transformers' [E, H, 2F]; one tensor per expert is refused with the reason."""
    from mcore_bridge import Bridge
    from mcore_bridge.errors import UsageError

    ckpt = HFCheckpoint(zoo_model("gpt_oss"))
    from_source = Bridge(zoo_model("gpt_oss"))
    assert from_source.expert_storage == stacked.IN_OUT
    no_source = Bridge(None, hf_config=ckpt.config, hf_tensors=from_source.hf_tensors)
    assert no_source.expert_storage == stacked.IN_OUT
    for b in (from_source, no_source):
        views, shapes = b.writer.stacking("source")
        assert shapes["model.layers.0.mlp.experts.gate_up_proj"] == (8, 64, 64)
        assert shapes["model.layers.0.mlp.experts.gate_up_proj_bias"] == (8, 64)
        with pytest.raises(UsageError, match="gpt_oss checkpoints hold their experts only stacked"):
            b.writer.stacking("per_expert")
    # control: a family with a per-expert HF layout still exports per expert when asked
    qwen = Bridge(zoo_model("qwen3_moe"))
    assert qwen.writer.stacking("per_expert") is None
