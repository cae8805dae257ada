"""torch_dist checkpoints in megatron's TransformerEngine key layout (``mcore_bridge/te_layout.py``).

Fidelity evidence: megatron-core builds its own TE-spec model of every zoo family at several layouts
against the stand-in of ``tests/te_standin.py`` (keys and shapes only, never numerics), and the
sharded state the bridge writes with ``--spec te`` equals it key by key (global shape, this rank's
offset, dtype, extra-state objects); that model then loads the checkpoint at megatron's default
strictness and receives the bridge's tensors under the right names. Resharding across the two
layouts is byte-exact, and checkpoints fitting neither layout are refused by key."""

from __future__ import annotations

import json

import pytest
from torch.distributed.checkpoint import FileSystemReader

from mcore_bridge import ParallelLayout as L
from mcore_bridge import zoo
from tests import te_cases
from tests.test_torch_dist import assert_same_hf, to_hf

MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "qwen3_vl_moe")
# families whose two layouts differ (MoE pre-MLP norm, MLA norms, q/k-norm extra states)
DIFFERS = ("qwen3", "qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "qwen3_vl", "qwen3_vl_moe")


def keys_of(ckpt):
    return set(FileSystemReader(str(ckpt / "release")).read_metadata().state_dict_metadata)


def check_keys(results, name, layout):
    for r in results:
        assert r["mismatches"] == [], f"{name} at {layout}, rank {r['rank']}:\n" + "\n".join(r["mismatches"][:20])
        assert r["keys"] > 0
        # megatron really built TE modules (the stand-in's), not its local ones
        assert {"TELayerNormColumnParallelLinear", "TERowParallelLinear"} <= set(r["te_modules"]) or \
            "TERowParallelLinear" in r["te_modules"], r["te_modules"]
    if name in DIFFERS:  # control: the local layout is not what the TE model asks for
        assert all(r["local_differs"] > 0 for r in results), name


# megatron-core has no TransformerEngine spec to compare with: Gemma 3's post norms, (1 + w) norms and
# local RoPE are the bridge's own modules (families/gemma_modules.py), built on the local spec; nor for
# Qwen3-Next's local hybrid block (megatron's hybrid spec is TE-only and fuses other norms)
NO_TE_SPEC = ("gemma3_text", "gemma3", "qwen3_next", "qwen3_next_mtp", "qwen3_5", "qwen3_5_moe")  # Qwen3.5: Qwen3-Next's block
NO_TE_SPEC += ("qwen3_5_mtp", "qwen3_5_moe_mtp")


@pytest.mark.world(1)
def test_te_keys_equal_megatron_te_models_ws1(pools, zoo_model):
    for name in (n for n in zoo.names() if n not in zoo.MTP):  # MTP + spec te: refused (test_mtp.py)
        if name in NO_TE_SPEC:
            continue
        check_keys(pools.get(1).run(te_cases.te_keys, source=str(zoo_model(name)), layout={}), name, "ws1")
    # TEGroupedMLP (moe_grouped_gemm) asks for the same keys as SequentialMLP
    check_keys(pools.get(1).run(te_cases.te_keys, source=str(zoo_model("qwen3_moe")), layout={}, grouped=True),
               "qwen3_moe", "ws1 grouped")


# one zoo model per family module at world size 2 (every zoo model runs at world size 1 above)
WS2 = ("llama", "qwen3", "qwen3_moe", "deepseek_v3", "qwen3_vl_moe")


@pytest.mark.world(2)
def test_te_keys_equal_megatron_te_models_ws2(pools, zoo_model):
    for name in WS2:
        layouts = [L(tp=2, sp=True), L(pp=2)] + ([L(ep=2)] if name in MOE else [])
        for layout in layouts:
            check_keys(pools.get(2).run(te_cases.te_keys, source=str(zoo_model(name)), layout=layout.to_dict()),
                       name, layout.short())
    check_keys(pools.get(2).run(te_cases.te_keys, source=str(zoo_model("deepseek_v3")), layout=L(ep=2).to_dict(),
                                grouped=True), "deepseek_v3", "ep2 grouped")

def save(pools, world, name, layout, out, spec, rename=None):
    pools.get(world).run(te_cases.save_spec, timeout=300, source=str(name), layout=layout.to_dict(),
                         out_dir=str(out), spec=spec, rename=rename)


@pytest.mark.world(1)
def test_megatron_te_model_loads_te_checkpoint_at_default_strictness(pools, zoo_model, tmp_path):
    """megatron's TE-spec model loads a --spec te checkpoint with dist_checkpointing's (and
    Megatron-LM's --dist-ckpt-strictness) default ASSUME_OK_UNEXPECTED and receives the bridge's
    tensors; a --spec local checkpoint of the same model fails there (keys and extra states absent)."""
    # what the TE model asks for first that a local-layout checkpoint lacks
    for name, absent in (("deepseek_v3", "linear_q_up_proj.layer_norm_weight"), ("qwen3", "layernorm._extra_state")):
        src = zoo_model(name)
        te, local = tmp_path / f"{name}-te", tmp_path / f"{name}-local"
        save(pools, 1, src, L(), te, "te")
        save(pools, 1, src, L(), local, "local")
        assert json.loads((te / "mcore_bridge.json").read_text())["spec"] == "te"
        [r] = pools.get(1).run(te_cases.te_model_loads, source=str(src), layout={}, te_ckpt=str(te),
                               local_ckpt=str(local))
        assert r["wrong"] == [] and r["compared"] > 10, r
        assert r["local_error"] is not None and absent in r["local_error"], r["local_error"]


# keys only one layout has (global keys, as in the checkpoint's .metadata)
TE_ONLY = {"deepseek_v3": ["decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
                           "decoder.layers.1.self_attention.linear_q_up_proj.layer_norm_weight",
                           "decoder.layers.1.self_attention.linear_kv_up_proj.layer_norm_weight",
                           "decoder.layers.1.input_layernorm._extra_state/shard_0_1",
                           "decoder.final_layernorm._extra_state/shard_0_1"],
           "qwen3_vl_moe": ["decoder.layers.1.pre_mlp_layernorm.weight",  # layer 0 is dense
                            "decoder.layers.0.self_attention.q_layernorm._extra_state/shard_0_1"]}
LOCAL_ONLY = {"deepseek_v3": ["decoder.layers.0.pre_mlp_layernorm.weight",
                              "decoder.layers.1.self_attention.q_layernorm.weight",
                              "decoder.layers.1.self_attention.kv_layernorm.weight"],
              "qwen3_vl_moe": ["decoder.layers.1.mlp.linear_fc1.layer_norm_weight"]}


def assert_layout(ckpt, name, spec):
    keys = keys_of(ckpt)
    present, absent = (TE_ONLY, LOCAL_ONLY) if spec == "te" else (LOCAL_ONLY, TE_ONLY)

    def has(key):  # vision-language models prefix the language model's keys
        return any(k == key or k.endswith("." + key) for k in keys)

    assert all(has(k) for k in present[name]), [k for k in present[name] if not has(k)]
    assert not any(has(k) for k in absent[name]), [k for k in absent[name] if has(k)]


@pytest.mark.world(2)
def test_reshard_across_specs_is_byte_exact(pools, zoo_model, tmp_path):
    """Written TE at one layout, read (local-spec model) at another and written local there, read at
    a third and written TE again, read at a fourth: HF out equals HF in, byte for byte."""
    src = zoo_model("deepseek_v3")
    te1, local2, te3 = tmp_path / "te1", tmp_path / "local2", tmp_path / "te3"
    save(pools, 2, src, L(ep=2), te1, "te")
    assert_layout(te1, "deepseek_v3", "te")
    pools.get(2).run(te_cases.resave, ckpt=str(te1), layout=L(tp=2, sp=True).to_dict(), out_dir=str(local2),
                     spec="local")
    assert_layout(local2, "deepseek_v3", "local")
    pools.get(2).run(te_cases.resave, ckpt=str(local2), layout=L(pp=2).to_dict(), out_dir=str(te3), spec="te")
    assert_layout(te3, "deepseek_v3", "te")
    to_hf(pools, te3, L(tp=2, sp=True, ep=2, etp=1), 2, tmp_path / "hf-b")
    assert_same_hf(src, tmp_path / "hf-b")
    # vision-language MoE: TE at pp2 -> tp2
    vl = zoo_model("qwen3_vl_moe")
    save(pools, 2, vl, L(pp=2), tmp_path / "vl-te", "te")
    assert_layout(tmp_path / "vl-te", "qwen3_vl_moe", "te")
    to_hf(pools, tmp_path / "vl-te", L(tp=2, sp=True), 2, tmp_path / "vl-hf")
    assert_same_hf(vl, tmp_path / "vl-hf")


@pytest.mark.world(2)
def test_te_checkpoint_reads_into_grouped_experts(pools, zoo_model, tmp_path):
    """A TE-layout checkpoint of sequential experts read into grouped-GEMM experts (megatron-core 0.16's
    legacy GroupedMLP) and written TE again from them: HF out equals HF in. Where the local spec has no
    grouped experts (0.19), reading into them is refused with the reason instead."""
    from mcore_bridge.model import local_grouped_experts_available
    from verify.pool import WorkerError

    src = zoo_model("deepseek_v3")
    te1, te2 = tmp_path / "te1", tmp_path / "te2"
    save(pools, 2, src, L(ep=2), te1, "te")
    if not local_grouped_experts_available():
        with pytest.raises(WorkerError, match="grouped_experts=True: megatron-core .* no grouped-GEMM experts"):
            pools.get(2).run(te_cases.resave, ckpt=str(te1), layout=L(ep=2).to_dict(), out_dir=str(te2),
                             spec="te", grouped=True)
        return
    pools.get(2).run(te_cases.resave, ckpt=str(te1), layout=L(ep=2).to_dict(), out_dir=str(te2), spec="te",
                     grouped=True)
    assert_layout(te2, "deepseek_v3", "te")
    to_hf(pools, te2, L(tp=2, sp=True), 2, tmp_path / "hf")  # read back as sequential experts
    assert_same_hf(src, tmp_path / "hf")


@pytest.fixture(scope="module")
def qwen3_moe_adapter(zoo_model, tmp_path_factory):
    import peft
    import torch
    import transformers

    torch.manual_seed(3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(zoo_model("qwen3_moe"), dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    out = tmp_path_factory.mktemp("peft-qwen3_moe")
    peft.get_peft_model(hf, cfg).save_pretrained(out)
    return out


@pytest.mark.world(1)
def test_lora_checkpoint_in_te_layout(pools, zoo_model, qwen3_moe_adapter, tmp_path):
    """A checkpoint holding base weights and a LoRA adapter, in the TE layout, reads back exactly."""
    import torch

    from mcore_bridge.hf_io import HFCheckpoint

    src = zoo_model("qwen3_moe")
    ckpt = tmp_path / "lora-te"
    pools.get(1).run(te_cases.lora_save, source=str(src), adapter=str(qwen3_moe_adapter), layout={},
                     out_dir=str(ckpt), spec="te")
    keys = keys_of(ckpt)
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in keys and any("lora" in k for k in keys)
    pools.get(1).run(te_cases.lora_back, ckpt=str(ckpt), layout={}, base_out=str(tmp_path / "base"),
                     peft_out=str(tmp_path / "peft"))
    assert_same_hf(src, tmp_path / "base")
    a, b = HFCheckpoint(qwen3_moe_adapter, config={}), HFCheckpoint(tmp_path / "peft", config={})
    assert sorted(a.names()) == sorted(b.names())
    for n in a.names():
        assert torch.equal(a.read(n), b.read(n)), n


@pytest.mark.world(1)
def test_keys_of_neither_layout_are_refused_by_name(pools, zoo_model, tmp_path):
    src = zoo_model("qwen3_moe")
    unknown = tmp_path / "unknown"
    save(pools, 1, src, L(), unknown, "te",
         rename={"decoder.layers.1.pre_mlp_layernorm.weight": "decoder.layers.1.pre_mlp_norm.weight"})
    [err] = pools.get(1).run(te_cases.load_error, ckpt=str(unknown), layout={})
    assert err is not None and "decoder.layers.1.pre_mlp_norm.weight" in err and "neither" in err, err
    mixed = tmp_path / "mixed"
    save(pools, 1, src, L(), mixed, "te",
         rename={"decoder.layers.2.pre_mlp_layernorm.weight": "decoder.layers.2.mlp.linear_fc1.layer_norm_weight"})
    [err] = pools.get(1).run(te_cases.load_error, ckpt=str(mixed), layout={})
    assert err is not None and "decoder.layers.2.mlp.linear_fc1.layer_norm_weight" in err and "mixes" in err, err
    # control: the untampered TE checkpoint loads
    good = tmp_path / "good"
    save(pools, 1, src, L(), good, "te")
    assert pools.get(1).run(te_cases.load_error, ckpt=str(good), layout={}) == [None]


def test_cli_writes_the_te_layout_by_default(zoo_model, tmp_path):
    """--to-mcore without --spec writes the TE layout (--spec local: the pool tests above)."""
    from tests.test_cli import run_cli

    out = tmp_path / "mcore"
    r = run_cli("export", "--model", zoo_model("qwen3_moe"), "--to-mcore", "--save", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    keys = keys_of(out)
    assert {"decoder.layers.0.pre_mlp_layernorm.weight",
            "decoder.layers.0.self_attention.q_layernorm._extra_state/shard_0_1"} <= keys
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" not in keys
