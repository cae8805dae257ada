"""The direct safetensors writer and the background shard writer (mcore_bridge/shard_writer.py):
files read back by safetensors itself hold exactly what ``safetensors.torch.save_file`` would store,
and a failure on the writer thread reaches the caller as the original error, with nothing written."""

from __future__ import annotations

import json
import struct
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mcore_bridge.hf_io import staging_dir
from mcore_bridge.shard_writer import BackgroundWriter, write_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    return {
        "w.bf16": torch.randn(33, 7, generator=g).to(torch.bfloat16),
        "w.f32": torch.randn(5, 3, generator=g),
        "w.f16": torch.randn(9, generator=g).to(torch.float16),
        "w.f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "w.i64": torch.arange(7),
        "w.i8": torch.arange(-3, 4, dtype=torch.int8),
        "w.u8": torch.arange(11, dtype=torch.uint8),
        "w.bool": torch.tensor([True, False, True]),
        "w.fp8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
        "strided": base.t(),  # not contiguous: written in row-major order of its shape
        "slice": base[2:4],  # a view into a larger storage
    }


def _read(path) -> tuple[dict, dict]:
    out = {}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out, meta


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and a.contiguous().reshape(-1).view(torch.uint8).equal(b.contiguous().reshape(-1).view(torch.uint8)))


def test_direct_writer_stores_what_safetensors_stores(tmp_path):
    tensors = _tensors()
    ours, ref = tmp_path / "ours.safetensors", tmp_path / "ref.safetensors"
    write_safetensors(ours, tensors, metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(ref), metadata={"format": "pt"})
    got, meta = _read(ours)
    want, want_meta = _read(ref)
    assert meta == want_meta == {"format": "pt"}
    assert sorted(got) == sorted(want) == sorted(tensors)
    for k in tensors:
        assert _same_bytes(got[k], want[k]), k
    # the file layout safetensors requires: header length a multiple of 8, ranges back to back and
    # aligned to the element size, the file ends where the last range does
    raw = ours.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    ranges = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert ranges[-1][1] == len(raw) - 8 - n
    for k, v in header.items():
        if k != "__metadata__":
            assert v["data_offsets"][0] % tensors[k].element_size() == 0, k


def test_comparison_detects_one_changed_element(tmp_path):
    """Negative control for the test above: one changed element is seen."""
    tensors = _tensors()
    changed = dict(tensors, **{"w.bf16": tensors["w.bf16"].clone()})
    changed["w.bf16"][3, 2] += 1
    write_safetensors(tmp_path / "a.safetensors", changed)
    got, _ = _read(tmp_path / "a.safetensors")
    assert not _same_bytes(got["w.bf16"], tensors["w.bf16"])
    assert all(_same_bytes(got[k], tensors[k]) for k in tensors if k != "w.bf16")


def test_unsupported_dtype_names_the_tensor(tmp_path):
    with pytest.raises(TypeError, match=r"layer\.x: dtype torch\.complex64"):
        write_safetensors(tmp_path / "c.safetensors", {"layer.x": torch.zeros(2, dtype=torch.complex64)})


def test_background_error_is_the_original_and_stops_later_jobs():
    done, boom = [], ValueError("disk on fire")
    release = threading.Event()

    def job(i):
        release.wait(5)
        if i == 1:
            raise boom
        done.append(i)

    w = BackgroundWriter(depth=1)
    w.submit(job, 0)
    w.submit(job, 1)
    release.set()
    with pytest.raises(ValueError) as e:
        for i in range(2, 6):  # a later submit (or close) raises the thread's error
            w.submit(job, i)
        w.close()
    assert e.value is boom
    w.close()  # the error is raised once; the thread has ended
    assert done == [0]


def test_background_caller_failure_drops_queued_jobs():
    done, started = [], threading.Event()

    def slow(i):
        started.set()
        threading.Event().wait(0.2)
        done.append(i)

    with pytest.raises(KeyError):
        with BackgroundWriter(depth=1) as w:
            w.submit(slow, 0)
            started.wait(5)
            w.submit(slow, 1)  # queued behind the running one
            raise KeyError("caller")
    assert done == [0]  # the job in progress finished, the queued one was dropped


def test_failed_background_write_raises_the_injected_error_and_leaves_nothing(tmp_path, monkeypatch):
    """A fault raised inside ``hf_io.write_shard`` on the writer thread (the second of three shards)
    is what the caller gets, as the original exception, and ``collective_output`` leaves no output and
    no staging directory. (Through ``Bridge.save_weights``: tests/test_failures.py's ENOSPC cases.)"""
    from mcore_bridge import hf_io as hfio
    from mcore_bridge.runtime.faults import InjectedFault

    calls = []
    original = hfio.write_shard

    def write_shard(path, tensors):
        calls.append(path.name)
        if len(calls) == 2:
            monkeypatch.setenv("MCORE_BRIDGE_FAULT", "rank:0:write:raise")
        try:
            original(path, tensors)
        finally:
            monkeypatch.delenv("MCORE_BRIDGE_FAULT", raising=False)

    out = tmp_path / "out"
    with pytest.raises(InjectedFault, match="write"):
        with hfio.collective_output(out, overwrite=False) as stage:
            with BackgroundWriter() as w:
                for i in range(3):
                    w.submit(write_shard, stage / f"s{i}.safetensors", {"x": torch.full((1000,), float(i))})
    assert calls[:2] == ["s0.safetensors", "s1.safetensors"]
    assert not out.exists() and not staging_dir(out).exists()
    assert list(tmp_path.iterdir()) == []


# ---- reading straight into the destination (HFCheckpoint.read_into, Loader's direct path) -------------

def _checkpoint(tmp_path):
    from mcore_bridge.hf_io import HFCheckpoint

    g = torch.Generator().manual_seed(1)
    tensors = {"emb": torch.randn(600, 1024, generator=g).to(torch.bfloat16),
               "big": torch.randn(512, 1024, generator=g), "small": torch.randn(8, generator=g)}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text("{}")
    return HFCheckpoint(tmp_path), tensors


def test_read_into_gives_the_same_bytes_as_read(tmp_path):
    ckpt, tensors = _checkpoint(tmp_path)
    whole = torch.empty(512, 1024)
    assert ckpt.read_into("big", None, whole) == whole.nbytes
    assert _same_bytes(whole, tensors["big"]) and _same_bytes(whole, ckpt.read("big"))
    rows = torch.empty(100, 1024)
    region = (slice(200, 300), slice(None))
    assert ckpt.read_into("big", region, rows) == rows.nbytes
    assert _same_bytes(rows, tensors["big"][200:300])
    padded = torch.full((640, 1024), 7.0, dtype=torch.bfloat16)  # larger: the leading rows are filled
    assert ckpt.read_into("emb", (slice(0, 600), slice(None)), padded) == 600 * 1024 * 2
    assert _same_bytes(padded[:600], tensors["emb"]) and bool((padded[600:] == 7).all())


def test_read_into_declines_what_is_not_one_byte_range(tmp_path):
    ckpt, _ = _checkpoint(tmp_path)
    assert ckpt.read_into("big", (slice(None), slice(0, 512)), torch.empty(512, 512)) == 0  # columns
    assert ckpt.read_into("big", None, torch.empty(512, 1024, dtype=torch.bfloat16)) == 0  # another dtype
    assert ckpt.read_into("big", None, torch.empty(1024, 512).t()) == 0  # not contiguous
    assert ckpt.read_into("big", None, torch.empty(100, 1024)) == 0  # too small
    small = torch.empty(8)
    assert ckpt.read_into("small", None, small) == 32 and _same_bytes(small, ckpt.read("small"))


def test_loader_direct_path_pads_vocab_and_refuses_columns(tmp_path):
    from mcore_bridge.bridge_parts.loader import read_direct
    from mcore_bridge.transforms import COLUMN, REPLICATED, ROW, VOCAB

    ckpt, tensors = _checkpoint(tmp_path)
    out = torch.full((640, 1024), 5.0, dtype=torch.bfloat16)
    regions = VOCAB.slices([(600, 1024)], (640, 1024), 1, 0)
    assert read_direct(ckpt, VOCAB, ["emb"], regions, out)
    assert _same_bytes(out[:600], tensors["emb"]) and bool((out[600:] == 0).all())  # padding zeroed
    half = torch.empty(256, 1024)
    assert read_direct(ckpt, COLUMN, ["big"], COLUMN.slices([(512, 1024)], (256, 1024), 2, 1), half)
    assert _same_bytes(half, tensors["big"][256:])
    assert not read_direct(ckpt, ROW, ["big"], ROW.slices([(512, 1024)], (512, 512), 2, 0), torch.empty(512, 512))
    assert read_direct(ckpt, REPLICATED, ["big"], REPLICATED.slices([(512, 1024)], (512, 1024), 2, 1),
                       torch.empty(512, 1024, requires_grad=True))  # parameters require grad
