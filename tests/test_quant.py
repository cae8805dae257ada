"""Quantised checkpoints (``mcore_bridge.quant``): blockwise FP8 and MXFP4 read as bf16 views.

References are independent of the library: FP8 dequantisation written here element by element
(DeepSeek's ``weight_dequant``: fp8 * scale_inv of the element's block, fp32, then bf16), MXFP4
decoding checked against transformers' own ``convert_moe_packed_tensors`` on tensors encoded by a
hand-written encoder below. Bad input must fail with a CheckpointError naming the tensor."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from mcore_bridge import quant
from mcore_bridge.errors import CheckpointError, UsageError
from mcore_bridge.hf_io import HFCheckpoint
from tests import cases

BLOCK = (4, 6)


def fp8_dir(path, tensors: dict, block=BLOCK, **qcfg):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    q = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    q.update(qcfg)
    (path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "quantization_config": q}))
    return path


def ref_dequant(q: torch.Tensor, s: torch.Tensor, block) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(q.shape[0]):
        for j in range(q.shape[1]):
            out[i, j] = q[i, j].float() * s[i // block[0], j // block[1]]
    return out.to(torch.bfloat16)


def sample(rows=10, cols=15, block=BLOCK, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(rows, cols, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand(math.ceil(rows / block[0]), math.ceil(cols / block[1]), generator=g) + 0.01
    return q, s


@pytest.fixture
def fp8_ckpt(tmp_path):
    q, s = sample()
    plain = torch.randn(7, 3)
    d = fp8_dir(tmp_path / "fp8", {"a.weight": q, "a.weight_scale_inv": s, "norm.weight": plain})
    return d, q, s, plain


def test_fp8_view_dequantises_blockwise_with_partial_edge_blocks(fp8_ckpt):
    d, q, s, plain = fp8_ckpt
    view = quant.open_quantized(HFCheckpoint(d))
    assert sorted(view.names()) == ["a.weight", "norm.weight"]  # the scale is hidden ...
    assert view.consumed == {"a.weight_scale_inv"}  # ... and counted as used
    assert view.info("a.weight").dtype == torch.bfloat16 and tuple(view.info("a.weight").shape) == (10, 15)
    ref = ref_dequant(q, s, BLOCK)
    assert cases.same_bytes(view.read("a.weight"), ref)
    for region in [(slice(3, 9), slice(None)), (slice(None), slice(5, 13)), (slice(1, 2), slice(7, 15)),
                   (slice(8, 10), slice(0, 1))]:  # regions starting and ending mid-block
        assert cases.same_bytes(view.read("a.weight", region), ref[region]), region
    assert torch.equal(view.read("norm.weight"), plain)
    # negative control: every scale differs, so a region given the wrong block's scale shows
    assert len(set(s.flatten().tolist())) == s.numel()


def test_fp8_reads_only_the_regions_rows_and_the_scales_covering_them(fp8_ckpt):
    d, *_ = fp8_ckpt
    view = quant.open_quantized(HFCheckpoint(d))
    with cases.spied_reads() as reads:
        view.read("a.weight", (slice(5, 9), slice(None)))  # rows 5..8 -> scale rows 1..2
        view.read("a.weight", (slice(None), slice(7, 12)))  # cols 7..11 -> scale col 1
    got = [(n, tuple((r.start, r.stop) for r in reg)) for n, reg in reads]
    assert got == [("a.weight", ((5, 9), (0, 15))), ("a.weight_scale_inv", ((1, 3), (0, 3))),
                   ("a.weight", ((0, 10), (7, 12))), ("a.weight_scale_inv", ((0, 3), (1, 2)))]
    # bytes: fp8 rows of the region (1 byte each) + 4-byte scales of the covering blocks only
    fp8_bytes = 4 * 15 + 10 * 5
    scale_bytes = 4 * (2 * 3 + 3 * 1)
    counted = sum(math.prod(r.stop - r.start for r in reg) * (1 if n == "a.weight" else 4) for n, reg in reads)
    assert counted == fp8_bytes + scale_bytes
    assert counted < 2 * (10 * 15 + 4 * 9)  # less than the two whole tensors twice


@pytest.mark.parametrize("damage, needle", [
    ("missing_scale", "a.weight: an FP8 tensor without its 'a.weight_scale_inv'"),
    ("orphan_scale", "b.weight_scale_inv: a block scale without its weight"),
    ("misshaped_scale", "a.weight_scale_inv: shape (2, 3) does not fit weight 'a.weight' (10, 15)"),
    ("block_mismatch", "a.weight_scale_inv: shape (3, 3) does not fit weight 'a.weight' (10, 15) with "
                       "weight_block_size [5, 6]"),
    ("bad_block", "weight_block_size=[128]"),
    ("static_acts", "activation_scheme='static'"),
])
def test_fp8_bad_input_names_the_tensor_and_writes_nothing(damage, needle, tmp_path):
    q, s = sample()
    tensors = {"a.weight": q, "a.weight_scale_inv": s}
    block, extra = BLOCK, {}
    if damage == "missing_scale":
        del tensors["a.weight_scale_inv"]
    elif damage == "orphan_scale":
        tensors["b.weight_scale_inv"] = s.clone()
    elif damage == "misshaped_scale":
        tensors["a.weight_scale_inv"] = s[:2]
    elif damage == "block_mismatch":
        block = (5, 6)  # 10 rows in blocks of 5 need 2 scale rows, the file has 3
    elif damage == "bad_block":
        extra = {"weight_block_size": [128]}
    elif damage == "static_acts":
        extra = {"activation_scheme": "static"}
    d = fp8_dir(tmp_path / "bad", tensors, block, **extra)
    with pytest.raises(CheckpointError) as e:
        quant.open_quantized(HFCheckpoint(d))
    assert needle in str(e.value)


def test_fp8_quantiser_matches_the_published_recipe():
    """scale = block amax / 448, fp8 = w / scale (round to nearest), partial blocks on their own."""
    w = torch.randn(10, 15) * 3
    w[0:4, 0:6] = 0.0  # an all-zero block keeps finite values
    q, s = quant.quantize_fp8(w, BLOCK)
    assert q.dtype == torch.float8_e4m3fn and tuple(s.shape) == (3, 3)
    for bi in range(3):
        for bj in range(3):
            blk = w[bi * 4:(bi + 1) * 4, bj * 6:(bj + 1) * 6]
            amax = float(blk.abs().max())
            want = amax / 448.0 if amax > 0 else 1.0
            assert float(s[bi, bj]) == pytest.approx(want, rel=1e-7)
            ref = (blk / torch.tensor(want, dtype=torch.float32)).to(torch.float8_e4m3fn)
            assert torch.equal(q[bi * 4:(bi + 1) * 4, bj * 6:(bj + 1) * 6].view(torch.uint8), ref.view(torch.uint8))
    assert float(q.float().abs().max()) == 448.0  # every non-zero block reaches the fp8 maximum
    err = (ref_dequant(q, s, BLOCK).float() - w).abs()
    assert float(err.max()) <= float(s.max()) * 16 + 1e-6  # e4m3: half an ulp at 448 is 16


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("pow2", [False, True])
def test_fp8_buckets_quantise_same_shaped_tensors_as_one_stack_with_the_same_bytes(pow2):
    """A bucket's same-shaped planned tensors (a layer's experts) can be quantised as one stack (the
    default on a GPU; one by one on a CPU): the bytes and scales equal quantising each alone (partial edge blocks, an all-zero block, bf16);
    a tensor with reference scales, a lone shape and an unplanned tensor take their own paths."""
    g = torch.Generator().manual_seed(1)
    experts = [(torch.randn(10, 15, generator=g) * (e + 1)).to(torch.bfloat16) for e in range(5)]
    experts[2][0:4, 0:6] = 0
    lone, kept = torch.randn(9, 7, generator=g).to(torch.bfloat16), torch.randn(3, 3, generator=g)
    ref_name = "e.1"  # its source scales: kept where they represent the block exactly
    ref_q, ref_s = quant.quantize_fp8(experts[1], BLOCK, pow2)
    experts[1] = ref_dequant(ref_q, ref_s, BLOCK)
    tensors = [(f"e.{i}", t) for i, t in enumerate(experts)] + [("lone", lone), ("norm", kept)]
    names = {n for n, _ in tensors} - {"norm"}
    plan = (names, BLOCK, {"scale_fmt": "ue8m0"} if pow2 else {}, lambda n: ref_s if n == ref_name else None)
    calls, real = [], quant.quantize_fp8

    def counted(w, *a, **k):
        calls.append(tuple(w.shape))
        return real(w, *a, **k)
    quant.quantize_fp8 = counted
    try:
        ((bucket, out, buf),) = list(quant.quantize_buckets([("b", tensors, "packed")], plan, stack=True))
        assert sorted(calls) == [(4, 10, 15), (9, 7), (10, 15)], calls  # the four fresh experts as one stack
        calls.clear()
        cap, quant.STACK_ELEMENTS = quant.STACK_ELEMENTS, 2 * 10 * 15  # stacks of at most two
        try:
            ((_, capped, _),) = list(quant.quantize_buckets([("b", tensors, "packed")], plan, stack=True))
        finally:
            quant.STACK_ELEMENTS = cap
        assert sorted(calls) == [(2, 10, 15), (2, 10, 15), (9, 7), (10, 15)], calls
        assert all(_same_bytes(a, b) for (_, a), (_, b) in zip(capped, out))
        calls.clear()
        ((_, alone, _),) = list(quant.quantize_buckets([("b", tensors, "packed")], plan))  # CPU: one by one
        assert len(calls) == 6 and all(_same_bytes(a, b) for (_, a), (_, b) in zip(alone, out)), calls
    finally:
        quant.quantize_fp8 = real
    assert bucket == "b" and buf is None
    assert [n for n, _ in out] == [x for n, _ in tensors for x in ((n,) if n == "norm" else (n, n + quant.SCALE_SUFFIX))]
    got = dict(out)
    for n, t in tensors:
        if n == "norm":
            assert got[n] is t
            continue
        q, s = quant.quantize_fp8(t, BLOCK, pow2, ref_s if n == ref_name else None)
        assert torch.equal(got[n].view(torch.uint8), q.view(torch.uint8)), n
        assert torch.equal(got[n + quant.SCALE_SUFFIX], s), n
    assert torch.equal(got[ref_name + quant.SCALE_SUFFIX], ref_s)  # the source's scales, not fresh ones
    with pytest.raises(ValueError, match="single 2-D"):
        quant.quantize_fp8(torch.stack(experts), BLOCK, reference=ref_s)


def test_fp8_requantising_dequantised_weights_fresh_and_with_reference_scales():
    """What FP8 -> bf16 -> FP8 gives. Fresh scales: every FP8 byte comes back (the bf16 product
    is within 2^-9 of q * s, far inside e4m3's half ulp of 2^-4) but a scale moves by up to 2^-8
    (bf16 keeps 8 significant bits of the block maximum 448 * s). With the source's scales as
    reference: byte-exact; a block whose values changed gets a fresh scale, the others keep theirs."""
    w = torch.randn(70, 100) * 0.02
    q, s = quant.quantize_fp8(w, (32, 48))
    deq = quant.dequantize_fp8(q, s, (32, 48))  # bf16, as the view presents it
    q2, s2 = quant.quantize_fp8(deq, (32, 48))
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    rel = float(((s2 - s) / s).abs().max())
    assert 0 < rel <= 2.0 ** -8, rel  # measured ~3.7e-3 on the zoo model
    q3, s3 = quant.quantize_fp8(deq, (32, 48), reference=s)
    assert torch.equal(q3.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s3, s)
    changed = deq.clone()
    assert changed[40, 60] != 0
    changed[40, 60] *= 1 + 2 ** -6  # needs 6 significant bits: block (1, 1) is off its e4m3 grid
    q4, s4 = quant.quantize_fp8(changed, (32, 48), reference=s)
    kept = torch.ones_like(s, dtype=torch.bool)
    kept[1, 1] = False
    assert torch.equal(s4[kept], s[kept]) and s4[1, 1] != s[1, 1]
    # control: a wrong reference (scaled by 3) is never kept
    _, s5 = quant.quantize_fp8(deq, (32, 48), reference=s * 3)
    assert not torch.equal(s5, s * 3) and torch.equal(s5, s2)


def test_export_plan_and_config():
    tensors = {"model.embed_tokens.weight": ((10, 4), torch.bfloat16), "lm_head.weight": ((10, 4), torch.bfloat16),
               "model.layers.0.input_layernorm.weight": ((4,), torch.bfloat16),
               "model.layers.0.mlp.gate.weight": ((8, 4), torch.bfloat16),
               "model.layers.0.mlp.shared_expert_gate.weight": ((1, 4), torch.bfloat16),
               "model.layers.0.mlp.experts.0.gate_proj.weight": ((6, 4), torch.bfloat16),
               "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": ((6, 4), torch.bfloat16),
               "model.layers.0.self_attn.q_a_layernorm.weight": ((4,), torch.bfloat16)}
    dtype, plan = quant.export_plan(None, tensors, {"model_type": "x"}, "fp8")
    assert dtype is None and plan[1] == (128, 128)
    assert plan[0] == {"model.layers.0.mlp.experts.0.gate_proj.weight",
                       "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"}
    cfg = quant.export_config({"model_type": "x", "quantization_config": {"quant_method": "fp8"}}, None)
    assert "quantization_config" not in cfg
    assert quant.export_config({"model_type": "x"}, plan)["quantization_config"] == quant.DEFAULT_FP8_CONFIG
    assert quant.export_plan(None, tensors, {}, torch.bfloat16) == (torch.bfloat16, None)
    with pytest.raises(UsageError, match="mxfp4 is refused"):
        quant.export_plan(None, tensors, {}, "mxfp4")


# -- MXFP4 ---------------------------------------------------------------------------------------
def encode_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-written encoder: ``w [E, R, C]`` whose 32-blocks are exact e2m1 multiples of a power
    of two -> blocks ``[E, R, C/32, 16]`` (low nibble = even element) and e8m0 scales."""
    codes = {v: i for i, v in enumerate(quant.FP4_VALUES) if i != 8}  # -0.0 encoded as +0.0
    e, r, c = w.shape
    g = c // 32
    blocks = torch.zeros(e, r, g, 16, dtype=torch.uint8)
    scales = torch.zeros(e, r, g, dtype=torch.uint8)
    for idx in range(e * r * g):
        ei, ri, gi = idx // (r * g), idx // g % r, idx % g
        vals = w[ei, ri, gi * 32:(gi + 1) * 32]
        amax = float(vals.abs().max())
        exp = 0 if amax == 0 else math.ceil(math.log2(amax / 6.0))
        scales[ei, ri, gi] = exp + 127
        nib = [codes[float(v) / 2.0 ** exp] for v in vals]
        for k in range(16):
            blocks[ei, ri, gi, k] = nib[2 * k] | (nib[2 * k + 1] << 4)
    return blocks, scales


def mx_sample(e=3, r=5, c=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([v for v in quant.FP4_VALUES if v != -0.0])
    vals = grid[torch.randint(0, len(grid), (e, r, c), generator=g)]
    exps = torch.randint(-4, 4, (e, r, c // 32), generator=g).repeat_interleave(32, -1)
    vals[..., ::32] = 6.0  # each block reaches the top code, so its exponent is determined
    return vals * torch.pow(2.0, exps.float())


@pytest.fixture
def mx_ckpt(tmp_path):
    w = {"gate_up_proj": mx_sample(seed=1), "down_proj": mx_sample(r=4, c=96, seed=2)}  # [E, out, in]
    tensors = {"model.layers.0.mlp.router.weight": torch.randn(3, 64)}
    for p, t in w.items():
        b, s = encode_mxfp4(t)
        tensors[f"model.layers.0.mlp.experts.{p}_blocks"], tensors[f"model.layers.0.mlp.experts.{p}_scales"] = b, s
    d = tmp_path / "mx"
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "gpt_oss", "quantization_config": {
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router"]}}))
    return d, w, tensors


def test_mxfp4_view_matches_transformers_dequantisation(mx_ckpt):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    d, w, tensors = mx_ckpt
    view = quant.open_quantized(HFCheckpoint(d))
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert sorted(view.names()) == ["model.layers.0.mlp.experts.down_proj", name, "model.layers.0.mlp.router.weight"]
    assert len(view.consumed) == 4
    for p in ("gate_up_proj", "down_proj"):
        n = f"model.layers.0.mlp.experts.{p}"
        ref = convert_moe_packed_tensors(tensors[n + "_blocks"], tensors[n + "_scales"], dtype=torch.bfloat16)
        got = view.read(n)
        assert tuple(view.info(n).shape) == tuple(ref.shape) == tuple(w[p].transpose(1, 2).shape)
        assert cases.same_bytes(got, ref), p
        assert torch.equal(got.float(), w[p].transpose(1, 2))  # the encoder's values, exactly
        for region in [(slice(1, 2), slice(None), slice(None)), (slice(None), slice(20, 50), slice(1, 4))]:
            assert cases.same_bytes(view.read(n, region), ref[region]), (p, region)
    with cases.spied_reads() as reads:  # in cols 20..50 -> 32-blocks 0..1; out rows 1..4
        view.read(name, (slice(2, 3), slice(40, 60), slice(1, 4)))
    assert [(n.rsplit(".", 1)[1], tuple((r.start, r.stop) for r in reg[:3])) for n, reg in reads] == [
        ("gate_up_proj_blocks", ((2, 3), (1, 4), (1, 2))), ("gate_up_proj_scales", ((2, 3), (1, 4), (1, 2)))]


def test_mxfp4_nibble_order_is_a_real_check(mx_ckpt):
    """Negative control: swapping the nibbles changes the decoded values."""
    d, w, tensors = mx_ckpt
    b = tensors["model.layers.0.mlp.experts.down_proj_blocks"]
    swapped = ((b & 0x0F) << 4) | (b >> 4)
    vals = quant.dequantize_mxfp4(swapped, tensors["model.layers.0.mlp.experts.down_proj_scales"])
    assert not torch.equal(vals, w["down_proj"])


@pytest.mark.parametrize("drop", ["_scales", "_blocks"])
def test_mxfp4_half_a_pair_is_named(mx_ckpt, tmp_path, drop):
    _, _, tensors = mx_ckpt
    tensors = {n: t for n, t in tensors.items() if not n.endswith("down_proj" + drop)}
    d = tmp_path / "bad"
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "gpt_oss",
                                               "quantization_config": {"quant_method": "mxfp4"}}))
    other = "_blocks" if drop == "_scales" else "_scales"
    with pytest.raises(CheckpointError, match=f"model.layers.0.mlp.experts.down_proj{other}: MXFP4"):
        quant.open_quantized(HFCheckpoint(d))


def test_unknown_quant_method_is_refused(tmp_path):
    d = fp8_dir(tmp_path / "gptq", {"a.weight": torch.zeros(2, 2)})
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(CheckpointError, match="quant_method='gptq' is not supported"):
        quant.open_quantized(HFCheckpoint(d))


def test_the_reference_shares_one_dequantised_copy_and_removes_it(fp8_ckpt, tmp_path):
    """verify's fp32, fp64 and bf16 references read one dequantised copy (on an H200 three copies of a
    reduced DeepSeek-V3 filled a 64 GB disk); a second source replaces it; it is a faithful copy."""
    from verify import forward

    d, q, s, plain = fp8_ckpt
    forward._DEQUANTISED.clear()
    with forward.reference_dir(d) as a:
        made = (a / "model.safetensors").stat().st_mtime_ns
    with forward.reference_dir(d) as b:
        assert b == a and (b / "model.safetensors").stat().st_mtime_ns == made
        copy = HFCheckpoint(b)
        assert torch.equal(copy.read("a.weight"), ref_dequant(q, s, BLOCK))
        assert torch.equal(copy.read("norm.weight"), plain) and "quantization_config" not in copy.config
    other = fp8_dir(tmp_path / "other", {"a.weight": q, "a.weight_scale_inv": s})
    with forward.reference_dir(other) as c:
        assert c != a and c.exists()
    assert not a.exists(), "the first source's copy stays on disk beside the second"
    forward._DEQUANTISED.popitem()[1].cleanup()


def test_a_dequantised_copy_that_cannot_fit_is_refused_before_writing(fp8_ckpt, monkeypatch):
    import errno
    import shutil
    import tempfile
    from pathlib import Path

    from mcore_bridge.errors import WriteError
    from verify import forward

    d = fp8_ckpt[0]
    real = shutil.disk_usage
    monkeypatch.setattr(quant.shutil, "disk_usage", lambda p: real(p)._replace(free=100))
    before = set(Path(tempfile.gettempdir()).glob("mcore-bridge-dequantised-*"))
    forward._DEQUANTISED.clear()
    with pytest.raises(WriteError) as e:
        with forward.reference_dir(d):
            pass
    assert e.value.errno == errno.ENOSPC
    assert "needs 0.0 GB" in str(e.value) and "TMPDIR" in str(e.value), str(e.value)
    assert not forward._DEQUANTISED
    assert not set(Path(tempfile.gettempdir()).glob("mcore-bridge-dequantised-*")) - before, "a partial copy was left"
