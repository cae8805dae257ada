"""Untrusted input: pickled HF weights (pytorch_model*.bin) are refused unless the user opts in, and
even then are read only through torch.load(weights_only=True): a pickle that would run code, or one
that holds anything but a flat {name: tensor} dict, is refused before any weight is read."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from mcore_bridge import hf_io as hfio
from mcore_bridge.hf_io import CheckpointError, HFCheckpoint
from tests.test_cli import assert_nothing_written, assert_same_weights, run_cli


# ---- helpers -------------------------------------------------------------------------------------

def _source_tensors(src: Path) -> dict[str, torch.Tensor]:
    ckpt = HFCheckpoint(src)
    tensors = {n: ckpt.read(n).clone() for n in ckpt.names()}
    ckpt.close()
    return tensors


def _copy_side_files(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for p in src.iterdir():
        if p.suffix != ".safetensors" and p.name != hfio.INDEX_NAME:
            shutil.copy2(p, dest / p.name)
    return dest


def pickle_model(src: Path, dest: Path, sharded: bool = False, legacy: bool = False) -> Path:
    """``dest``: the safetensors model ``src`` re-saved as ``torch.save`` pickles, as transformers'
    save_pretrained(safe_serialization=False) writes them (``pytorch_model.bin``, or numbered shards
    + ``pytorch_model.bin.index.json`` following ``src``'s own index)."""
    tensors = _source_tensors(src)
    _copy_side_files(src, dest)
    kw = {"_use_new_zipfile_serialization": False} if legacy else {}
    if not sharded:
        torch.save(tensors, dest / hfio.PICKLE_SINGLE_NAME, **kw)
        return dest
    st_map = json.loads((src / hfio.INDEX_NAME).read_text())["weight_map"]
    weight_map = {n: f.replace("model-", "pytorch_model-").replace(".safetensors", ".bin") for n, f in st_map.items()}
    for file in sorted(set(weight_map.values())):
        torch.save({n: tensors[n] for n, f in weight_map.items() if f == file}, dest / file, **kw)
    (dest / hfio.PICKLE_INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dest


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture
def torch_load_calls(monkeypatch):
    """Every torch.load call (the test's own included) while the test runs: ``(file name,
    map_location, weights_only, mmap)``."""
    calls, real = [], torch.load

    def spy(f, *args, **kwargs):
        calls.append((Path(f).name, kwargs.get("map_location"), kwargs.get("weights_only"), kwargs.get("mmap")))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(hfio.torch, "load", spy)
    return calls


# ---- (a) the opt-in reads pickles exactly like the safetensors source ---------------------------

@pytest.mark.parametrize("model,sharded,legacy", [("qwen2", False, False), ("llama", True, False),
                                                  ("qwen2", False, True)],
                         ids=["single", "indexed-shards", "legacy-format"])
def test_pickles_read_like_safetensors(zoo_model, tmp_path, model, sharded, legacy):
    src = zoo_model(model)
    d = pickle_model(src, tmp_path / "bin", sharded=sharded, legacy=legacy)
    a, b = HFCheckpoint(src), HFCheckpoint(d, allow_pickle=True)
    assert b.config == a.config and b.path == d
    assert sorted(b.names()) == sorted(a.names())
    for name in a.names():
        x, y = a.info(name), b.info(name)
        assert (y.shape, y.dtype, y.nbytes) == (x.shape, x.dtype, x.nbytes), name
        assert y.file.suffix == ".bin"
    if sharded:  # each tensor found in the shard the index names
        index = json.loads((d / hfio.PICKLE_INDEX_NAME).read_text())["weight_map"]
        assert len(set(index.values())) > 1
        assert all(b.info(n).file.name == f for n, f in index.items())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = {n: b.read(n) for n in a.names()}
    said = [str(w.message) for w in caught if "legacy" in str(w.message)]
    # only the legacy (non-zip) format is read whole instead of mapped, and says so once per file
    assert said == ([f"{d / 'pytorch_model.bin'} is in torch's legacy (pre-1.6, non-zip) format, which cannot "
                     f"be memory-mapped: reading it whole into memory"] if legacy else [])
    for name in a.names():
        want = a.read(name)
        assert got[name].dtype == want.dtype and _bytes(got[name]) == _bytes(want), name
        assert type(got[name]) is torch.Tensor
        rows = want.shape[0]
        region = (slice(1, rows - 1),) + (slice(None),) * (want.dim() - 1)
        assert torch.equal(b.read(name, region), want[region]), name
        if want.dim() == 2:  # a column block, as a row-parallel shard reads it
            cols = want.shape[1]
            region = (slice(None), slice(cols // 4, cols // 2))
            part = b.read(name, region)
            assert tuple(part.shape) == tuple(want[region].shape) and torch.equal(part, want[region])
    a.close()
    b.close()


def test_files_load_lazily_mapped_and_stay_open_until_close(zoo_model, tmp_path, torch_load_calls):
    """Opening unpickles each file onto the meta device only (names, shapes: no weight bytes); a file
    is memory-mapped with weights_only=True the first time one of its tensors is read, kept for later
    reads, and let go by close()."""
    d = pickle_model(zoo_model("llama"), tmp_path / "bin", sharded=True)
    ckpt = HFCheckpoint(d, allow_pickle=True)
    shards = sorted({i.file.name for i in ckpt.tensors.values()})
    assert len(shards) == 4
    assert sorted(torch_load_calls) == [(f, "meta", True, None) for f in shards]
    torch_load_calls.clear()
    first, second = [[n for n, i in ckpt.tensors.items() if i.file.name == f] for f in shards[1:3]]
    ckpt.read(first[0])
    ckpt.read(first[-1], (slice(0, 1),))
    assert torch_load_calls == [(shards[1], "cpu", True, True)]
    ckpt.read(second[0])
    assert torch_load_calls == [(shards[1], "cpu", True, True), (shards[2], "cpu", True, True)]
    ckpt.close()
    torch_load_calls.clear()
    t = ckpt.read(first[0])  # readable again after close(): mapped anew
    assert torch_load_calls == [(shards[1], "cpu", True, True)]
    assert torch.equal(t, _source_tensors(zoo_model("llama"))[first[0]])


def test_safetensors_are_preferred_and_pickles_never_opened(zoo_model, tmp_path, torch_load_calls):
    d = tmp_path / "m"
    shutil.copytree(zoo_model("qwen2"), d)
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload("open", marker)}, d / "pytorch_model.bin")
    ckpt = HFCheckpoint(d, allow_pickle=True)
    assert {i.file.name for i in ckpt.tensors.values()} == {"model.safetensors"}
    for n in ckpt.names():
        ckpt.read(n)
    assert torch_load_calls == [] and not marker.exists()


def test_bridge_forwards_allow_pickle(zoo_model, tmp_path):
    from mcore_bridge import Bridge

    src = zoo_model("qwen2")
    d = pickle_model(src, tmp_path / "bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        Bridge(d)
    bridge = Bridge(d, allow_pickle=True)
    assert bridge.hf_tensors == Bridge(src).hf_tensors


def test_cli_export_from_pickles_and_back_is_byte_exact(zoo_model, tmp_path):
    """`export --model BIN --allow-pickle --to-mcore --tp 2` (two ranks, each reading its slices of
    the mapped shards), then `--load --to-hf`: the same bytes as the safetensors source."""
    src = zoo_model("llama")
    d = pickle_model(src, tmp_path / "bin", sharded=True)
    mcore, hf = tmp_path / "mcore", tmp_path / "hf"
    r = run_cli("export", "--model", d, "--allow-pickle", "--to-mcore", "--tp", "2", "--save", mcore,
                "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("export", "--load", mcore, "--to-hf", "--save", hf, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(src, hf)
    assert not list(hf.glob("*.bin")) and list(hf.glob("*.safetensors"))


def test_cli_help_documents_allow_pickle():
    r = run_cli("export", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "--allow-pickle" in text and "weights_only=True" in text


# ---- (b) without the opt-in: refused, nothing written --------------------------------------------

@pytest.mark.parametrize("sharded", [False, True], ids=["single", "indexed-shards"])
def test_refused_without_opt_in(zoo_model, tmp_path, sharded, torch_load_calls):
    model = "llama" if sharded else "qwen2"
    d = pickle_model(zoo_model(model), tmp_path / "bin", sharded=sharded)
    with pytest.raises(CheckpointError) as e:
        HFCheckpoint(d)
    msg = str(e.value)
    assert str(d) in msg and ("pytorch_model-00001-of-00004.bin" if sharded else "pytorch_model.bin") in msg
    assert "execute" in msg and "safetensors" in msg and "--allow-pickle" in msg
    assert torch_load_calls == []  # not even looked into


def test_cli_refuses_without_opt_in(zoo_model, tmp_path):
    d = pickle_model(zoo_model("qwen2"), tmp_path / "bin")
    save = tmp_path / "out"
    r = run_cli("export", "--model", d, "--to-mcore", "--save", save)
    assert r.returncode == 2
    assert "pytorch_model.bin" in r.stderr and "execute" in r.stderr and "--allow-pickle" in r.stderr
    assert "Traceback" not in r.stderr
    assert_nothing_written(save)


def test_opt_in_reads_only_model_pickles(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"w": torch.zeros(2)}, d / "training_args.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*found only training_args.bin"):
        HFCheckpoint(d, allow_pickle=True)


# ---- (c) a pickle that would run code is refused even with the opt-in ----------------------------

class _Payload:
    """Unpickling this runs ``open(marker, "w")`` or ``os.mkdir(marker)``: it creates ``marker``."""

    def __init__(self, how: str, marker: Path):
        self.how, self.marker = how, str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w")) if self.how == "open" else (os.mkdir, (self.marker,))


def _state_with_payload(how, marker):
    return {"model.embed_tokens.weight": torch.randn(4, 2), "model.norm.weight": _Payload(how, marker)}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
@pytest.mark.parametrize("how", ["open", "mkdir"])
def test_malicious_pickle_refused_with_opt_in(tmp_path, how, legacy):
    kw = {"_use_new_zipfile_serialization": False} if legacy else {}
    # control: the payload is live -- a plain (unsafe) torch.load does create its marker
    control = tmp_path / "control_marker"
    torch.save(_state_with_payload(how, control), tmp_path / "control.bin", **kw)
    torch.load(tmp_path / "control.bin", weights_only=False)
    assert control.exists()

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    marker = tmp_path / "marker"
    torch.save(_state_with_payload(how, marker), d / "pytorch_model.bin", **kw)
    for allow in (False, True):
        with pytest.raises(CheckpointError) as e:
            HFCheckpoint(d, allow_pickle=allow)
        msg = str(e.value)
        assert "pytorch_model.bin" in msg
        if allow:
            assert "refused" in msg and "weights_only=True" in msg
            assert ("open" if how == "open" else "mkdir") in msg  # names the refused global
            assert "weights_only=False" not in msg  # torch's advice to load it unsafely is not passed on
        assert not marker.exists()
    assert not marker.exists()


def test_malicious_shard_refused_before_any_weight_is_read(zoo_model, tmp_path, torch_load_calls):
    """One poisoned shard of an indexed checkpoint: refused while opening (meta pass), so no shard
    is ever mapped and nothing runs."""
    d = pickle_model(zoo_model("llama"), tmp_path / "bin", sharded=True)
    shard = d / "pytorch_model-00003-of-00004.bin"
    state = torch.load(shard, weights_only=True)
    marker = tmp_path / "marker"
    state["model.norm.weight"] = _Payload("open", marker)
    torch.save(state, shard)
    torch_load_calls.clear()
    with pytest.raises(CheckpointError, match="pytorch_model-00003-of-00004.bin was refused"):
        HFCheckpoint(d, allow_pickle=True)
    assert torch_load_calls and all(loc == "meta" for _, loc, _, _ in torch_load_calls)
    assert not marker.exists()


def test_cli_refuses_malicious_pickle_with_opt_in(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    marker = tmp_path / "marker"
    torch.save(_state_with_payload("open", marker), d / "pytorch_model.bin")
    save = tmp_path / "out"
    r = run_cli("export", "--model", d, "--allow-pickle", "--to-mcore", "--save", save)
    assert r.returncode == 2
    assert "pytorch_model.bin was refused" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()
    assert_nothing_written(save)


# ---- (d) a regular-looking state dict with a non-tensor entry is refused cleanly -----------------

NOT_A_STATE_DICT = {
    "int-entry": ({"model.norm.weight": torch.ones(4), "step": 5}, "'step' is of type builtins.int"),
    "object-entry": ({"model.norm.weight": torch.ones(4), "args": argparse.Namespace(lr=0.1)},
                     "argparse.Namespace"),
    "nested": ({"state_dict": {"model.norm.weight": torch.ones(4)}}, "'state_dict' is of type builtins.dict"),
    "not-a-dict": ([torch.ones(4)], "holds a list, not a state dict"),
    "non-str-key": ({"model.norm.weight": torch.ones(4), 3: torch.ones(1)}, "key 3 is not a string"),
    "sparse": ({"model.norm.weight": torch.eye(3).to_sparse()}, "sparse_coo tensor"),
    "complex": ({"model.norm.weight": torch.ones(2, dtype=torch.complex64)}, "torch.complex64 tensor"),
}


@pytest.mark.parametrize("case", list(NOT_A_STATE_DICT))
def test_non_tensor_content_refused(tmp_path, case):
    obj, expect = NOT_A_STATE_DICT[case]
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save(obj, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        HFCheckpoint(d, allow_pickle=True)
    assert "pytorch_model.bin" in str(e.value) and expect in str(e.value)


def test_truncated_pickle_refused(zoo_model, tmp_path):
    d = pickle_model(zoo_model("qwen2"), tmp_path / "bin")
    f = d / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="pytorch_model.bin cannot be read as a torch.save state dict"):
        HFCheckpoint(d, allow_pickle=True)


def test_index_problems_refused(zoo_model, tmp_path):
    d = pickle_model(zoo_model("llama"), tmp_path / "bin", sharded=True)
    index_file = d / hfio.PICKLE_INDEX_NAME
    index = json.loads(index_file.read_text())
    name = next(iter(index["weight_map"]))

    def with_map(**changes):
        index_file.write_text(json.dumps({"weight_map": {**index["weight_map"], **changes}}))

    with_map(**{name: "../elsewhere.bin"})
    with pytest.raises(CheckpointError, match="outside"):
        HFCheckpoint(d, allow_pickle=True)
    with_map(**{name: "pytorch_model-00009-of-00009.bin"})
    with pytest.raises(CheckpointError, match="do not exist.*00009"):
        HFCheckpoint(d, allow_pickle=True)
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][name])
    with_map(**{name: other})
    with pytest.raises(CheckpointError, match=f"puts '{name}' in {other}, which does not hold it"):
        HFCheckpoint(d, allow_pickle=True)
