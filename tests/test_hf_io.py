"""Safetensors I/O (mcore_bridge.hf_io): the lazy reader over single-file and indexed checkpoints,
integrity errors, the shard planner, and the atomic destination handling."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mcore_bridge import hf_io as hfio
from mcore_bridge.hf_io import CheckpointError, HFCheckpoint, plan_shards

CONFIG = {"model_type": "llama", "num_hidden_layers": 1}


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 4, generator=g),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(8, generator=g),
        "model.layers.0.mlp.gate_proj.weight": torch.randn(6, 4, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(4, generator=g).to(torch.float16),
        "steps": torch.arange(5, dtype=torch.int64),
    }


def _write_single(d: Path, tensors, config=CONFIG):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(d / "model.safetensors"))
    return d


def _write_indexed(d: Path, tensors, groups, config=CONFIG):
    """``groups``: list of name lists, one per file."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    weight_map = {}
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(d / fname))
        weight_map.update({n: fname for n in names})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def _assert_reads_everything(ckpt: HFCheckpoint, tensors):
    assert sorted(ckpt.names()) == sorted(tensors)
    for name, t in tensors.items():
        info = ckpt.info(name)
        assert info.shape == tuple(t.shape) and info.dtype == t.dtype
        assert info.nbytes == t.numel() * t.element_size()
        got = ckpt.read(name)
        assert got.dtype == t.dtype and torch.equal(got, t)


def test_single_file(tmp_path):
    tensors = _tensors()
    ckpt = HFCheckpoint(_write_single(tmp_path / "m", tensors))
    assert ckpt.config == CONFIG
    _assert_reads_everything(ckpt, tensors)
    assert {i.file.name for i in ckpt.tensors.values()} == {"model.safetensors"}
    ckpt.close()


def test_indexed_multi_file(tmp_path):
    tensors = _tensors(1)
    names = list(tensors)
    groups = [names[:2], names[2:3], names[3:]]
    ckpt = HFCheckpoint(_write_indexed(tmp_path / "m", tensors, groups))
    _assert_reads_everything(ckpt, tensors)
    for i, g in enumerate(groups):  # each tensor is found in the file the index names
        for n in g:
            assert ckpt.info(n).file.name == f"model-{i + 1:05d}-of-00003.safetensors"


def test_unindexed_multi_file(tmp_path):
    tensors = _tensors(2)
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    names = list(tensors)
    save_file({n: tensors[n] for n in names[:3]}, str(d / "a.safetensors"))
    save_file({n: tensors[n] for n in names[3:]}, str(d / "b.safetensors"))
    _assert_reads_everything(HFCheckpoint(d), tensors)


@st.composite
def tensor_and_region(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 6)) for _ in range(ndim))
    region = []
    for s in shape:
        a = draw(st.integers(0, s))
        b = draw(st.integers(a, s))
        region.append(draw(st.sampled_from([slice(None), slice(a, b)])))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.int32]))
    return shape, tuple(region), dtype


@settings(max_examples=40, deadline=None)
@given(case=tensor_and_region())
def test_read_region_equals_full_read_slice(tmp_path_factory, case):
    shape, region, dtype = case
    d = tmp_path_factory.mktemp("ckpt")
    t = (torch.arange(int(torch.tensor(shape).prod())) - 7).reshape(shape).to(dtype)
    other = torch.randn(3, 3)
    _write_indexed(d, {"t": t, "other": other}, [["other"], ["t"]])
    ckpt = HFCheckpoint(d)
    part = ckpt.read("t", region)
    assert torch.equal(part, ckpt.read("t")[region])
    assert torch.equal(part, t[region])


# ---- integrity errors ---------------------------------------------------------------------------

def _truncate(path: Path, keep: int):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def test_truncated_file_tail(tmp_path):
    d = _write_single(tmp_path / "m", _tensors())
    f = d / "model.safetensors"
    _truncate(f, f.stat().st_size - 3)
    with pytest.raises(CheckpointError) as e:
        HFCheckpoint(d)
    assert str(f) in str(e.value) and "truncated" in str(e.value)


def test_truncated_inside_header(tmp_path):
    d = _write_single(tmp_path / "m", _tensors())
    f = d / "model.safetensors"
    (n,) = struct.unpack("<Q", f.read_bytes()[:8])
    _truncate(f, 8 + n // 2)
    with pytest.raises(CheckpointError) as e:
        HFCheckpoint(d)
    assert str(f) in str(e.value) and "truncated" in str(e.value)


def test_a_file_that_is_not_safetensors_is_named_so_not_truncated(tmp_path):
    """Damaged first bytes (or another format under a .safetensors name) give an absurd header length:
    the error says the file is not safetensors, not that it was cut short."""
    d = _write_single(tmp_path / "m", _tensors())
    f = d / "model.safetensors"
    f.write_bytes(b"PK\x03\x04garbage" + f.read_bytes()[12:])  # a zip's magic over the header length
    with pytest.raises(CheckpointError) as e:
        HFCheckpoint(d)
    assert str(f) in str(e.value) and "is not a safetensors file" in str(e.value)
    assert "truncated" not in str(e.value)


@pytest.mark.parametrize("keep", [0, 5])
def test_truncated_before_header_length(tmp_path, keep):
    d = _write_single(tmp_path / "m", _tensors())
    f = d / "model.safetensors"
    _truncate(f, keep)
    with pytest.raises(CheckpointError) as e:
        HFCheckpoint(d)
    assert str(f) in str(e.value) and "truncated" in str(e.value)


def test_truncated_shard_of_indexed_checkpoint(tmp_path):
    tensors = _tensors()
    names = list(tensors)
    d = _write_indexed(tmp_path / "m", tensors, [names[:3], names[3:]])
    f = d / "model-00001-of-00002.safetensors"
    _truncate(f, f.stat().st_size - 1)
    with pytest.raises(CheckpointError, match=re.escape(f.name) + ".*truncated"):
        HFCheckpoint(d)


def test_corrupt_header(tmp_path):
    d = _write_single(tmp_path / "m", _tensors())
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8] = ord("#")  # the JSON header no longer parses
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        HFCheckpoint(d)


def test_index_lists_missing_file(tmp_path):
    tensors = _tensors()
    names = list(tensors)
    d = _write_indexed(tmp_path / "m", tensors, [names[:3], names[3:]])
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        HFCheckpoint(d)


def test_only_pickle_weights(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    torch.save({"w": torch.zeros(2)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        HFCheckpoint(d)
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "pickle" in msg and "safetensors" in msg


def test_no_weights(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        HFCheckpoint(d)


def test_no_config(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    save_file(_tensors(), str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="config.json"):
        HFCheckpoint(d)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        HFCheckpoint(tmp_path / "nowhere")


# ---- shard planning -----------------------------------------------------------------------------

@st.composite
def shard_entries(draw):
    n = draw(st.integers(0, 30))
    sizes = draw(st.lists(st.integers(0, 100), min_size=n, max_size=n))
    writers = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    return [(f"t{i}", s, w) for i, (s, w) in enumerate(zip(sizes, writers))], draw(st.integers(1, 150))


@settings(max_examples=150, deadline=None)
@given(case=shard_entries())
def test_plan_shards_properties(case):
    entries, max_bytes = case
    files = plan_shards(entries, max_bytes)
    size = {name: nb for name, nb, _ in entries}
    writer = {name: w for name, _, w in entries}
    # every name in exactly one file
    placed = [n for f in files for n in f["names"]]
    assert sorted(placed) == sorted(size) and len(placed) == len(set(placed))
    for f in files:
        assert f["names"]  # no empty files
        # a file has a single writer, and it is the writer of each of its tensors
        assert {writer[n] for n in f["names"]} == {f["writer"]}
        # the size bound holds unless the file is one tensor larger than the bound
        total = sum(size[n] for n in f["names"])
        assert total <= max_bytes or len(f["names"]) == 1
    # a writer's tensors keep their order across its files
    for w in set(writer.values()):
        mine = [n for f in files if f["writer"] == w for n in f["names"]]
        assert mine == [n for n, _, ww in entries if ww == w]
    # file names: HF's numbering, 1-based, all distinct; a single file is model.safetensors
    n = len(files)
    names = [f["file"] for f in files]
    if n == 1:
        assert names == ["model.safetensors"]
    else:
        assert names == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    # deterministic: every rank computes the same plan
    assert plan_shards(list(entries), max_bytes) == files


def test_plan_shards_packs_greedily():
    files = plan_shards([("a", 40, 0), ("b", 40, 0), ("c", 40, 0), ("d", 500, 0), ("e", 1, 1)], 100)
    assert [f["names"] for f in files] == [["a", "b"], ["c"], ["d"], ["e"]]
    assert [f["writer"] for f in files] == [0, 0, 0, 1]


# ---- destination handling -----------------------------------------------------------------------

def test_prepare_destination_refuses_non_empty(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        hfio.prepare_destination(dest, overwrite=False)
    assert (dest / "keep.txt").read_text() == "x"  # untouched
    assert not hfio.staging_dir(dest).exists()


def test_prepare_destination_empty_or_missing(tmp_path):
    for dest in (tmp_path / "missing", tmp_path / "empty"):
        if dest.name == "empty":
            dest.mkdir()
        stage = hfio.prepare_destination(dest, overwrite=False)
        assert stage.is_dir() and not any(stage.iterdir())
        assert stage.parent == dest.parent and stage != dest


def test_prepare_destination_clears_stale_staging(tmp_path):
    dest = tmp_path / "out"
    stale = hfio.staging_dir(dest)
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_text("half")
    stage = hfio.prepare_destination(dest, overwrite=False)
    assert stage == stale and not any(stage.iterdir())


def test_commit_replaces_existing_dir(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    stage = hfio.prepare_destination(dest, overwrite=True)
    (stage / "new.txt").write_text("new")
    hfio.commit(stage, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"]
    assert (dest / "new.txt").read_text() == "new"
    assert not stage.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old / .partial left behind


def test_commit_into_missing_dest(tmp_path):
    dest = tmp_path / "sub" / "out"
    stage = hfio.prepare_destination(dest, overwrite=False)
    (stage / "x").write_text("1")
    hfio.commit(stage, dest)
    assert (dest / "x").read_text() == "1" and not stage.exists()


def test_written_shards_read_back(tmp_path):
    """write_shard + write_index produce a checkpoint the reader accepts, tensor for tensor."""
    tensors = _tensors(3)
    entries = [(n, t.numel() * t.element_size(), i % 2) for i, (n, t) in enumerate(tensors.items())]
    files = plan_shards(entries, 40)
    assert len(files) > 1
    dest = tmp_path / "out"
    stage = hfio.prepare_destination(dest, overwrite=False)
    for f in files:
        hfio.write_shard(stage / f["file"], {n: tensors[n] for n in f["names"]})
    hfio.write_index(stage, files, {n: nb for n, nb, _ in entries})
    hfio.copy_side_files(None, stage, CONFIG)
    hfio.commit(stage, dest)
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(nb for _, nb, _ in entries)
    _assert_reads_everything(HFCheckpoint(dest), tensors)
