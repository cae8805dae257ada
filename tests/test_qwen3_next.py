"""Qwen3-Next (``families/qwen3_next.py`` on ``families/gated_deltanet.py``): the published config's
megatron settings, refusals, the delta-net / gated-attention weight layouts against transformers'
own code, the CPU delta-net path against transformers' torch path, and the model through the bridge
on CPU process groups (byte-exact round trips, fp32 verification with router agreement, a negative
control on a delta-net tensor caught at its layer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mcore_bridge import ParallelLayout as L
from mcore_bridge import transforms as T
from mcore_bridge.errors import AdapterError
from mcore_bridge.families import UnsupportedConfig, family_for
from mcore_bridge.families import gated_deltanet as gdn
from mcore_bridge.plan import expected_hf_names, inventory
from tests import cases, verify_cases
from tests.matrix import case_id

MODEL = "qwen3_next"
PUBLISHED = Path(__file__).parent / "published" / "Qwen__Qwen3-Next-80B-A3B-Instruct.json"


def _published(**change) -> dict:
    return {**json.loads(PUBLISHED.read_text()), **change}


def _zoo_config(zoo_model, **change) -> dict:
    return {**json.loads((zoo_model(MODEL) / "config.json").read_text()), **change}


# -- settings and refusals ------------------------------------------------------------------------
def test_published_config_maps_to_these_megatron_settings():
    c = family_for(_published()).architecture.config
    assert c["experimental_attention_variant"] == "gated_delta_net"
    assert c["linear_attention_freq"] == [0 if (i + 1) % 4 == 0 else 1 for i in range(48)]
    assert (c["linear_num_key_heads"], c["linear_num_value_heads"]) == (16, 32)
    assert (c["linear_key_head_dim"], c["linear_value_head_dim"], c["linear_conv_kernel_dim"]) == (128, 128, 4)
    assert c["attention_output_gate"] is True and c["qk_layernorm"] is True
    assert (c["num_attention_heads"], c["num_query_groups"], c["kv_channels"]) == (16, 2, 256)
    assert (c["num_moe_experts"], c["moe_router_topk"], c["moe_ffn_hidden_size"]) == (512, 10, 512)
    assert c["moe_shared_expert_intermediate_size"] == 512 and c["moe_shared_expert_gate"] is True
    assert c["moe_router_score_function"] == "softmax" and c["moe_router_pre_softmax"] is False  # norm_topk_prob
    assert c["moe_layer_freq"] == [1] * 48 and c["layernorm_epsilon"] == 1e-6
    m = family_for(_published()).architecture.model
    assert m["rotary_percent"] == 0.25 and m["rotary_base"] == 1e7 and m["vocab_size"] == 151936
    assert m["share_embeddings_and_output_weights"] is False


def test_transformers5_spellings_give_the_same_settings():
    """transformers 5 saves ``layer_types`` and ``rope_parameters`` instead of the interval and the
    top-level rope fields."""
    raw = _published()
    v5 = {k: v for k, v in raw.items() if k not in ("full_attention_interval", "rope_theta", "partial_rotary_factor")}
    v5["layer_types"] = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(48)]
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25}
    a, b = family_for(raw).architecture, family_for(v5).architecture
    assert dict(a.config) == dict(b.config) and dict(a.model) == dict(b.model)


@pytest.mark.parametrize("change,field", [
    (dict(layer_types=["sliding_attention"] * 48), "layer_types"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(partial_rotary_factor=0.3), "partial_rotary_factor"),
    (dict(linear_num_value_heads=24), "linear_num_value_heads"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(use_sliding_window=True), "use_sliding_window"),
])
def test_refusals_name_the_field(change, field):
    with pytest.raises(UnsupportedConfig, match=field):
        family_for(_published(**change)).architecture


def test_layouts_the_delta_net_cannot_run_are_refused():
    fam = family_for(_published())
    with pytest.raises(UnsupportedConfig, match="cp=2"):
        fam.check_layout(L(cp=2))
    with pytest.raises(UnsupportedConfig, match="linear_num_key_heads=16"):
        fam.check_layout(L(tp=32))
    fam.check_layout(L(tp=2, sp=True, ep=8, pp=4))  # negative control: a layout it runs


def test_a_checkpoint_without_mtp_tensors_converts_without_mtp(zoo_model):
    """The config declares no MTP layer count: one is assumed (the published checkpoints hold one,
    tests/test_qwen3_next_mtp.py), dropped only where the checkpoint holds no mtp.* tensor at all."""
    from mcore_bridge.hf_io import HFCheckpoint

    assert family_for(_zoo_config(zoo_model)).mtp_layers == 1
    fam = family_for(_zoo_config(zoo_model))
    fam.adapt(set(HFCheckpoint(zoo_model(MODEL)).names()))
    assert fam.mtp_layers == 0 and "mtp_num_layers" not in fam.architecture.config


def test_lora_is_refused():
    with pytest.raises(AdapterError, match="qwen3_next"):
        family_for(_published()).check_lora()


def test_rules_cover_the_saved_checkpoint_on_every_layout(zoo_model):
    from mcore_bridge.hf_io import HFCheckpoint

    fam = family_for(_zoo_config(zoo_model))
    saved = set(HFCheckpoint(zoo_model(MODEL)).names())
    fam.adapt(saved)  # no mtp.* tensors here: the main model alone
    assert any(".linear_attn.in_proj_qkvz." in n for n in saved) and any(".self_attn.q_proj." in n for n in saved)
    for layout in (L(), L(tp=2, sp=True), L(pp=2), L(ep=2), L(tp=2, sp=True, pp=2, ep=2)):
        assert expected_hf_names(inventory(fam, layout)) == saved, layout.short()


# -- weight layouts against transformers' code ----------------------------------------------------
def _tiny_hf_config():
    from transformers import AutoConfig

    from mcore_bridge import zoo

    spec = {k: v for k, v in zoo.ZOO[MODEL].items() if k != "max_shard_size"}
    return AutoConfig.for_model(**{**zoo._COMMON, **spec})


@pytest.mark.parametrize("tp", [1, 2])
def test_in_proj_layout_matches_transformers_head_order(tp):
    """megatron's in_proj output of a rank, split [q, k, v, z, b, a], equals transformers'
    ``fix_query_key_value_ordering`` of HF's two projections, restricted to the rank's heads."""
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    cfg = _tiny_hf_config()
    torch.manual_seed(0)
    layer = Qwen3NextGatedDeltaNet(cfg, layer_idx=0)
    c = family_for(cfg.to_dict()).architecture.config
    x = torch.randn(1, 5, cfg.hidden_size)
    with torch.no_grad():
        q, k, v, z, b, a = layer.fix_query_key_value_ordering(layer.in_proj_qkvz(x), layer.in_proj_ba(x))
        hf_parts = [q, k, v, z, b[..., None], a[..., None]]  # [1, s, heads, dim]
        tr = gdn.in_proj_transform(c)
        srcs = [layer.in_proj_qkvz.weight, layer.in_proj_ba.weight]
        for rank in range(tp):
            w = tr.split(srcs, tr.local_shape([tuple(s.shape) for s in srcs], tp), tp, rank)
            out = x @ w.T
            nk, nv = c["linear_num_key_heads"] // tp, c["linear_num_value_heads"] // tp
            dk, dv = c["linear_key_head_dim"], c["linear_value_head_dim"]
            sizes = [nk * dk, nk * dk, nv * dv, nv * dv, nv, nv]
            heads = [nk, nk, nv, nv, nv, nv]
            for got, ref, n in zip(torch.split(out, sizes, dim=-1), hf_parts, heads):
                want = ref[:, :, rank * n:(rank + 1) * n]  # matmul rounding differs; a wrong row is O(1) off
                assert torch.allclose(got.reshape(ref.shape[:2] + (n, -1)), want, atol=1e-5)
        assert tr.to_hf([tr.split(srcs, tr.local_shape([tuple(s.shape) for s in srcs], tp), tp, r)
                         for r in range(tp)], None)[0].equal(layer.in_proj_qkvz.weight)


def test_gated_qkv_layout_matches_transformers_query_gate_split():
    """megatron's gated linear_qkv holds per query group [queries; gates; k; v]; transformers chunks
    each head of q_proj into (query, gate)."""
    cfg = _tiny_hf_config()
    c = family_for(cfg.to_dict()).architecture.config
    d, g, h = c["kv_channels"], c["num_query_groups"], c["num_attention_heads"]
    qp, kp, vp = torch.randn(2 * h * d, 7), torch.randn(g * d, 7), torch.randn(g * d, 7)
    query, gate = torch.chunk(qp.view(h, 2 * d, 7), 2, dim=1)  # transformers' split of the q_proj output rows
    tr = gdn.gated_qkv_transform(c)
    w = tr.split([qp, kp, vp], tr.local_shape([qp.shape, kp.shape, vp.shape], 1), 1, 0).view(g, -1, d, 7)
    qg = h // g
    assert torch.equal(w[:, :qg].reshape(h, d, 7), query) and torch.equal(w[:, qg:2 * qg].reshape(h, d, 7), gate)
    assert torch.equal(w[:, 2 * qg], kp.view(g, d, 7)) and torch.equal(w[:, 2 * qg + 1], vp.view(g, d, 7))


def test_fused_blocks_split_each_block():
    t = T.FusedBlocks(((4, 4, 8),))  # conv1d over [q; k; v] channels
    full = torch.arange(16.0).reshape(16, 1, 1)
    shards = [t.split([full], t.local_shape([full.shape], 2), 2, r) for r in range(2)]
    assert shards[0].flatten().tolist() == [0, 1, 4, 5, 8, 9, 10, 11]
    assert t.to_hf(shards, [full.shape])[0].equal(full)
    with pytest.raises(T.ShapeMismatch):
        t.local_shape([(15, 1, 1)], 2)
    two = T.FusedBlocks(((2, 2), (4,)))  # several tensors (Qwen3.5's split in_proj_qkv / in_proj_z)
    a, b = torch.arange(4.0).reshape(4, 1), 10 + torch.arange(4.0).reshape(4, 1)
    shards = [two.split([a, b], two.local_shape([a.shape, b.shape], 2), 2, r) for r in range(2)]
    assert shards[1].flatten().tolist() == [1, 3, 12, 13]
    back = two.to_hf(shards, [a.shape, b.shape])
    assert back[0].equal(a) and back[1].equal(b)


@pytest.mark.parametrize("per_group", [False, True])
def test_grouped_rows_split_and_rebuild_over_tp(per_group):
    """Each rank reads one run of head groups per source; export rebuilds the HF tensors exactly."""
    t = T.GroupedRows(4, ((1, 2), (3,)), ((1, 0), (0, 1), (0, 0)), per_group=per_group)
    a, b = torch.arange(12.0).reshape(12, 1), 100 + torch.arange(12.0).reshape(12, 1)
    shards = [t.split([a, b], t.local_shape([a.shape, b.shape], 2), 2, r) for r in range(2)]
    # rank 0 holds groups 0, 1: a rows 0-5 ([1, 2] per group), b rows 0-5 ([3] per group)
    want = ([100, 101, 102, 1, 2, 0, 103, 104, 105, 4, 5, 3] if per_group
            else [100, 101, 102, 103, 104, 105, 1, 2, 4, 5, 0, 3])
    assert shards[0].flatten().tolist() == want
    back = t.to_hf(shards, [a.shape, b.shape])
    assert back[0].equal(a) and back[1].equal(b)
    with pytest.raises(T.ShapeMismatch, match="head groups"):
        t.local_shape([a.shape, b.shape], 8)
    with pytest.raises(ValueError, match="exactly once"):
        T.GroupedRows(4, ((1, 2), (3,)), ((1, 0), (0, 1)), per_group=per_group)


# -- the CPU delta-net path against transformers' torch path ---------------------------------------
def test_cpu_gated_delta_rule_matches_transformers_torch_paths():
    """megatron's own torch chunked rule behind the CPU adaptation (with our l2norm) equals
    transformers' chunked and token-by-token recurrent rules (fp32), over several chunks."""
    from megatron.core.ssm import gated_delta_net as megatron_gdn
    from transformers.models.qwen3_next import modeling_qwen3_next as hf

    from mcore_bridge.runtime import cpu_kernels

    torch.manual_seed(0)
    b, s, h, dk, dv = 2, 150, 4, 16, 8  # 150 tokens: three chunks of 64, the last partial
    q, k = torch.randn(b, s, h, dk), torch.randn(b, s, h, dk)
    v = torch.randn(b, s, h, dv)
    g = -torch.rand(b, s, h) * 2
    beta = torch.rand(b, s, h)
    rule = cpu_kernels.gated_delta_rule(megatron_gdn.torch_chunk_gated_delta_rule)
    ours, _ = rule(cpu_kernels.l2norm(q), cpu_kernels.l2norm(k), v, g=g, beta=beta)
    chunked, _ = hf.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
    recurrent, _ = hf.torch_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=None,
                                                       output_final_state=False, use_qk_l2norm_in_kernel=True)
    assert (ours - chunked).abs().max() < 1e-5 and (ours - recurrent).abs().max() < 1e-4
    wrong, _ = rule(q, k, v, g=g, beta=beta)  # negative control: without the q/k L2 norm
    assert (wrong - recurrent).abs().max() > 1e-2


def test_cpu_causal_conv1d_matches_transformers():
    from transformers.models.qwen3_next import modeling_qwen3_next as hf

    from mcore_bridge.runtime import cpu_kernels

    torch.manual_seed(0)
    x, w = torch.randn(2, 9, 6), torch.randn(6, 4)
    ours, _ = cpu_kernels.causal_conv1d(x, w, activation="silu")
    ref = hf.causal_conv1d_fn(x.transpose(1, 2), w, None, activation="silu")  # its torch fallback here
    assert torch.allclose(ours, ref.transpose(1, 2), atol=1e-6)


def test_cpu_adaptation_is_scoped():
    from megatron.core.ssm import gated_delta_net as megatron_gdn

    from mcore_bridge.runtime import compat

    mod = getattr(megatron_gdn, "common", megatron_gdn)  # 0.19.2: the package's common module
    before = (mod.HAVE_FLA, mod.chunk_gated_delta_rule)
    with compat.scope("cpu"):
        assert mod.HAVE_FLA is True and mod.chunk_gated_delta_rule is not None
    assert (mod.HAVE_FLA, mod.chunk_gated_delta_rule) == before
    assert "_gated_delta_net_on_cpu" not in [f.__name__ for c in compat.conditions("cuda") if c != "no_te"
                                             for f in compat._ADAPTATIONS[c]]


# -- through the bridge, on CPU process groups ----------------------------------------------------
ROUNDTRIP = [(1, L()), (2, L(tp=2, sp=True)), (2, L(pp=2)), (2, L(ep=2))]


@pytest.mark.parametrize("world,layout", [pytest.param(w, lay, id=case_id(MODEL, w, lay), marks=pytest.mark.world(w))
                                          for w, lay in ROUNDTRIP])
def test_roundtrip_is_byte_exact(world, layout, pools, zoo_model, tmp_path):
    src, out = zoo_model(MODEL), tmp_path / "converted"
    results = pools.get(world).run(cases.roundtrip, timeout=300, source=str(src), layout=layout.to_dict(),
                                   out_dir=str(out))
    expected = cases.check_roundtrip(results, src, out)
    assert any(".linear_attn.conv1d." in n for n in expected) and any(".experts.7." in n for n in expected)


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("qwen3-next-reference-cache"))


def _verify(pools, zoo_model, ref_cache, world, layout, **kw) -> dict:
    out = pools.get(world).run(verify_cases.verify, timeout=600, source=str(zoo_model(MODEL)),
                               layout=layout.to_dict(), reference_cache=ref_cache, **kw)
    reports = [r for r in out if r is not None]
    assert len(reports) == 1
    return reports[0]


@pytest.mark.world(2)
def test_verifies_fp32_with_full_router_agreement(pools, zoo_model, ref_cache):
    r = _verify(pools, zoo_model, ref_cache, 2, L(tp=2, sp=True, ep=2, etp=1))
    assert r["verdict"] == "pass", r["failures"]
    m = r["metrics"]
    assert m["max_diff"] < 1e-4 and m["top1_agreement"] == 1.0 and m["router_agreement"] == 1.0
    assert [x["layer"] for x in r["layers"] if "router_agreement" in x] == [0, 1, 3]  # layer 2 dense


@pytest.mark.world(2)
def test_perturbed_delta_net_tensor_is_caught_at_its_layer(pools, zoo_model, ref_cache):
    """A_log 5% off on delta-net layer 2 (after a linear and a gated-attention layer): fails there."""
    r = _verify(pools, zoo_model, ref_cache, 2, L(tp=2, sp=True, ep=2, etp=1),
                control="scale:decoder.layers.2.self_attention.A_log:1.05")
    assert r["verdict"] == "fail" and r["first_diverging"]["probe"] == "layer.2"
    assert [x["ok"] for x in r["layers"][:3]] == [True, True, True]  # embedding, layer.0, layer.1


def test_a_delta_net_parameter_on_an_attention_layer_is_refused():
    """The plan names what the rule asks for (the token mixer) and what the config says the layer is."""
    from mcore_bridge.errors import MappingError
    from mcore_bridge.plan import local_items
    from tests.test_architecture import raw

    fam = family_for(raw("qwen3_next"))
    assert fam.layer_mixer(0) == "linear" and fam.layer_mixer(1) == "attention"
    assert local_items(fam, L(), 0, [["decoder.layers.0.self_attention.A_log"]])
    with pytest.raises(MappingError, match="layer 1 is an attention layer .* belongs to a linear layer"):
        local_items(fam, L(), 0, [["decoder.layers.1.self_attention.A_log"]])


def test_fp32_runs_megatron_s_own_torch_delta_rule_and_bf16_keeps_the_kernel_path():
    """fla's Triton delta rule computes its float32 dots in TF32 (measured on an H200:
    reports/gpu-h200/published-issue19.md): float32 models take megatron's own switch to its torch
    rule (``deterministic_mode``), in the config the model is built from; bf16 models keep the
    kernel path. A family without a delta-net sets nothing."""
    from mcore_bridge.model import transformer_config

    fam = family_for(_published())
    assert transformer_config(fam, L(), torch.float32, "cpu").deterministic_mode is True
    assert transformer_config(fam, L(), torch.bfloat16, "cpu").deterministic_mode is False
    qwen3 = family_for(json.loads((PUBLISHED.parent / "Qwen__Qwen3-8B.json").read_text()))
    assert transformer_config(qwen3, L(), torch.float32, "cpu").deterministic_mode is False


def test_packing_is_refused_where_megatron_s_delta_net_cannot_take_it():
    """``--packing`` on a delta-net model gets our error naming the flag and the way out, before
    megatron's own (0.16.1: NotImplementedError in the forward; 0.19.2 without fla: its kernels are
    the only THD path). Which one is keyed on what the installed megatron has."""
    from megatron.core.ssm import gated_delta_net as gdn_module

    fam = family_for(_published())
    has_thd = hasattr(gdn_module.GatedDeltaNet, "_resolve_cu_seqlens")
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(UnsupportedConfig, match="--packing") as e:
            fam.check_packing(dtype)
        # 0.16.1: no THD delta-net at all; 0.19.2 on this CPU machine: no fla
        assert ("does not take packed sequences" if not has_thd else "fla") in str(e.value)
    qwen3 = family_for(json.loads((PUBLISHED.parent / "Qwen__Qwen3-8B.json").read_text()))
    qwen3.check_packing(torch.float32)  # attention-only families pack at any dtype


def test_packed_fp32_training_keeps_megatron_s_kernel_path():
    """megatron's torch delta rule (fp32's verification path) takes no cu_seqlens: a model built for
    packed sequences keeps the kernel path at fp32 too (TrainOptions.packed, set by the hooks)."""
    from mcore_bridge.model import transformer_config
    from mcore_bridge.train_options import TrainOptions

    fam = family_for(_published())
    assert fam.runtime_config(torch.float32) == {"deterministic_mode": True}
    assert fam.runtime_config(torch.float32, packed=True) == {}
    cfg = transformer_config(fam, L(), torch.float32, "cpu", training=TrainOptions(packed=True))
    assert cfg.deterministic_mode is False
