"""A blockwise-FP8 DeepSeek-V3 (``builtin:deepseek_v3_fp8``: blocks of 32 x 48, partial edge
blocks, TP shards starting mid-block) through megatron on the CPU matrix: the default export
equals the dequantised checkpoint byte for byte; the FP8 export reproduces the stored checkpoint
byte for byte (FP8 payload and scales: a block keeps the source's scale where it represents the
exported values exactly); each rank reads only its FP8 rows and the scale rows covering them; fp32
logits agree with transformers run on the dequantised weights. Fresh scales (no reference) are
measured in test_quant: FP8 bytes exact, scales within 2^-8."""

from __future__ import annotations

import json

import pytest
import torch

from mcore_bridge import ParallelLayout as L
from mcore_bridge import quant
from mcore_bridge.hf_io import HFCheckpoint
from tests import cases, fp8_cases
from tests.matrix import case_id

MODEL = "deepseek_v3_fp8"
LAYOUTS = [(1, L()), (2, L(tp=2, sp=True, ep=2, etp=1)), (4, L(tp=2, sp=True, ep=2))]
# with its MTP layer in FP8 as published (eh_proj and the head/embedding copies bf16), on the last stage
MTP_CASES = [("deepseek_v3_mtp_fp8", 2, L(pp=2))]


@pytest.mark.parametrize("model,world,layout", [
    pytest.param(m, w, lay, id=case_id(m, w, lay), marks=pytest.mark.world(w))
    for m, w, lay in [(MODEL, w, lay) for w, lay in LAYOUTS] + MTP_CASES])
def test_fp8_roundtrip(model, world, layout, pools, zoo_model, tmp_path):
    src = zoo_model(model)
    out, out8 = tmp_path / "bf16", tmp_path / "fp8"
    results = pools.get(world).run(fp8_cases.fp8_roundtrip, timeout=600, source=str(src), layout=layout.to_dict(),
                                   out_dir=str(out), out_fp8=str(out8))
    stored = HFCheckpoint(src)
    view = quant.open_quantized(HFCheckpoint(src))
    for r in results:
        assert r["default"]["mismatches"] == [] and r["default"]["names"] == sorted(view.names()), r["rank"]
        f = r["fp8"]
        assert f["names"] == sorted(stored.names()) and f["other"] == [], r["rank"]
        assert f["payload_bytes"] == sum(i.nbytes for i in stored.tensors.values() if i.dtype == quant.FP8)
        assert f["payload_bytes_differing"] == 0 and f["scale_rel"] == 0.0, f  # byte-exact
        b = r["buckets"]
        assert b["names"] == sorted(stored.names()) and b["mismatches"] == [], (r["rank"], b["mismatches"])
    saved = HFCheckpoint(out)
    assert sorted(saved.names()) == sorted(view.names())
    assert all(cases.same_bytes(saved.read(n), view.read(n)) for n in view.names())
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    saved8 = HFCheckpoint(out8)
    assert sorted(saved8.names()) == sorted(stored.names())
    assert saved8.config["quantization_config"] == stored.config["quantization_config"]
    assert all(cases.same_bytes(saved8.read(n), stored.read(n)) for n in stored.names())


@pytest.mark.world(2)
def test_fp8_ranks_read_their_rows_and_covering_scales(pools, zoo_model):
    src = zoo_model(MODEL)
    results = pools.get(2).run(fp8_cases.fp8_reads, timeout=300, source=str(src),
                               layout=L(tp=2, sp=True, ep=2, etp=1).to_dict())
    for r in results:
        # column-parallel q_b_proj [192, 32] over tp 2: rows 96 each, scale rows of 32-blocks covering them
        regs = r["regions"]
        q_b = "model.layers.0.self_attn.q_b_proj.weight"
        lo = regs[q_b][0][0]
        assert lo in (0, 96) and tuple(regs[q_b][0]) == (lo, lo + 96), regs[q_b]
        assert tuple(regs[q_b + "_scale_inv"][0]) == (lo // 32, -(-(lo + 96) // 32))
        # row-parallel o_proj [64, 128]: cols 64 each; blocks of 48 -> rank 1 starts mid-block
        o = "model.layers.0.self_attn.o_proj.weight"
        c0 = regs[o][1][0]
        assert tuple(regs[o + "_scale_inv"][1]) == (c0 // 48, -(-(c0 + 64) // 48))
        # every FP8 weight is split in two (attention and dense MLP over tp 2, experts over ep 2):
        # exactly half of the FP8 bytes per rank; scales a little more (blocks straddling a shard
        # boundary are read by both ranks: measured 648 of 1120 bytes)
        assert r["fp8"] == r["fp8_total"] // 2, r
        assert r["scale_total"] // 2 <= r["scale"] < 0.6 * r["scale_total"], r


VERIFY = [(1, L()), (2, L(tp=2, sp=True, ep=2, etp=1))]


@pytest.mark.parametrize("world,layout", [pytest.param(w, lay, id=case_id(MODEL, w, lay),
                                                       marks=pytest.mark.world(w)) for w, lay in VERIFY])
def test_fp8_logits_match_hf_on_the_dequantised_weights(world, layout, pools, zoo_model):
    out = pools.get(world).run(cases.logits, timeout=600, source=str(zoo_model(MODEL)), layout=layout.to_dict())
    diffs = [d for d in out if d is not None]
    assert len(diffs) == 1 and diffs[0] < 1e-4, diffs


@pytest.mark.world(2)
def test_fp8_ue8m0_roundtrip_is_byte_exact(pools, zoo_model, tmp_path):
    """Power-of-two scales (``scale_fmt: ue8m0``, DeepSeek-V3.1) are kept as powers of two and the
    checkpoint comes back byte for byte, and its logits are transformers' on the dequantised view. (Fresh power-of-two scales alone would not do it: a block
    whose largest FP8 value rounded down to 224 gets half its scale back and every byte doubled,
    the same values -- measured 384 of 278528 FP8 bytes on this model before reference scales.)"""
    import shutil

    from mcore_bridge import zoo

    src = tmp_path / "ue8m0"
    shutil.copytree(zoo_model("deepseek_v3"), src)
    zoo.quantize_fp8_dir(src, [32, 48], scale_fmt="ue8m0")
    stored = HFCheckpoint(src)
    scales = [stored.read(n) for n in stored.names() if n.endswith(quant.SCALE_SUFFIX)]
    assert all(torch.equal(s, torch.exp2(torch.log2(s).round())) for s in scales)  # powers of two
    out, out8 = tmp_path / "bf16", tmp_path / "fp8"
    results = pools.get(2).run(fp8_cases.fp8_roundtrip, timeout=600, source=str(src),
                               layout=L(tp=2, sp=True, ep=2, etp=1).to_dict(), out_dir=str(out), out_fp8=str(out8))
    for r in results:
        assert r["default"]["mismatches"] == [] and r["fp8"]["other"] == [], r["rank"]
        assert r["fp8"]["payload_bytes_differing"] == 0 and r["fp8"]["scale_rel"] == 0.0, r["fp8"]
    saved8 = HFCheckpoint(out8)
    assert saved8.config["quantization_config"]["scale_fmt"] == "ue8m0"
    assert sorted(saved8.names()) == sorted(stored.names())
    assert all(cases.same_bytes(saved8.read(n), stored.read(n)) for n in stored.names())
    # and the model loaded from power-of-two scales computes what transformers computes on their view
    diffs = [d for d in pools.get(2).run(cases.logits, timeout=600, source=str(src),
                                         layout=L(tp=2, sp=True, ep=2, etp=1).to_dict()) if d is not None]
    assert len(diffs) == 1 and diffs[0] < 1e-4, diffs
