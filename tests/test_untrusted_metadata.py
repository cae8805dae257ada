"""Untrusted torch_dist checkpoints: the ``.metadata`` pickle and the byte items that
torch.distributed.checkpoint unpickles without restriction. Only the exact classes of
``untrusted.DCP_METADATA`` are built; payloads that name allowed modules but other classes, plain
code-running globals, copyreg paths, other opcodes, storage entries pointing outside the checkpoint
and byte items that would run code are refused, with nothing built. Real metadata written by
megatron-core's own ``dist_checkpointing.save`` (dense, MoE, LoRA adapter) is accepted."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mcore_bridge import dist_ckpt, untrusted
from mcore_bridge.hf_io import CheckpointError
from tests.test_cli import assert_nothing_written, run_cli


def _call(module: str, name: str, *args, opcode: bytes = b"R") -> bytes:
    """A protocol-2 pickle: ``module.name(*args)`` through GLOBAL + REDUCE (or NEWOBJ ``b'\\x81'``)."""
    body = pickle.dumps(args, protocol=2)[2:-1]  # the args tuple without PROTO and STOP
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + body + opcode + b"."


class Marker:
    """Building one creates its file: proof that the unpickler constructed it."""

    def __init__(self, path):
        Path(path).write_text("built")


@pytest.fixture(scope="module")
def real_ckpts(zoo_model, tmp_path_factory):
    """torch_dist checkpoints written by megatron-core's dist_checkpointing.save through the CLI:
    dense at tp2, MoE at ep2, and a LoRA adapter-only checkpoint."""
    import peft
    import transformers

    root = tmp_path_factory.mktemp("dcp")
    hf = transformers.AutoModelForCausalLM.from_pretrained(zoo_model("qwen3"), dtype=torch.float32)
    peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                            init_lora_weights=False)).save_pretrained(root / "peft")
    runs = {"dense": ("qwen2", "--tp", "2"), "moe": ("qwen3_moe", "--ep", "2"),
            "lora": ("qwen3", "--adapters", root / "peft")}
    out = {}
    for kind, (model, *flags) in runs.items():
        out[kind] = root / kind
        r = run_cli("export", "--model", zoo_model(model), *flags, "--to-mcore", "--save", out[kind], "--device", "cpu")
        assert r.returncode == 0, r.stderr[-3000:]
    return out


def _release(ckpt: Path) -> Path:
    return ckpt / "release"


def test_real_metadata_accepted_and_needs_every_listed_global(real_ckpts):
    """Megatron's own metadata loads; the globals it asks for are all listed (recorded here with a
    spying unpickler), and the allow-list is exact: nothing is admitted by module prefix."""
    asked = set()

    class Spy(pickle.Unpickler):
        def find_class(self, module, name):
            asked.add((module, name))
            return super().find_class(module, name)

    for kind, ckpt in real_ckpts.items():
        meta = untrusted.check_dcp_metadata(_release(ckpt))
        assert meta.state_dict_metadata, kind
        Spy(io.BytesIO((_release(ckpt) / ".metadata").read_bytes())).load()
    assert asked <= untrusted.DCP_METADATA
    assert ("torch.distributed.checkpoint.metadata", "Metadata") in asked
    for module, name in untrusted.DCP_METADATA:  # each entry names something that exists
        assert untrusted.AllowListUnpickler(io.BytesIO(b"")).find_class(module, name) is not None


HOSTILE = {  # (module, name, args): allowed modules' other names, and plain code-running globals
    "dcp-ThreadPoolExecutor": ("torch.distributed.checkpoint._async_process_executor", "ThreadPoolExecutor", (4,)),
    "dcp-process-executor": ("torch.distributed.checkpoint._async_process_executor",
                             "_ProcessBasedAsyncCheckpointExecutor", ()),
    "dcp-TCPStore": ("torch.distributed.checkpoint._async_process_executor", "TCPStore",
                     ("127.0.0.1", 29999, 1, True)),
    "dcp-Path": ("torch.distributed.checkpoint.filesystem", "Path", ("/etc/passwd",)),
    "dcp-os": ("torch.distributed.checkpoint.filesystem", "os", ()),
    "dcp-pickle-loads": ("torch.distributed.checkpoint.filesystem", "pickle.loads", (b"x",)),
    "megatron-dist-helpers": ("megatron.core.dist_checkpointing.strategies.async_utils", "mp", ()),
    "pathlib.Path": ("pathlib", "Path", ("/etc/passwd",)),
    "torch.load": ("torch", "load", ("/etc/passwd",)),
    "copyreg._reconstructor": ("copyreg", "_reconstructor", ()),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_other_names_of_allowed_modules_refused(tmp_path, case):
    module, name, args = HOSTILE[case]
    for opcode in (b"R", b"\x81"):  # REDUCE and NEWOBJ
        with pytest.raises(CheckpointError, match=f"refusing to unpickle {module}.{name}: not checkpoint metadata"):
            untrusted.loads(_call(module, name, *args, opcode=opcode))
    assert not torch.distributed.is_initialized()


class MarkerNew:
    """Its ``__new__`` creates the file: what NEWOBJ calls."""

    def __new__(cls, path):
        Path(path).write_text("built")
        obj = super().__new__(cls)
        obj.path = str(path)
        return obj

    def __getnewargs__(self):
        return (self.path,)


PAYLOADS = {  # marker path -> a pickle that creates it when unpickled without restriction
    "os.system": lambda m: _call("os", "system", f"touch {m}"),
    "builtins.eval": lambda m: _call("builtins", "eval", f"open({str(m)!r}, 'w')"),
    "subprocess.Popen": lambda m: _call("subprocess", "Popen", ["touch", str(m)]),
    "Marker-REDUCE": lambda m: _call(__name__, "Marker", str(m)),
    "Marker-NEWOBJ": lambda m: pickle.dumps(MarkerNew(m), protocol=2),
}


@pytest.mark.parametrize("how", list(PAYLOADS))
def test_code_running_payloads_refused_with_nothing_built(tmp_path, how):
    control = tmp_path / "control"  # the payload is live under plain pickle
    obj = pickle.loads(PAYLOADS[how](control))
    if isinstance(obj, subprocess.Popen):
        obj.wait()
    assert control.exists()
    control.unlink()
    marker = tmp_path / "marker"
    payload = PAYLOADS[how](marker)
    marker.unlink(missing_ok=True)  # MarkerNew(m) made one while building the payload
    ckpt = tmp_path / "release"
    ckpt.mkdir()
    (ckpt / ".metadata").write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"\.metadata: refusing to unpickle"):
        dist_ckpt.check_metadata(ckpt)
    time.sleep(0.2)  # a started process would have touched it by now
    assert not marker.exists()


def test_opcodes_outside_the_list_refused_before_anything_runs(tmp_path):
    def inst(m):  # protocol 0 INST: open(m, 'w')
        return b"(V" + str(m).encode() + b"\nVw\nibuiltins\nopen\n."

    pickle.loads(inst(tmp_path / "control")).close()  # control: live under plain pickle
    assert (tmp_path / "control").exists()
    marker = tmp_path / "marker"
    ext = b"\x80\x02\x82\x01."  # EXT1 code 1
    persid = b"\x80\x02X\x01\x00\x00\x00x\x94Q."  # BINPERSID
    for data, op in ((inst(marker), "INST"), (ext, "EXT1"), (persid, "BINPERSID")):
        with pytest.raises(CheckpointError, match=f"opcode {op}"):
            untrusted.loads(data)
    assert not marker.exists()


def _rewrite(ckpt: Path, edit) -> None:
    """Re-pickle ``ckpt``'s metadata after ``edit(meta)`` (as a forger would, with plain pickle)."""
    meta = pickle.loads((ckpt / ".metadata").read_bytes())
    edit(meta)
    (ckpt / ".metadata").write_bytes(pickle.dumps(meta))


def _copy(real_ckpts, tmp_path, kind="dense") -> Path:
    dest = tmp_path / kind
    shutil.copytree(real_ckpts[kind], dest)
    return dest


def test_storage_entries_outside_the_checkpoint_refused(real_ckpts, tmp_path):
    """An allowed class with hostile arguments: a _StorageInfo naming a file outside the checkpoint
    (torch would read it into a tensor and the export would write it out)."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 10**6)
    ckpt = _release(_copy(real_ckpts, tmp_path))
    (ckpt / "link.distcp").symlink_to(secret)
    original = (ckpt / ".metadata").read_bytes()
    cases = {"../secret": "not a file of the checkpoint", str(secret): "not a file of the checkpoint",
             "link.distcp": "not a file inside", "missing.distcp": "not a file inside"}
    for rel, expect in cases.items():
        (ckpt / ".metadata").write_bytes(original)

        def point(meta, rel=rel):
            key = next(iter(meta.storage_data))
            meta.storage_data[key].relative_path = rel

        _rewrite(ckpt, point)
        with pytest.raises(CheckpointError, match=expect):
            untrusted.check_dcp_metadata(ckpt)
    (ckpt / ".metadata").write_bytes(original)
    _rewrite(ckpt, lambda meta: setattr(next(iter(meta.storage_data.values())), "length", 10**9))
    with pytest.raises(CheckpointError, match="not inside __"):
        untrusted.check_dcp_metadata(ckpt)


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _poison_byte_item(ckpt: Path, marker: Path) -> str:
    """Append a torch.save pickle that runs ``os.mkdir(marker)`` to a .distcp file and point a byte
    item (an ``_extra_state``) at it; returns the item's name."""
    meta = pickle.loads((ckpt / ".metadata").read_bytes())
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    fqn = next(k for k, v in meta.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    info = next(v for k, v in meta.storage_data.items() if k.fqn == fqn)
    buf = io.BytesIO()
    torch.save(_Evil(marker), buf)
    with open(ckpt / info.relative_path, "ab") as f:
        info.offset, info.length = f.tell(), len(buf.getvalue())
        f.write(buf.getvalue())
    (ckpt / ".metadata").write_bytes(pickle.dumps(meta))
    return fqn


def test_byte_items_that_would_run_code_refused(real_ckpts, tmp_path):
    """torch.distributed.checkpoint loads byte items with torch.load(weights_only=False); a
    poisoned one is refused by the check, and megatron-core's load is never reached (CLI: exit 2)."""
    root = _copy(real_ckpts, tmp_path)
    marker = tmp_path / "pwned"
    fqn = _poison_byte_item(_release(root), marker)
    # control: the item is live -- what DefaultLoadPlanner.load_bytes does runs it
    meta = pickle.loads((_release(root) / ".metadata").read_bytes())
    info = next(v for k, v in meta.storage_data.items() if k.fqn == fqn)
    with open(_release(root) / info.relative_path, "rb") as f:
        f.seek(info.offset)
        torch.load(io.BytesIO(f.read(info.length)), weights_only=False)
    assert marker.exists()
    marker.rmdir()
    with pytest.raises(CheckpointError, match=f"byte item '{fqn}' is not plain data.*posix.mkdir"):
        untrusted.check_dcp_metadata(_release(root))
    save = tmp_path / "hf"
    r = run_cli("export", "--load", root, "--to-hf", "--save", save, "--device", "cpu")
    assert r.returncode != 0, r.stderr[-3000:]  # 2 from the rank; torchrun (two ranks here) reports 1
    assert f"byte item '{fqn}' is not plain data" in r.stderr
    assert not marker.exists()
    assert_nothing_written(save)


def test_byte_items_the_load_does_not_read_are_not_checked(real_ckpts, tmp_path):
    """Only the byte items a load reads (its ShardedObjects, e.g. ``_extra_state``) are unpickled by
    DCP, so only those are checked: an entry no model asks for (in a Megatron-LM checkpoint: RNG
    state, optimizer objects) does not block the checkpoint, and is never unpickled; with
    ``objects=None`` every byte item is checked and a hostile one refused."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    ckpt = _release(_copy(real_ckpts, tmp_path))
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(_Evil(marker), buf)
    meta = pickle.loads((ckpt / ".metadata").read_bytes())
    model_objects = {k.split("/shard_")[0] for k, v in meta.state_dict_metadata.items()
                     if isinstance(v, BytesStorageMetadata)}
    file = next(iter(meta.storage_data.values())).relative_path
    with open(ckpt / file, "ab") as f:
        offset = f.tell()
        f.write(buf.getvalue())
    fqn = "rng_state/shard_0.0_1.1"
    meta.state_dict_metadata[fqn] = BytesStorageMetadata()
    meta.storage_data[MetadataIndex(fqn)] = _StorageInfo(file, offset, len(buf.getvalue()))
    (ckpt / ".metadata").write_bytes(pickle.dumps(meta))
    untrusted.check_dcp_metadata(ckpt, model_objects)
    with pytest.raises(CheckpointError, match="byte item 'rng_state/shard_0.0_1.1' is not plain data.*posix.mkdir"):
        untrusted.check_dcp_metadata(ckpt)
    assert not marker.exists()


def test_clean_copy_still_exports(real_ckpts, tmp_path):
    """Negative control for the test above: the unpoisoned copy converts."""
    root = _copy(real_ckpts, tmp_path)
    r = run_cli("export", "--load", root, "--to-hf", "--save", tmp_path / "hf", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
