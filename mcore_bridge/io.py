"""Safetensors I/O: a lazy reader that fetches only requested regions, and an atomic writer.

The reader parses every file header itself first (cheap), so names, shapes, dtypes and file
integrity are known before a single weight byte is read. Reads are zero-copy: a tensor is a view of
a private memory mapping of just that tensor's bytes (a region is a view of that view), so only the
pages a caller actually touches come off the disk, and the mapping goes away with the last view --
resident memory stays bounded by the tensors a caller holds, not by the file sizes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files copied verbatim from the source directory next to the converted weights.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
              "added_tokens.json", "chat_template.jinja", "chat_template.json",
              "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked: missing, truncated, or not safetensors."""


# Tensors smaller than this are read with one pread into a private buffer instead of being mapped:
# cheaper for norms and biases, and a caller holding thousands of them holds no mappings.
MAP_MIN_BYTES = 1 << 20


class TensorInfo:
    __slots__ = ("name", "file", "dtype", "shape", "nbytes", "offset")

    def __init__(self, name, file, dtype, shape, nbytes, offset=None):
        self.name, self.file, self.dtype, self.shape, self.nbytes = name, file, dtype, shape, nbytes
        self.offset = offset  # absolute file offset of the first data byte

    def __repr__(self):
        return f"TensorInfo({self.name}, {self.dtype}, {self.shape})"


def read_header(path: Path) -> dict:
    """Parse a safetensors header and check the file holds every byte the header promises."""
    return _parse_header(path)[0]


def _parse_header(path: Path) -> tuple[dict, int]:
    """``(header, data_start)``: tensor ``data_offsets`` count from ``data_start`` in the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, no safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path} is truncated: header of {n} bytes, file of {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: tensors need {8 + n + end} bytes, file has {size}; "
                              f"re-download or re-save it")
    return header, 8 + n


class HFCheckpoint:
    """An HF model directory: ``config.json`` plus one safetensors file or an indexed set."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"--model {self.path}: not a directory")
        cfg = self.path / "config.json"
        if not cfg.exists():
            raise CheckpointError(f"{self.path} has no config.json")
        self.config = json.loads(cfg.read_text())
        self.tensors: dict[str, TensorInfo] = {}
        for file in self._files():
            header, data_start = _parse_header(file)
            for name, meta in header.items():
                if meta["dtype"] not in SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {meta['dtype']}")
                dtype = SAFETENSORS_DTYPES[meta["dtype"]]
                start, stop = meta["data_offsets"]
                self.tensors[name] = TensorInfo(name, file, dtype, tuple(meta["shape"]), stop - start,
                                                data_start + start)
        self._handles: dict[Path, object] = {}

    def _files(self) -> list[Path]:
        index = self.path / INDEX_NAME
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted({self.path / f for f in weight_map.values()})
            missing = [str(f.name) for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{index} lists files that do not exist: {missing}")
            return files
        single = self.path / SINGLE_NAME
        if single.exists():
            return [single]
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            return files
        pickles = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt"))
        if pickles:
            raise CheckpointError(
                f"{self.path} holds only pickle weights ({', '.join(pickles)}); pickles can run code on "
                f"load, so mcore-bridge reads safetensors only. Convert them with "
                f"transformers' save_pretrained(safe_serialization=True) first")
        raise CheckpointError(f"{self.path} has no *.safetensors weights")

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def read(self, name: str, region: tuple[slice, ...] | None = None) -> torch.Tensor:
        """Tensor ``name``, or only ``region`` of it, as a (possibly strided) view of the file's
        bytes: only what the caller touches is read, and treat the result as read-only."""
        info = self.tensors[name]
        whole = region is None or all(s == slice(None) for s in region)
        try:
            tensor = self._map(info)
        except OSError:  # e.g. out of mappings (vm.max_map_count): one mapping per file instead
            handle = self._handles.get(info.file)
            if handle is None:
                handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
            return handle.get_tensor(name) if whole else handle.get_slice(name)[region]
        return tensor if whole else tensor[region]

    @staticmethod
    def _map(info: TensorInfo) -> torch.Tensor:
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes < MAP_MIN_BYTES:
            buf = torch.empty(info.nbytes, dtype=torch.uint8)
            with open(info.file, "rb", buffering=0) as f:
                f.seek(info.offset)
                if f.readinto(memoryview(buf.numpy())) != info.nbytes:
                    raise CheckpointError(f"{info.file}: short read of {info.name!r}")
        else:
            # Copy-on-write private mapping: writable (no torch warning), never writes the file.
            # The tensor keeps the mapping alive; it is unmapped with the last view of it.
            buf = torch.from_numpy(np.memmap(info.file, dtype=np.uint8, mode="c", offset=info.offset,
                                             shape=(info.nbytes,)))
        return buf.view(info.dtype).view(info.shape)

    def close(self):
        self._handles.clear()


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------

def shard_file_name(i: int, n: int) -> str:
    return SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def plan_shards(entries: Iterable[tuple[str, int, int]], max_bytes: int) -> list[dict]:
    """Assign ``(name, nbytes, writer_rank)`` entries to output files.

    Each file belongs to one writer; a writer's tensors fill files in order up to ``max_bytes``.
    Deterministic, so every rank computes the same plan without talking to the others.
    """
    by_writer: dict[int, list[tuple[str, int]]] = {}
    for name, nbytes, writer in entries:
        by_writer.setdefault(writer, []).append((name, nbytes))
    files = []
    for writer in sorted(by_writer):
        current, size = [], 0
        for name, nbytes in by_writer[writer]:
            if current and size + nbytes > max_bytes:
                files.append({"writer": writer, "names": current})
                current, size = [], 0
            current.append(name)
            size += nbytes
        if current:
            files.append({"writer": writer, "names": current})
    n = len(files)
    for i, f in enumerate(files):
        f["file"] = shard_file_name(i, n)
    return files


def write_shard(path: Path, tensors: dict[str, torch.Tensor]):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def write_index(dest: Path, files: list[dict], sizes: dict[str, int]):
    if len(files) == 1:
        return
    weight_map = {name: f["file"] for f in files for name in f["names"]}
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (dest / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(src: Path | None, dest: Path, config: dict):
    """Write ``config.json`` and copy generation config / tokenizer files present in ``src``."""
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if src is None:
        return
    for name in SIDE_FILES[1:]:
        if (src / name).exists():
            shutil.copy2(src / name, dest / name)


def staging_dir(dest: Path) -> Path:
    """Where a save is assembled before it is renamed into place (same filesystem as ``dest``)."""
    return dest.parent / f".{dest.name}.partial"


def prepare_destination(dest: Path, overwrite: bool) -> Path:
    """Check ``dest`` may be written and return a fresh, empty staging directory."""
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise FileExistsError(f"--save {dest} exists and is not empty; pass --overwrite to replace it")
    stage = staging_dir(dest)
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def commit(stage: Path, dest: Path):
    """Move a finished staging directory into place; the old ``dest`` goes only after that."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old"
        if old.exists():
            shutil.rmtree(old)
        dest.rename(old)
    stage.rename(dest)
    if old is not None:
        shutil.rmtree(old)


@contextlib.contextmanager
def collective_output(dest: Path, overwrite: bool, finalize=None):
    """Collective: every rank writes its files into the yielded staging directory; when all ranks
    succeeded, rank 0 runs ``finalize(stage)`` (index, config) and renames it to ``dest``. If any
    rank fails, the staging directory is removed and every rank raises: no partial output."""
    from .runtime.dist import all_ok, rank

    dest = Path(dest).absolute()
    error = None
    if rank() == 0:
        try:
            prepare_destination(dest, overwrite)
        except Exception as e:
            error = e
    if not all_ok(error is None):
        raise error or RuntimeError(f"rank 0 could not prepare {dest}")
    stage = staging_dir(dest)
    try:
        yield stage
    except Exception as e:
        error = e
    ok = all_ok(error is None)
    if rank() == 0:
        try:
            if ok:
                if finalize is not None:
                    finalize(stage)
                commit(stage, dest)
        except Exception as e:
            error, ok = e, False
        if not ok:
            shutil.rmtree(stage, ignore_errors=True)
    ok = all_ok(ok)  # rank 0's finalize/commit may have failed
    if not ok:
        raise error or RuntimeError(f"another rank failed while writing {dest}; nothing was written")
