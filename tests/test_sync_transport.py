"""RL weight sync into a separate engine process over the library's own gloo group: trainer ranks
(megatron, TP2 / EP2) -> a spawned process holding a transformers model, loaded in place.
Base weights arrive byte-exact (logits equal the HF reference bit for bit), FP8 within its
rounding, LoRA factors into a PEFT model; a dropped bucket and a wrong name are named."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from mcore_bridge import ParallelLayout as L
from mcore_bridge.hf_io import HFCheckpoint
from mcore_bridge.runtime.dist import free_port
from tests import transport_cases
from tests.cases import same_bytes
from tests.lora_cases import input_ids


def _run(pools, src, layout, plan, tmp_path, engines: int = 1, shm_dir: str | None = None, bucket_bytes=None):
    init = f"tcp://127.0.0.1:{free_port()}"
    ctx = mp.get_context("spawn")
    paths = [str(tmp_path / f"engine{i}.pt") for i in range(engines)]
    procs = [ctx.Process(target=transport_cases.engine, args=(init, 1 + i, 1 + engines, str(src), plan, paths[i], shm_dir))
             for i in range(engines)]
    for p in procs:
        p.start()
    try:
        trainer = pools.get(2).run(transport_cases.trainer, timeout=300, source=str(src), layout=layout.to_dict(),
                                   init_method=init, engines=engines, plan=plan, shm_dir=shm_dir,
                                   bucket_bytes=bucket_bytes)
    finally:
        for p in procs:
            p.join(timeout=120)
            if p.is_alive():
                p.kill()
    results = [torch.load(p, weights_only=False) for p in paths]
    errors = [r for status, r in results if status != "ok"]
    assert not errors, errors[0]
    return trainer, [r for _, r in results]


def _reference_logits(src):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=input_ids(model.config.vocab_size)).logits


def _check_fp8(state: dict, kept: dict, source: HFCheckpoint):
    quantized = {n for n, t in kept.items() if t.dtype == torch.float8_e4m3fn}
    assert quantized and all(n + "_scale_inv" in kept for n in quantized)
    for name in source.names():
        src = source.read(name)
        if name not in quantized:  # norms, embeddings: as stored
            assert same_bytes(state[name], src), name
            continue
        # e4m3 keeps 3 mantissa bits (relative error <= 2^-4), then the bf16 rounding (2^-9)
        err = (state[name] - src).abs()
        assert bool((err <= src.abs() * 0.07 + src.abs().max() * 2 ** -12).all()), name
        assert not torch.equal(state[name], src), name  # it was quantised
        scale = kept[name + "_scale_inv"]
        assert scale.dtype == torch.float32 and scale.shape == (-(-src.shape[0] // 128), -(-src.shape[1] // 128))
        assert (kept[name].float() * scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[
            :src.shape[0], :src.shape[1]]).to(torch.bfloat16).float().equal(state[name])  # both modes agree


@pytest.mark.world(2)
def test_dense_tp2_to_engine_process(pools, zoo_model, tmp_path):
    src = zoo_model("qwen3")
    plan = ["weights", "drop", "rename", "twice", "abort", "fp8", "fp8_keep", "weights", "lora"]
    trainer, (eng,) = _run(pools, src, L(tp=2), plan, tmp_path)
    reference = _reference_logits(src)
    assert not torch.equal(eng["before"], reference)  # the engine starts from other weights
    assert eng["megatron_imported"] == []  # the engine side needs torch + transformers only
    assert torch.equal(eng["weights"], reference)  # bit for bit: every byte arrived
    source = HFCheckpoint(src)
    state = eng["weights_state"]
    assert all(same_bytes(state[n], source.read(n)) for n in source.names())
    assert eng["weights_stats"]["tensors"] == len(source.names())
    # negative controls: named by the receiver's accounting
    assert eng["drop"] and "never arrived" in eng["drop"] and "model.layers." in eng["drop"]
    assert not eng["drop_complete"]
    assert eng["rename"] and "model.layerz." in eng["rename"] and "not a tensor of the engine model" in eng["rename"]
    assert eng["twice"] and "bucket 2: " in eng["twice"] and "arrived twice in one step" in eng["twice"]
    assert trainer[0]["abort"] == "export failed (test)"
    assert eng["abort"] and "trainer failed after 1 bucket(s) (RuntimeError: export failed (test))" in eng["abort"]
    weights, fp8, fp8_again, weights_again, _ = trainer[0]["stats"]
    assert weights["bytes"] == weights_again["bytes"] == eng["weights_stats"]["bytes"]
    assert weights["metas"] == weights["buckets"] and fp8["metas"] == fp8["buckets"]
    assert fp8_again["metas"] == 0  # the same kind of step again: the engine kept the metadata
    _check_fp8(eng["fp8_state"], eng["fp8_keep"], source)
    # e4m3 weights (~2^-4 relative per weight) move these tiny random logits by a few percent
    assert (eng["fp8"] - reference).norm() < 0.1 * reference.norm()
    # LoRA: factors only, into a PEFT model on the synced base weights; logits as megatron's merged model
    megatron = [t["logits"] for t in trainer if t.get("logits") is not None]
    assert len(megatron) == 1
    layers = HFCheckpoint(src).config["num_hidden_layers"]
    assert eng["lora_stats"]["tensors"] == layers * 7 * 2  # 7 projections x (A, B) per layer
    assert not torch.allclose(eng["lora"], eng["fp8"], atol=1e-3)  # the adapter changed the output
    assert (eng["lora"] - megatron[0]).abs().max() < 1e-2 * megatron[0].abs().max()


@pytest.mark.world(2)
def test_moe_ep2_to_engine_process(pools, zoo_model, tmp_path):
    src = zoo_model("qwen3_moe")
    trainer, engines = _run(pools, src, L(ep=2), ["fp8", "weights"], tmp_path)
    reference = _reference_logits(src)
    names = HFCheckpoint(src).names()
    assert any(".experts.0." in n for n in names) or any(".experts." in n for n in names)
    for eng in engines:  # per-expert tensors into transformers' stacked experts, bit for bit
        assert not torch.equal(eng["before"], reference)
        assert torch.equal(eng["weights"], reference)
        assert eng["weights_stats"]["tensors"] == len(names)
        assert (eng["fp8"] - reference).norm() < 0.1 * reference.norm()  # FP8 experts dequantised into the stacks
        assert not torch.equal(eng["fp8"], reference)
    assert all(t["world"] == 2 for t in trainer)  # the host's default group is untouched


@pytest.mark.world(2)
def test_colocated_protocol_with_file_backed_slots(pools, zoo_model, tmp_path):
    """The colocated channel's protocol (two slots reused across many buckets, handles sent once,
    releases, key cleanup) across real processes; only its CUDA memory is replaced by mapped files
    (CUDA IPC itself runs in bench/rl_sync_bench.py --mode colocated, on a GPU)."""
    src = zoo_model("qwen3")
    shm = tmp_path / "slots"
    shm.mkdir()
    trainer, (eng,) = _run(pools, src, L(tp=2), ["weights", "weights"], tmp_path, shm_dir=str(shm),
                           bucket_bytes=1 << 16)
    assert torch.equal(eng["weights"], _reference_logits(src))
    first, second = trainer[0]["stats"]
    assert first["buckets"] > 4 and second["buckets"] == first["buckets"]  # slots refilled many times
    assert len(list(shm.iterdir())) <= 4  # two slots, each grown at most once here
    assert trainer[0]["keys"] == [f"msg/{first['buckets'] * 2 + 3}"]  # only the last END is left


def test_transport_refusals_name_the_fix():
    from mcore_bridge.errors import UsageError
    from mcore_bridge.sync_transport import connect
    from mcore_bridge.sync_transport.ipc import colocate

    with pytest.raises(UsageError, match=r"colocated transport \(CUDA IPC\) needs a CUDA device.*connect\(\.\.\.\)"):
        colocate("tcp://127.0.0.1:29999", 0, 2, device="cpu")
    with pytest.raises(UsageError, match=r"backend='nccl' needs a CUDA device.*backend='gloo'"):
        connect("tcp://127.0.0.1:29999", 0, 2, device="cpu", backend="nccl")
    with pytest.raises(UsageError, match=r"init_method='127.0.0.1:29999': expected 'tcp://HOST:PORT'"):
        connect("127.0.0.1:29999", 0, 2)
    with pytest.raises(UsageError, match=r"rank=0, world_size=1"):
        connect("tcp://127.0.0.1:29999", 0, 1)
