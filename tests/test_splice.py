"""HF -> plain by byte ranges (``mcore_bridge.splice``): the transforms' row runs give what
``to_mcore`` gives, and a conversion that copies file to file writes the very bytes of one that
loads the model and writes it out -- over the families and layouts, with a wrong run caught."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from mcore_bridge import ParallelLayout as L
from mcore_bridge import splice, transforms as T
from tests import splice_cases as sc

torch.manual_seed(0)


def _assemble(transform, pieces, local, tp, rank):
    runs = transform.row_runs([p.shape[0] for p in pieces], local, tp, rank)
    assert runs is not None
    parts = [pieces[i][a:b] if i is not None else pieces[0].new_zeros((b - a, *local[1:])) for i, a, b in runs]
    return torch.cat(parts)


CASES = [  # transform, HF shapes, tp
    (T.REPLICATED, [(6, 4)], 1), (T.REPLICATED, [(6,)], 2), (T.COLUMN, [(8, 3)], 2), (T.COLUMN, [(8,)], 4),
    (T.VOCAB, [(10, 4)], 1), (T.VOCAB, [(10, 4)], 4), (T.VOCAB, [(16, 4)], 2),
    (T.QKV(heads=8, groups=2, head_dim=3), [(24, 5), (6, 5), (6, 5)], 1),
    (T.QKV(heads=8, groups=4, head_dim=2), [(16,), (8,), (8,)], 2),
    (T.QKV(heads=4, groups=4, head_dim=2), [(8, 3), (8, 3), (8, 3)], 4),
    (T.FusedQKV(heads=8, groups=2, head_dim=3), [(36, 5)], 2),
    (T.GATED_MLP, [(8, 3), (8, 3)], 2), (T.FUSED_GATED_MLP, [(16, 3)], 1), (T.FUSED_GATED_MLP, [(16, 3)], 4),
]


@pytest.mark.parametrize("transform,shapes,tp", CASES, ids=lambda v: repr(v) if isinstance(v, T.Transform) else None)
def test_row_runs_give_what_to_mcore_gives(transform, shapes, tp):
    full = [torch.randn(s) for s in shapes]
    for rank in range(tp):
        local = transform.local_shape(shapes, tp)
        if local is None:  # the vocabulary: padded to a multiple of tp here
            local = (-(-shapes[0][0] // 8) * 8 // tp, *shapes[0][1:])
        regions = transform.slices(shapes, local, tp, rank)
        pieces = [full[i][r] for i, r in zip(transform.region_sources(len(regions)), regions)]
        want = transform.to_mcore(pieces, local, tp, rank)
        assert torch.equal(_assemble(transform, pieces, local, tp, rank), want), (transform, tp, rank)


def test_transforms_that_are_not_rows_have_no_runs():
    blocks = T.Blocks(T.COLUMN, 2) if hasattr(T, "Blocks") else None
    for t in [T.Stacked(2), T.Shared(2), T.Copies(T.COLUMN, 2)] + ([blocks] if blocks else []):
        assert t.row_runs([4, 4], (8, 4), 1, 0) is None, t


def _files(d: Path) -> dict:
    """The weight files: plain's safetensors, torch_dist's records and common state (its ``.metadata``
    names the directory it was written to)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.suffix in (".safetensors", ".distcp") or p.name == "common.pt"}


def _both_ways(pools, zoo_model, tmp_path, name, layout, swap_kv=False, fmt="plain", world=None):
    src = zoo_model(name)
    res = pools.get(world or layout.min_world_size).run(sc.plain_both_ways, timeout=300, source=str(src),
                                               layout=layout.to_dict(), out_dir=str(tmp_path), swap_kv=swap_kv,
                                               fmt=fmt)
    loaded, spliced = _files(tmp_path / "loaded"), _files(tmp_path / "spliced")
    assert loaded and loaded.keys() == spliced.keys()
    differ = [f for f in loaded if loaded[f] != spliced[f]]
    assert not differ, f"{name} {layout.short()}: spliced files differ from the loaded ones: {differ}"
    return res


MATRIX = [("qwen3", L()), ("phi3", L()), ("deepseek_v3", L()), ("gpt_oss", L()), ("qwen3_next", L()),
          ("qwen3_5_moe", L()), ("gemma3", L()), ("glm4", L()), ("internvl", L()),
          ("qwen3", L(tp=2, sp=True)), ("phi3", L(tp=2)), ("qwen3_moe", L(ep=2)), ("mixtral", L(tp=2, ep=2, etp=1, sp=True)),
          ("llama", L(pp=2, vpp=2)), ("deepseek_v3", L(tp=2, pp=2)),
          ("qwen3", L(pp=2)), ("qwen2", L(tp=2)), ("deepseek_v3_fp8", L())]


@pytest.mark.parametrize("name,layout", MATRIX, ids=[f"{n}-{lay.short()}" for n, lay in MATRIX])
def test_spliced_plain_is_the_loaded_plain(pools, zoo_model, tmp_path, name, layout):
    res = _both_ways(pools, zoo_model, tmp_path, name, layout)
    spliced = {p for r in res for p in r["spliced"]}
    assert spliced, "nothing was spliced"
    assert any("embedding.word_embeddings.weight" in p for p in spliced)  # vocabulary 1000: zero padding rows
    if name in ("qwen3", "phi3", "llama", "mixtral"):
        assert any("linear_qkv.weight" in p for p in spliced) and any("linear_fc1.weight" in p for p in spliced)


DIST = [("qwen3", L()), ("phi3", L()), ("deepseek_v3", L()), ("gpt_oss", L()), ("qwen3_next", L()),
        ("qwen3_5_moe", L()), ("gemma3", L()), ("glm4_moe_mtp", L()), ("internvl", L()), ("qwen2_vl", L()),
        ("qwen3", L(tp=2, sp=True)), ("phi3", L(tp=2)), ("qwen3_moe", L(ep=2)),
        ("mixtral", L(tp=2, ep=2, etp=1, sp=True)), ("llama", L(pp=2, vpp=2)), ("deepseek_v3", L(tp=2, pp=2)),
        ("qwen3", L(pp=2)), ("qwen2", L(tp=2)), ("deepseek_v3_fp8", L())]


@pytest.mark.parametrize("name,layout", DIST, ids=[f"{n}-{lay.short()}" for n, lay in DIST])
def test_spliced_torch_dist_is_the_loaded_torch_dist(pools, zoo_model, tmp_path, name, layout):
    res = _both_ways(pools, zoo_model, tmp_path, name, layout, fmt="torch_dist")
    spliced = {p for r in res for p in r["spliced"]}
    assert any("linear_proj.weight" in p or "layernorm" in p for p in spliced), spliced
    if "mtp" not in name:  # an MTP model's embedding is read twice and compared (Copies): loaded
        assert any("embedding.word_embeddings.weight" in p for p in spliced)
    if name in ("qwen3", "phi3", "llama", "mixtral"):  # SwiGLU's sharded halves are windows of linear_fc1
        assert any("linear_qkv.weight" in p for p in spliced) and any("linear_fc1.weight" in p for p in spliced)


@pytest.mark.parametrize("fmt", ["plain", "torch_dist"])
def test_data_parallel_replicas_splice_alike(pools, zoo_model, tmp_path, fmt):
    """4 processes at TP2: two replicas of every shard (plain: the first writes; torch_dist: one
    replica's records are written, DCP deduplicates)."""
    res = _both_ways(pools, zoo_model, tmp_path, "qwen3", L(tp=2, sp=True), fmt=fmt, world=4)
    assert len(res) == 4 and all(r["spliced"] == res[r["rank"] % 2]["spliced"] for r in res)


def test_a_tensor_computed_from_the_model_is_refused_before_writing(pools, zoo_model, tmp_path):
    res = pools.get(2).run(sc.derived_tensor_refused, timeout=300, source=str(zoo_model("qwen3")),
                           layout=L(tp=2, sp=True).to_dict(), out_dir=str(tmp_path))
    for r in res:
        assert r["spliced"] and r["error"] and not r["left"], r
    assert any("views no parameter" in r["error"] for r in res)  # the rank that saw it says what it was
    assert (tmp_path / "ckpt" / "release").is_dir()  # and the save after loading everything wrote it


def test_a_wrong_run_is_caught(pools, zoo_model, tmp_path):
    """Negative control: q/k/v runs with k and v swapped write other bytes, which the comparison sees
    (in the spliced file only: the loaded one is written from the model)."""
    with pytest.raises(AssertionError, match="spliced files differ"):
        _both_ways(pools, zoo_model, tmp_path, "qwen3", L(), swap_kv=True)


def test_without_kernel_copy_the_bytes_are_read_and_written(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.write_bytes(bytes(range(256)) * 1000)
    runs = [(src, 10, 1000), (None, 0, 7), (src, 5000, 3)]
    want = (bytes(range(256)) * 1000)[10:1010] + bytes(7) + (bytes(range(256)) * 1000)[5000:5003]
    for kernel in (True, False):
        if not kernel:
            def refuse(*a):
                raise OSError(errno.EXDEV, "cross-device")
            monkeypatch.setattr(os, "copy_file_range", refuse)
        out = tmp_path / f"out{kernel}"
        fd = os.open(out, os.O_WRONLY | os.O_CREAT)
        try:
            os.write(fd, b"head")
            splice.write_runs(fd, runs)
        finally:
            os.close(fd)
        assert out.read_bytes() == b"head" + want
    as_tensor = splice.Runs(torch.uint8, (len(want),), runs).read()  # the values, for a caller that needs them
    assert bytes(as_tensor.numpy()) == want


def test_a_source_that_ends_early_is_an_error(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"x" * 100)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="ended 50 bytes early"):
            splice.write_runs(fd, [(src, 50, 100)])
    finally:
        os.close(fd)


def test_the_cli_loads_everything_when_a_rank_cannot_splice(zoo_model, tmp_path):
    """``export --to-mcore`` (torch_dist, TP2) with rank 1 finding a tensor it cannot write from the
    source files (``MCORE_BRIDGE_FAULT=rank:1:splice:raise``): the command says so, loads every
    parameter, writes the checkpoint, and that checkpoint converts back to the source's bytes."""
    from tests.test_cli import assert_same_weights, run_cli

    src, mcore, back = zoo_model("qwen3"), tmp_path / "mcore", tmp_path / "back"
    r = run_cli("export", "--model", src, "--to-mcore", "--tp", "2", "--sp", "--nproc-per-node", "2",
                "--save", mcore, "--device", "cpu", env={"MCORE_BRIDGE_FAULT": "rank:1:splice:raise"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "not possible here" in r.stdout + r.stderr and "loading every parameter" in r.stdout + r.stderr
    r = run_cli("export", "--model", src, "--load", mcore, "--to-hf", "--save", back, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(Path(src), back)
