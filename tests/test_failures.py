"""Failure behaviour of reading and writing: a full disk during a save (fault hook
``MCORE_BRIDGE_FAULT=rank:R:write:enospc``, an ``OSError(ENOSPC)`` raised inside ``io.write_shard``)
gives one clear line, a non-zero exit and no staging directory, through the CLI and the Python API;
a rank failing inside a write makes every rank exit within seconds, not at the collective timeout;
a tensor name in two safetensors files and index entries outside the model directory are refused."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mcore_bridge import hf_io as hfio
from mcore_bridge.hf_io import CheckpointError, HFCheckpoint, staging_dir
from tests.test_cli import assert_nothing_written, run_cli

ENOSPC_LINE = "cannot write {}: No space left on device"


# ---- (a) a full disk: one line, exit 2, nothing left ---------------------------------------------

@pytest.mark.parametrize("direction", ["--to-hf", "--to-mcore-plain"])
def test_enospc_during_save_is_one_clear_line(zoo_model, tmp_path, direction):
    save = tmp_path / "out"
    flags = ["--to-hf"] if direction == "--to-hf" else ["--to-mcore", "--ckpt-format", "plain"]
    r = run_cli("export", "--model", zoo_model("qwen2"), *flags, "--save", save, "--device", "cpu",
                env={"MCORE_BRIDGE_FAULT": "rank:0:write:enospc"})
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    shard = "model.safetensors" if direction == "--to-hf" else "mp_rank_00_000.safetensors"
    assert last.startswith(f"mcore-bridge: error: cannot write {staging_dir(save)}/{shard}"), last
    assert last.endswith(": No space left on device"), last
    assert_nothing_written(save)


def api_failing_save(source: str, layout: dict, out_dir: str, fault: str) -> dict:
    """Pool case: load, then ``save_weights`` with ``fault`` set in this worker; what it raised."""
    from tests.cases import _loaded

    bridge, models = _loaded(source, layout)
    os.environ["MCORE_BRIDGE_FAULT"] = fault
    start = time.monotonic()
    try:
        bridge.save_weights(models, out_dir, max_shard_bytes=200_000)
        error = None
    except Exception as e:
        error = (type(e).__name__, str(e), getattr(e, "errno", None))
    finally:
        del os.environ["MCORE_BRIDGE_FAULT"]
    return {"error": error, "seconds": time.monotonic() - start}


@pytest.mark.world(1)
def test_python_api_failed_save_leaves_no_partial(pools, zoo_model, tmp_path):
    import errno

    out = tmp_path / "out"
    (got,) = pools.get(1).run(api_failing_save, source=str(zoo_model("qwen2")), layout={}, out_dir=str(out),
                              fault="rank:0:write:enospc")
    name, msg, code = got["error"]
    assert name == "WriteError" and code == errno.ENOSPC
    assert msg.startswith(f"cannot write {staging_dir(out)}/") and msg.endswith("No space left on device")
    assert not out.exists() and not staging_dir(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---- (e) one rank fails inside a write: every rank out in seconds ----------------------------------

def _export_tp2(zoo_model, save: Path, env: dict) -> tuple[float, object]:
    start = time.monotonic()
    r = run_cli("export", "--model", zoo_model("llama"), "--to-hf", "--tp", "2", "--save", save,
                "--max-shard-size", "200KB", "--device", "cpu", env=env, timeout=500)
    return time.monotonic() - start, r


@pytest.fixture(scope="module")
def clean_export_seconds(zoo_model, tmp_path_factory):
    """Control: the same tp2 export without a fault succeeds; how long it takes here."""
    seconds, r = _export_tp2(zoo_model, tmp_path_factory.mktemp("clean") / "out", {})
    assert r.returncode == 0, r.stderr[-3000:]
    return seconds


@pytest.mark.parametrize("fault,says", [
    # rank 1 fails as its body starts, while rank 0 goes into the export's gathers with it (before
    # the fix: rank 0 waited there for the collective timeout, twice: 126 s at MCORE_BRIDGE_TIMEOUT=60)
    ("rank:1:save:raise", "injected fault (MCORE_BRIDGE_FAULT) on rank 1 at save: raise"),
    # rank 1's disk fills inside a shard write
    ("rank:1:write:enospc", "mcore-bridge: error [rank 1]: cannot write "),
])
def test_rank_failing_in_a_save_ends_every_rank_quickly(zoo_model, tmp_path, clean_export_seconds, fault, says):
    """With a 600 s collective timeout, a tp2 export whose rank 1 fails ends about as fast as a
    clean one (every rank out within seconds of the failure), non-zero, with nothing written."""
    save = tmp_path / "out"
    seconds, r = _export_tp2(zoo_model, save, {"MCORE_BRIDGE_FAULT": fault, "MCORE_BRIDGE_TIMEOUT": "600"})
    assert r.returncode != 0
    assert says in r.stderr
    assert "Timed out" not in r.stderr
    assert seconds < clean_export_seconds + 30, f"{seconds:.0f} s vs {clean_export_seconds:.0f} s without the fault"
    assert_nothing_written(save)


# ---- (b) a tensor in two files -------------------------------------------------------------------

CONFIG = {"model_type": "llama"}


def _model(d: Path, files: dict[str, dict], index: dict | None = None) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(CONFIG))
    for name, tensors in files.items():
        save_file(tensors, str(d / name))
    if index is not None:
        (d / hfio.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return d


def test_tensor_in_two_files_is_refused(tmp_path):
    a = {"x": torch.zeros(2), "y": torch.ones(2)}
    b = {"y": torch.full((2,), 7.0), "z": torch.ones(3)}
    files = {"model-00001-of-00002.safetensors": a, "model-00002-of-00002.safetensors": b}
    for kind, index in (("unindexed", None),
                        ("indexed", {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors",
                                     "z": "model-00002-of-00002.safetensors"})):
        d = _model(tmp_path / kind, files, index)
        with pytest.raises(CheckpointError) as e:
            HFCheckpoint(d)
        msg = str(e.value)
        assert "'y'" in msg and "two files" in msg
        assert str(d / "model-00001-of-00002.safetensors") in msg and str(d / "model-00002-of-00002.safetensors") in msg
    # negative control: the same files without the duplicate read fine
    ok = _model(tmp_path / "ok", {"model-00001-of-00002.safetensors": a,
                                  "model-00002-of-00002.safetensors": {"z": torch.ones(3)}})
    assert sorted(HFCheckpoint(ok).names()) == ["x", "y", "z"]


# ---- (c) index entries outside the model directory -------------------------------------------------

def test_index_entries_outside_the_directory_are_refused(tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"secret": torch.ones(2)}, str(outside))
    d = _model(tmp_path / "m", {"model-00001-of-00001.safetensors": {"x": torch.zeros(2)}},
               {"x": "model-00001-of-00001.safetensors"})
    (d / "sub").mkdir()
    shutil.copy(outside, d / "sub" / "s.safetensors")
    (d / "link.safetensors").symlink_to(outside)
    index = d / hfio.INDEX_NAME
    for entry in ("../elsewhere.safetensors", str(outside), "link.safetensors", "sub/s.safetensors", ".."):
        index.write_text(json.dumps({"weight_map": {"x": "model-00001-of-00001.safetensors", "secret": entry}}))
        with pytest.raises(CheckpointError, match="names files outside") as e:
            HFCheckpoint(d)
        assert entry in str(e.value) and str(index) in str(e.value)
    # control: a symlink that stays inside the directory is fine
    (d / "inside.safetensors").symlink_to(d / "model-00001-of-00001.safetensors")
    shutil.move(d / "model-00001-of-00001.safetensors", d / "real.safetensors")
    (d / "inside.safetensors").unlink()
    (d / "inside.safetensors").symlink_to(d / "real.safetensors")
    index.write_text(json.dumps({"weight_map": {"x": "inside.safetensors"}}))
    assert HFCheckpoint(d).names() == ["x"]
