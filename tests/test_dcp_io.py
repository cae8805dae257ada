"""torch_dist records written and read by mcore-bridge itself (``dcp_writer``, ``dcp_reader``):
the same files torch.distributed.checkpoint writes, megatron-core loading ours and we loading
megatron's, byte-exact, and a failed save leaving nothing behind."""

from __future__ import annotations

import io
import os
import struct
import zipfile

import pytest
import torch
import torch.distributed.checkpoint as dcp

from mcore_bridge import ParallelLayout as L
from mcore_bridge import dcp_reader, dcp_writer
from tests import dcp_io_cases as dc
from tests.test_torch_dist import assert_same_hf

TENSORS = {  # dtypes, a 0-dim and an empty tensor, a row view into a larger storage
    "bf16": torch.randn(7, 33).to(torch.bfloat16), "f32": torch.randn(5, 3, 2), "i64": torch.arange(11),
    "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "view": torch.randn(10, 6)[4:7],
}


def _entries(blob: bytes) -> dict:
    """Zip entry -> (stored bytes, compression, CRC-32 field), read without checking the CRC."""
    out = {}
    for i in zipfile.ZipFile(io.BytesIO(blob)).infolist():
        name_len, extra_len = struct.unpack("<HH", blob[i.header_offset + 26:i.header_offset + 30])
        start = i.header_offset + 30 + name_len + extra_len
        if "serialization_id" not in i.filename:  # random per save
            out[i.filename] = (blob[start:start + i.compress_size], i.compress_type, i.CRC if "/data/" in i.filename else None)
    return out


@pytest.mark.parametrize("name", sorted(TENSORS))
def test_record_is_torch_saves_record(name):
    t = TENSORS[name]
    head, tail, nbytes = dcp_writer.record_parts(t.shape, t.dtype)
    blob = head + t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() + tail
    assert nbytes == t.numel() * t.element_size()
    ref = io.BytesIO()
    torch.serialization.set_crc32_options(False)  # torch's own record without the CRC pass
    try:
        torch.save(t.clone(), ref)  # a standalone tensor: what DCP's writer saves for a view
    finally:
        torch.serialization.set_crc32_options(True)
    # every zip entry (data.pkl, the data, byteorder, versions) as torch.save writes it
    assert _entries(blob) == _entries(ref.getvalue())
    back = torch.load(io.BytesIO(blob), weights_only=True)
    assert back.dtype == t.dtype and torch.equal(back, t)


def _state():
    return {k: v.clone() for k, v in TENSORS.items()} | {"obj": "an object item (BYTE_IO)"}


def _blank(state):
    return {k: (torch.full_like(v, 7) if isinstance(v, torch.Tensor) else "") for k, v in state.items()}


def test_direct_writer_files_read_by_dcps_reader(tmp_path):
    src = _state()
    writer = dcp_writer.DirectWriter(str(tmp_path), thread_count=2)
    dcp.save(src, storage_writer=writer, no_dist=True)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [".metadata", "__0_0.distcp", "__0_1.distcp"]
    dst = _blank(src)
    dcp.load(dst, storage_reader=dcp.FileSystemReader(str(tmp_path)), no_dist=True)
    for k, v in TENSORS.items():
        assert dst[k].dtype == v.dtype and torch.equal(dst[k], v), k
    assert dst["obj"] == src["obj"]


def test_direct_reader_reads_dcps_files_into_the_destination(tmp_path):
    src = _state()
    dcp.save(src, storage_writer=dcp.FileSystemWriter(str(tmp_path)), no_dist=True)
    dst = _blank(src)
    ptrs = {k: v.data_ptr() for k, v in dst.items() if isinstance(v, torch.Tensor)}
    dst["f32"] = torch.full((2, 3, 5), 7.0).transpose(0, 2)  # not contiguous: read staged, then copied
    d0, s0 = dcp_reader.DirectReader.direct_items, dcp_reader.DirectReader.staged_items
    dcp.load(dst, storage_reader=dcp_reader.DirectReader(str(tmp_path)), no_dist=True)
    for k, v in TENSORS.items():
        assert dst[k].dtype == v.dtype and torch.equal(dst[k], v), k
    assert dst["obj"] == src["obj"]
    assert all(dst[k].data_ptr() == p for k, p in ptrs.items() if k != "f32")
    assert dcp_reader.DirectReader.staged_items - s0 == 1  # f32
    assert dcp_reader.DirectReader.direct_items - d0 == len(TENSORS) - 2  # DCP reads nothing for the empty one


def test_records_of_another_form_take_dcps_path(tmp_path):
    # a transposed tensor whose storage is exactly its own: torch.save keeps its strides
    t = torch.randn(4, 6).t()
    with open(tmp_path / "r", "wb") as f:
        f.write(b"\0" * 13)
        torch.save(t, f)
        n = f.tell() - 13
    fd = os.open(tmp_path / "r", os.O_RDONLY)
    try:
        assert dcp_reader.parse_record(dcp_reader._Window(fd, 13, n)) is None
        contiguous = torch.randn(3, 5)
        with open(tmp_path / "c", "wb") as f:
            torch.save(contiguous, f)
        fd2 = os.open(tmp_path / "c", os.O_RDONLY)
        rec, off = dcp_reader.parse_record(dcp_reader._Window(fd2, 0, os.path.getsize(tmp_path / "c")))
        os.close(fd2)
        assert rec.shape == contiguous.shape and off % 64 == 0
        assert (tmp_path / "c").read_bytes()[off:off + 60] == contiguous.numpy().tobytes()
    finally:
        os.close(fd)


def test_truncated_record_is_an_error_naming_the_file(tmp_path):
    dcp.save({"w": torch.randn(64, 64)}, storage_writer=dcp_writer.DirectWriter(str(tmp_path)), no_dist=True)
    data = tmp_path / "__0_0.distcp"
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size - 200)
    with pytest.raises(BaseException) as e:  # DCP's CheckpointException is a BaseException
        dcp.load({"w": torch.empty(64, 64)}, storage_reader=dcp_reader.DirectReader(str(tmp_path)), no_dist=True)
    assert f"__0_0.distcp: {size - 200} bytes" in str(e.value) and "truncated" in str(e.value)


@pytest.mark.world(2)
def test_megatron_loads_ours_and_we_load_megatrons(pools, zoo_model, tmp_path):
    src = zoo_model("qwen3")
    layout = L(tp=2, sp=True)
    ours = pools.get(2).run(dc.megatron_reads_ours, timeout=300, source=str(src), layout=layout.to_dict(),
                            out_dir=str(tmp_path / "ours"))
    assert [r["differing"] for r in ours] == [[], []]
    record = next((tmp_path / "ours" / "release").glob("__0_*.distcp")).read_bytes()
    assert record[:4] == b"PK\x03\x04"  # torch.save records, as DCP writes
    theirs = pools.get(2).run(dc.we_read_megatrons, timeout=300, source=str(src), layout=layout.to_dict(),
                              out_dir=str(tmp_path / "theirs"))
    assert [r["differing"] for r in theirs] == [[], []]
    assert all(r["direct"] > 0 for r in theirs)  # the direct path ran
    # ours, read at another layout (slices of records: staged) and back to HF, byte-exact
    counts = pools.get(2).run(dc.reshard_counts, timeout=300, ckpt=str(tmp_path / "ours"),
                              layout=L(pp=2).to_dict(), out_dir=str(tmp_path / "hf"))
    assert all(c["staged"] > 0 for c in counts)
    assert_same_hf(src, tmp_path / "hf")


@pytest.mark.world(1)
def test_a_failed_write_leaves_nothing(pools, zoo_model, tmp_path):
    src = zoo_model("qwen3")
    out = tmp_path / "out"
    err = pools.get(1).run(dc.failing_save, timeout=300, source=str(src), layout=L().to_dict(), out_dir=str(out),
                           fail_after=4)
    assert "No space left on device (injected)" in err[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no staging directory left either
    # the same save without the failure succeeds (the injection is what failed it)
    ok = pools.get(1).run(dc.failing_save, timeout=300, source=str(src), layout=L().to_dict(), out_dir=str(out),
                          fail_after=10 ** 6)
    assert ok == ["no error"] and (out / "release" / ".metadata").exists()


def test_factory_merge_returns_the_model_tensor_when_the_parts_tile_it():
    """SwiGLU's ``linear_fc1`` is loaded as gate/up views of the model tensor; megatron's merge
    ``cat``s them into a new tensor. When the loaded parts still tile the model tensor, the load
    hands back the model tensor itself; parts that are anything else (new tensors, the halves in
    the other order, another dtype) go through megatron's own merge, whose result is what counts."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    from mcore_bridge.dist_ckpt import _merge_in_place

    calls = []

    def cat(parts):
        calls.append(len(parts))
        return torch.cat(parts)

    whole = torch.arange(24.0).reshape(6, 4)
    state = {"model": {"fc1": ShardedTensorFactory("fc1", whole, lambda *a: None, cat)}}
    _merge_in_place(state)
    _merge_in_place(state)  # idempotent: one wrapper
    merge = state["model"]["fc1"].merge_fn
    gate, up = torch.chunk(whole, 2)
    assert merge([gate, up]) is whole and not calls
    for parts in ([up, gate], [gate.clone(), up.clone()], [gate, up[:2]], [gate.double(), up.double()]):
        out = merge(parts)
        assert out is not whole and torch.equal(out, torch.cat(parts))
    assert calls == [2, 2, 2, 2]
