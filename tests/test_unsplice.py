"""Megatron -> HF by byte ranges (``mcore_bridge.unsplice``): the inverse of the transforms' row
runs gives what ``to_hf`` gives, a load that leaves whole records unread completes or reads what
it left, and an export that copies HF tensors file to file writes the very bytes of one that loads
the model -- over the families, layouts and both checkpoint formats, with a wrong run caught."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mcore_bridge import ParallelLayout as L
from mcore_bridge import splice, transforms as T, unsplice
from tests import unsplice_cases as uc
from tests.test_splice import CASES

torch.manual_seed(0)


def _runs_of(tensors: list[torch.Tensor], path: Path) -> list[splice.Runs]:
    """Each tensor's bytes at its place in one file, as Runs (a shard stored as one record)."""
    raw, runs = b"", []
    for t in tensors:
        data = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        runs.append(splice.Runs(t.dtype, tuple(t.shape), [(path, 7 + len(raw), len(data))]))
        raw += data
    path.write_bytes(b"header!" + raw)
    return runs


def _shards(transform, shapes, tp, full):
    local = transform.local_shape(shapes, tp)
    if local is None:  # the vocabulary: padded to a multiple of tp here
        local = (-(-shapes[0][0] // 8) * 8 // tp, *shapes[0][1:])
    out = []
    for rank in range(tp):
        regions = transform.slices(shapes, local, tp, rank)
        out.append(transform.to_mcore([full[i][r] for i, r in zip(transform.region_sources(len(regions)), regions)],
                                      local, tp, rank))
    return out


@pytest.mark.parametrize("transform,shapes,tp", CASES, ids=lambda v: repr(v) if isinstance(v, T.Transform) else None)
def test_hf_runs_give_what_to_hf_gives(tmp_path, transform, shapes, tp):
    full = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    shards = _shards(transform, shapes, tp, full)
    if not transform.tp_split:
        shards = shards[:1]
    got = unsplice.hf_runs(transform, shapes, _runs_of(shards, tmp_path / "records"), len(shards))
    assert got is not None, (transform, tp)
    want = transform.to_hf(shards, [tuple(s) for s in shapes])
    for g, w, f in zip(got, want, full):
        assert g.dtype == w.dtype and tuple(g.shape) == tuple(w.shape)
        assert torch.equal(g.read(), w) and torch.equal(w, f)


def test_what_is_not_whole_rows_has_no_runs(tmp_path):
    full = [torch.randn(8, 6)]
    shards = _shards(T.ROW, [(8, 6)], 2, full)  # a row-parallel split: each HF row is in both shards
    assert unsplice.hf_runs(T.ROW, [(8, 6)], _runs_of(shards, tmp_path / "a"), 2) is None
    one = _runs_of(_shards(T.COLUMN, [(8, 6)], 2, full), tmp_path / "b")
    assert unsplice.hf_runs(T.COLUMN, [(8, 6)], [one[0], None], 2) is None  # a shard left to load
    one[1].dtype = torch.float16
    assert unsplice.hf_runs(T.COLUMN, [(8, 6)], one, 2) is None  # shards of two dtypes
    stacked = _runs_of([torch.randn(2, 4, 4)], tmp_path / "c")
    assert unsplice.hf_runs(T.Stacked(2), [(4, 4), (4, 4)], stacked, 1) is None  # no row runs


def test_a_partly_deferred_tensor_is_read(tmp_path):
    """A tensor whose records are noted for only part of it is read there (no hole is left); one
    covered entirely becomes Runs; a window of no tensor, or of two aliases, is read as usual."""
    data = torch.arange(64, dtype=torch.int16)
    path = tmp_path / "records"
    path.write_bytes(b"x" * 10 + data.numpy().tobytes())
    part, whole = torch.full((64,), -1, dtype=torch.int16), torch.full((32,), -1, dtype=torch.int16)
    alias = torch.zeros(16, dtype=torch.int16)
    defer = unsplice.Deferred({"part": part, "whole": whole, "a": alias, "b": alias.view(4, 4)})
    assert defer.take(part[:32], path, 10)
    assert defer.take(whole[16:], path, 10 + 32 * 2) and defer.take(whole[:16], path, 10)
    assert not defer.take(alias, path, 10) and not defer.take(torch.zeros(4, dtype=torch.int16), path, 10)
    assert torch.equal(part, torch.full((64,), -1, dtype=torch.int16))  # nothing read yet
    spliced: dict = {}
    defer.finish(spliced)
    assert set(spliced) == {"whole"}
    assert torch.equal(part[:32], data[:32]) and torch.equal(part[32:], torch.full((32,), -1, dtype=torch.int16))
    assert torch.equal(spliced["whole"].read(), torch.cat([data[:16], data[32:48]]))
    state = {"whole": whole}
    unsplice.materialize(state, spliced)
    assert not spliced and torch.equal(whole, torch.cat([data[:16], data[32:48]]))


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.safetensors"))}


def _both_ways(pools, zoo_model, tmp_path, name, layout, fmt, swap_kv=False, world=None, export_dtype=None):
    src = zoo_model(name)
    res = pools.get(world or layout.min_world_size).run(uc.hf_both_ways, timeout=300, source=str(src),
                                                        layout=layout.to_dict(), out_dir=str(tmp_path), fmt=fmt,
                                                        swap_kv=swap_kv, export_dtype=export_dtype)
    loaded, spliced = _files(tmp_path / "loaded"), _files(tmp_path / "spliced")
    assert loaded and loaded.keys() == spliced.keys()
    differ = [f for f in loaded if loaded[f] != spliced[f]]
    assert not differ, f"{name} {layout.short()}: HF files copied from the checkpoint differ from the loaded ones: {differ}"
    assert (tmp_path / "loaded" / "model.safetensors.index.json").exists() == \
        (tmp_path / "spliced" / "model.safetensors.index.json").exists()
    return res


MATRIX = [("qwen3", L()), ("phi3", L()), ("deepseek_v3", L()), ("gpt_oss", L()), ("qwen3_next", L()),
          ("qwen3_5_moe", L()), ("gemma3", L()), ("glm4_moe_mtp", L()), ("internvl", L()), ("qwen2_vl", L()),
          ("qwen3", L(tp=2, sp=True)), ("phi3", L(tp=2)), ("qwen3_moe", L(ep=2)),
          ("mixtral", L(tp=2, ep=2, etp=1, sp=True)), ("llama", L(pp=2, vpp=2)), ("deepseek_v3", L(tp=2, pp=2)),
          ("qwen3", L(pp=2)), ("qwen2", L(tp=2)), ("deepseek_v3_fp8", L())]


@pytest.mark.parametrize("fmt", ["torch_dist", "plain"])
@pytest.mark.parametrize("name,layout", MATRIX, ids=[f"{n}-{lay.short()}" for n, lay in MATRIX])
def test_copied_hf_is_the_loaded_hf(pools, zoo_model, tmp_path, name, layout, fmt):
    res = _both_ways(pools, zoo_model, tmp_path, name, layout, fmt)
    copied = {p for r in res for p in r["copied"]}
    assert all(r["deferred"] for r in res), res  # every rank left records unread
    if name in ("deepseek_v3_fp8", "gpt_oss", "qwen3_5_moe"):
        return  # re-quantised (FP8) or stacked experts: what was left unread was read before the export
    assert any("layernorm" in p or "norm.weight" in p for p in copied), copied
    if name in ("qwen3", "phi3", "llama", "mixtral", "qwen2"):
        assert any("linear_qkv.weight" in p for p in copied) and any("linear_fc1.weight" in p for p in copied)
        assert any("embedding.word_embeddings.weight" in p for p in copied)  # the padding rows dropped
        # row-parallel shards at TP > 1: read from the files by the writing rank, not gathered
        assert any("linear_proj.weight" in p for p in copied) and any("linear_fc2.weight" in p for p in copied)


def test_data_parallel_replicas_copy_alike(pools, zoo_model, tmp_path):
    res = _both_ways(pools, zoo_model, tmp_path, "qwen3", L(tp=2, sp=True), "torch_dist", world=4)
    assert len(res) == 4 and all(r["copied"] == res[r["rank"] % 2]["copied"] and r["copied"] for r in res)


def test_an_export_dtype_other_than_the_records_casts_what_the_writer_reads(pools, zoo_model, tmp_path):
    """fp16 out of fp32 records: not a byte copy, so the writing rank reads the shards from the files
    and casts them (the loaded export's bytes); the model is still never filled."""
    res = _both_ways(pools, zoo_model, tmp_path, "qwen3", L(tp=2), "torch_dist", export_dtype=torch.float16)
    assert all(r["deferred"] and len(r["copied"]) == r["params"] for r in res), res


def test_a_wrong_run_is_caught(pools, zoo_model, tmp_path):
    """Negative control: q/k/v's inverse runs with k and v swapped write other bytes, which the
    comparison sees (in the copied files only: the loaded ones are exported from the model)."""
    with pytest.raises(AssertionError, match="differ from the loaded ones"):
        _both_ways(pools, zoo_model, tmp_path, "qwen3", L(), "torch_dist", swap_kv=True)


def test_the_cli_round_trip_copies_and_gives_the_source(zoo_model, tmp_path):
    """HF -> torch_dist -> HF through the CLI at TP2 on 2 processes: the source's bytes come back,
    and the command says how many parameters went file to file."""
    from tests.test_cli import assert_same_weights, run_cli

    src, mcore, back = zoo_model("qwen3"), tmp_path / "mcore", tmp_path / "back"
    r = run_cli("export", "--model", src, "--to-mcore", "--tp", "2", "--sp", "--nproc-per-node", "2",
                "--save", mcore, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("export", "--load", mcore, "--to-hf", "--tp", "2", "--nproc-per-node", "2", "--save", back,
                "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "parameters written from the source files' bytes" in r.stdout + r.stderr, r.stdout
    assert_same_weights(Path(src), back)
    assert not os.path.exists(str(back) + ".partial")
