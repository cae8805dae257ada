"""The reader's mapped path (tensors of at least ``io.MAP_MIN_BYTES``): region reads return the right
values, and a tensor's mapping is released with its last view (resident file pages stay bounded
by what the caller holds)."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from safetensors.torch import save_file

from mcore_bridge import hf_io as hfio


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


@pytest.fixture
def ckpt(tmp_path):
    tensors = {"small": torch.arange(6, dtype=torch.int32).reshape(2, 3),  # pread path
               "big": torch.randn(512, 1024).to(torch.bfloat16),  # 1 MiB: mapped
               "odd": torch.randn(3, 5, 7),  # follows an aligned tensor; fp32
               "flag": torch.tensor([True, False, True])}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return hfio.HFCheckpoint(tmp_path), tensors


@pytest.mark.parametrize("map_min", [0, hfio.MAP_MIN_BYTES])
def test_regions_mapped_and_copied(ckpt, monkeypatch, map_min):
    monkeypatch.setattr(hfio, "MAP_MIN_BYTES", map_min)
    reader, tensors = ckpt
    regions = [None, (slice(1, 2),), (slice(None), slice(1, 3)), (slice(0, 0),)]
    for name, t in tensors.items():
        for region in regions:
            region = None if region is None else region[: t.dim()]
            got = reader.read(name, region)
            want = t if region is None else t[region]
            assert got.dtype == t.dtype and torch.equal(got, want), (name, region)


def test_mapping_released_with_last_view(tmp_path, monkeypatch):
    monkeypatch.setattr(hfio, "MAP_MIN_BYTES", 0)
    t = torch.ones(32 << 20, dtype=torch.uint8)  # 32 MiB
    save_file({"w": t}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    reader = hfio.HFCheckpoint(tmp_path)
    gc.collect()
    base = _rss_file_kb()
    part = reader.read("w", (slice(0, 16 << 20),))
    assert int(part.sum()) == 16 << 20  # touches 16 MiB of mapped pages
    assert _rss_file_kb() - base > 8 << 10
    del part
    gc.collect()
    assert _rss_file_kb() - base < 4 << 10
