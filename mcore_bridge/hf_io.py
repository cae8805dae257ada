"""Safetensors I/O: a lazy reader that fetches only requested regions, and an atomic writer.

The reader parses every file header itself first (cheap), so names, shapes, dtypes and file
integrity are known before a single weight byte is read. Reads are zero-copy: a tensor is a view of
a private memory mapping of just that tensor's bytes (a region is a view of that view), so only the
pages a caller actually touches come off the disk, and the mapping goes away with the last view --
resident memory stays bounded by the tensors a caller holds, not by the file sizes.

Pickled ``pytorch_model*.bin`` weights are refused: unpickling can execute code. With the explicit
opt-in (``allow_pickle=True``, ``--allow-pickle``) and no safetensors in the directory, they are
read with ``torch.load(weights_only=True)`` -- which refuses any object other than tensors and plain
containers -- and must then hold a flat ``{name: tensor}`` dict. Names, shapes and dtypes come from a
first pass onto the meta device (no weight bytes); each file is memory-mapped (``mmap=True``) the
first time one of its tensors is read and stays mapped until ``close()``.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import pickle
import re
import shutil
import struct
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from safetensors import safe_open

from .shard_writer import write_safetensors
from .errors import CheckpointError, OutputExists, PeerFailed, WriteError  # noqa: F401  (re-exported)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SINGLE_NAME = "pytorch_model.bin"
PICKLE_SHARD_GLOB = "pytorch_model-*-of-*.bin"
# Files copied verbatim from the source directory next to the converted weights.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
              "added_tokens.json", "chat_template.jinja", "chat_template.json",
              "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")


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


def read_json(path: Path):
    """A JSON file of a checkpoint; ``CheckpointError`` naming it when it is unreadable or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise CheckpointError(f"{path} cannot be read as JSON: {e}") from None


def read_header(path: Path) -> dict:
    """Parse a safetensors header and check the file holds every byte the header promises."""
    return parse_header(path)[0]


def parse_header(path: Path) -> tuple[dict, int]:
    """``(header, data_start)``: tensor ``data_offsets`` count from ``data_start`` in the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, no safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:  # a header as long as the file or more: cut short, or not safetensors at all
            what = "is truncated" if n < 100_000_000 else "is not a safetensors file (or its first bytes are damaged)"
            raise CheckpointError(f"{path} {what}: its first 8 bytes give a header of {n} bytes, the file has "
                                  f"{size}; re-download or re-save it")
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


def _confined(root: Path, index: Path, names) -> None:
    """Refuse index entries that are not plain file names of ``root`` (``../x``, absolute paths,
    subdirectories) or that are symlinks resolving outside it."""
    outside = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in (".", "..")]
    real = root.resolve()
    outside += [n for n in names if n not in outside and (root / n).exists() and (root / n).resolve().parent != real]
    if outside:
        raise CheckpointError(f"{index} names files outside {root}: {sorted(map(str, outside))[:3]}")


class HFCheckpoint:
    """An HF model directory: ``config.json`` plus one safetensors file or an indexed set.

    ``allow_pickle``: when the directory has no safetensors, read ``pytorch_model.bin`` (or its
    indexed / numbered shards) with ``torch.load(weights_only=True)``; without it such a directory
    is refused. Safetensors are always preferred: with them present, pickles are never opened.
    """

    def __init__(self, path: str | os.PathLike, allow_pickle: bool = False, *, files: list[Path] | None = None,
                 config: dict | None = None):
        """``files`` and ``config``: read these safetensors with this config instead of the
        directory's model files and ``config.json`` (e.g. a PEFT adapter)."""
        self.path = Path(path)
        self.allow_pickle = bool(allow_pickle)
        if not self.path.is_dir():
            raise CheckpointError(f"--model {self.path}: not a directory")
        cfg = self.path / "config.json"
        if config is None and not cfg.exists():
            raise CheckpointError(f"{self.path} has no config.json")
        self.config = config if config is not None else read_json(cfg)
        self.tensors: dict[str, TensorInfo] = {}
        self._handles: dict[Path, object] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor] | None] = {}  # pickle -> its mapped tensors
        files = files if files is not None else self._files()
        if files is None:
            self._index_pickles()
            return
        for file in files:
            header, data_start = parse_header(file)
            for name, meta in header.items():
                if name in self.tensors:
                    raise CheckpointError(f"tensor {name!r} is in two files, {self.tensors[name].file} and "
                                          f"{file}: which one is meant is ambiguous; remove one")
                if meta["dtype"] not in SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {meta['dtype']}")
                dtype = SAFETENSORS_DTYPES[meta["dtype"]]
                start, stop = meta["data_offsets"]
                self.tensors[name] = TensorInfo(name, file, dtype, tuple(meta["shape"]), stop - start,
                                                data_start + start)

    def _files(self) -> list[Path] | None:
        """The safetensors files, or None for a pickle-only directory that ``allow_pickle`` admits."""
        index = self.path / INDEX_NAME
        if index.exists():
            weight_map = read_json(index).get("weight_map", {})
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} is not a valid index: weight_map is a {type(weight_map).__name__}")
            _confined(self.path, index, set(weight_map.values()))
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
        if pickles and self.allow_pickle:
            return None
        if pickles:
            shown = ", ".join(pickles[:4]) + (f" and {len(pickles) - 4} more" if len(pickles) > 4 else "")
            raise CheckpointError(
                f"{self.path} holds only pickle weights ({shown}); loading a pickle can execute "
                f"arbitrary code, so mcore-bridge reads safetensors only. Either convert them to "
                f"safetensors first (transformers' save_pretrained(safe_serialization=True)), or, if you "
                f"trust these files, pass --allow-pickle (Python: allow_pickle=True) to read them with "
                f"torch.load(weights_only=True)")
        raise CheckpointError(f"{self.path} has no *.safetensors weights")

    # -- pickled weights (opt-in) ----------------------------------------------------------------
    def _pickle_files(self) -> tuple[list[Path], dict[str, str] | None]:
        """``(files, weight_map or None)``: the index's shards, ``pytorch_model.bin``, or numbered
        ``pytorch_model-*-of-*.bin`` shards -- never other ``*.bin`` (e.g. ``training_args.bin``)."""
        index = self.path / PICKLE_INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError(f"weight_map is a {type(weight_map).__name__}")
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid index (no weight_map): {e}") from None
            names = sorted(set(weight_map.values()), key=str)
            _confined(self.path, index, names)
            missing = [n for n in names if not (self.path / n).is_file()]
            if missing:
                raise CheckpointError(f"{index} lists files that do not exist: {missing}")
            return [self.path / n for n in names], weight_map
        single = self.path / PICKLE_SINGLE_NAME
        if single.is_file():
            return [single], None
        shards = sorted(self.path.glob(PICKLE_SHARD_GLOB))
        if shards:
            return shards, None
        found = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt"))
        raise CheckpointError(
            f"{self.path}: --allow-pickle reads {PICKLE_SINGLE_NAME}, {PICKLE_INDEX_NAME} with its shards, or "
            f"pytorch_model-NNNNN-of-NNNNN.bin shards; found only {', '.join(found)}")

    def _index_pickles(self):
        """Names, shapes and dtypes of every pickled tensor, unpickled onto the meta device: the
        weights_only unpickler runs over the whole file (so a refused object fails here, before any
        weight is read), but no weight byte is read or mapped."""
        files, weight_map = self._pickle_files()
        for file in files:
            for name, t in _load_pickle(file, meta=True).items():
                if name in self.tensors:
                    raise CheckpointError(f"tensor {name!r} is in both {self.tensors[name].file.name} and "
                                          f"{file.name}")
                self.tensors[name] = TensorInfo(name, file, t.dtype, tuple(t.shape),
                                                t.numel() * t.element_size(), None)
            self._pickled[file] = None  # known, not loaded yet
        if weight_map is not None:
            wrong = [n for n, f in weight_map.items() if n not in self.tensors or self.tensors[n].file.name != f]
            if wrong:
                n = wrong[0]
                raise CheckpointError(f"{self.path / PICKLE_INDEX_NAME} puts {n!r} in {weight_map[n]}, which "
                                      f"does not hold it ({len(wrong)} such tensor(s))")

    def _pickle_state(self, file: Path) -> dict[str, torch.Tensor]:
        """The tensors of pickle ``file``, mapped on first use and kept until ``close()``."""
        state = self._pickled.get(file)
        if state is None:
            state = _load_pickle(file, meta=False)
            mine = {n: i for n, i in self.tensors.items() if i.file == file}
            if set(state) != set(mine) or any((tuple(state[n].shape), state[n].dtype) !=
                                              (i.shape, i.dtype) for n, i in mine.items()):
                raise CheckpointError(f"{file} changed since the checkpoint was opened")
            self._pickled[file] = state
        return state

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def read(self, name: str, region: tuple[slice, ...] | None = None) -> torch.Tensor:
        """Tensor ``name``, or only ``region`` of it, as a (possibly strided) view of the file's
        bytes: only what the caller touches is read, and treat the result as read-only."""
        info = self.tensors[name]
        whole = region is None or all(s == slice(None) for s in region)
        if info.offset is None:  # a pickled tensor: a view of its file's mapping
            tensor = self._pickle_state(info.file)[name]
            return tensor if whole else tensor[region]
        try:
            tensor = self._map(info)
        except OSError:  # e.g. out of mappings (vm.max_map_count): one mapping per file instead
            handle = self._handles.get(info.file)
            if handle is None:
                handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
            return handle.get_tensor(info.name) if whole else handle.get_slice(info.name)[region]
        return tensor if whole else tensor[region]

    def read_into(self, name: str, region: tuple[slice, ...] | None, out: torch.Tensor) -> int:
        """Read ``region`` of ``name`` straight into the first bytes of ``out`` with ``pread`` when it
        is one contiguous byte range of the file (whole tensor or a range of leading rows), ``out``
        is a contiguous CPU tensor of the same dtype and large enough; returns the bytes read, 0 when
        those conditions do not hold (then use ``read``). No mapping, no temporary."""
        rows = self.row_range(name, region)
        if rows is None or out.dtype != rows[0].dtype or out.device.type != "cpu" or not out.is_contiguous():
            return 0
        info, offset, row, n = rows
        nbytes = n * row
        if nbytes == 0 or nbytes > out.numel() * out.element_size():
            return 0
        dest = memoryview(out.detach().view(-1).view(torch.uint8).numpy())[:nbytes]
        fd = os.open(info.file, os.O_RDONLY)
        try:
            done = 0
            while done < nbytes:
                n = os.preadv(fd, [dest[done:done + (1 << 30)]], offset + done)
                if n <= 0:
                    raise CheckpointError(f"{info.file}: short read of {info.name!r}")
                done += n
        finally:
            os.close(fd)
        return nbytes

    def row_range(self, name: str, region: tuple[slice, ...] | None):
        """``(info, file offset, bytes per row, rows)`` when ``region`` of ``name`` is one contiguous
        byte range of a safetensors file (the whole tensor or a range of leading rows), else None."""
        info = self.tensors.get(name)
        if info is None or info.offset is None or not info.shape:
            return None
        region = region or tuple(slice(None) for _ in info.shape)
        if len(region) != len(info.shape) or any(r.indices(n) != (0, n, 1) for r, n in zip(region[1:], info.shape[1:])):
            return None
        start, stop, step = region[0].indices(info.shape[0])
        if step != 1 or info.shape[0] == 0:
            return None
        row = info.nbytes // info.shape[0]
        return info, info.offset + start * row, row, max(stop - start, 0)

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
        for file in self._pickled:  # unmapped once the caller drops its views too
            self._pickled[file] = None


PICKLE_DTYPES = frozenset(SAFETENSORS_DTYPES.values())
# weights_only=True is not a safe boundary before torch 2.6 (CVE-2025-32434: code execution).
MIN_TORCH_FOR_PICKLE = (2, 6)


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _weights_only_reason(message: str) -> str:
    """The one line of torch's weights_only refusal that says what was refused (its advice to
    retry with weights_only=False or to allowlist the global is left out on purpose)."""
    skip = ("Weights only load failed", "Check the documentation", "(1)", "(2)", "In PyTorch")
    for line in message.splitlines():
        line = line.strip()
        if line and not line.startswith(skip):
            line = line.split("WeightsUnpickler error:", 1)[-1].strip()
            return line.split(". Please use")[0].split(" Please use")[0].rstrip(".")
    return message.strip().splitlines()[0] if message.strip() else "refused"


def _load_pickle(file: Path, meta: bool) -> dict[str, torch.Tensor]:
    """A ``torch.save``d ``{name: tensor}`` dict via ``torch.load(weights_only=True)``: onto the meta
    device (``meta``: shapes only, no data read), else on CPU memory-mapped (``mmap=True``). The
    legacy pre-zip format cannot be mapped: it is read whole into memory, with a warning."""
    if torch.__version__ < MIN_TORCH_FOR_PICKLE:
        raise CheckpointError(f"{file}: refusing to unpickle with torch {torch.__version__}: its "
                              f"weights_only=True loader can be made to run code (CVE-2025-32434); "
                              f"use torch >= 2.6 or convert the checkpoint to safetensors")
    kwargs = dict(map_location="meta" if meta else "cpu", weights_only=True)
    if not meta:
        if _is_zip(file):
            kwargs["mmap"] = True
        else:
            warnings.warn(f"{file} is in torch's legacy (pre-1.6, non-zip) format, which cannot be "
                          f"memory-mapped: reading it whole into memory", stacklevel=3)
    try:
        # private (copy-on-write) mapping even if the process default was changed to MAP_SHARED:
        # a caller writing into a view must never write the file
        with torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE) if kwargs.get("mmap") \
                else contextlib.nullcontext():
            state = torch.load(file, **kwargs)
    except pickle.UnpicklingError as e:
        why = _weights_only_reason(str(e))
        raise CheckpointError(
            f"{file} was refused: it holds an object other than tensors and plain containers, which "
            f"torch.load(weights_only=True) will not load ({why}). Loading such a pickle normally could "
            f"run code; do not load it unless you trust it, and convert trusted weights to safetensors"
        ) from None
    except Exception as e:  # truncated / not a torch.save file / TorchScript archive ...
        raise CheckpointError(f"{file} cannot be read as a torch.save state dict: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, not a state dict {{name: tensor}}")
    bad = [(k, v) for k, v in state.items()
           if not isinstance(k, str) or type(v) not in (torch.Tensor, torch.nn.Parameter)
           or v.layout != torch.strided or v.is_nested or v.dtype not in PICKLE_DTYPES]
    if bad:
        def what(k, v):
            if not isinstance(k, str):
                return f"key {k!r} is not a string"
            if type(v) in (torch.Tensor, torch.nn.Parameter):
                kind = "nested" if v.is_nested else v.layout if v.layout != torch.strided else v.dtype
                return f"{k!r} is a {kind} tensor"
            return f"{k!r} is of type {type(v).__module__}.{type(v).__qualname__}"

        shown = "; ".join(what(k, v) for k, v in bad[:3])
        raise CheckpointError(f"{file} is not a flat state dict of tensors ({len(bad)} entr"
                              f"{'y' if len(bad) == 1 else 'ies'} refused: {shown}); a state dict "
                              f"maps names to dense tensors of a safetensors dtype")
    return {k: v.detach() if type(v) is torch.nn.Parameter else v for k, v in state.items()}


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
    from .runtime.faults import maybe_fail

    try:
        maybe_fail("write")  # tests only: MCORE_BRIDGE_FAULT (runtime/faults.py)
        write_safetensors(Path(path), tensors, metadata={"format": "pt"})
    except OSError as e:
        raise WriteError(e.errno, e.strerror or str(e), str(path)) from None
    except Exception as e:  # safetensors reports I/O errors as SafetensorError("... (os error N)")
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise WriteError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


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
        raise OutputExists(f"--save {dest} exists and is not empty; pass --overwrite to replace it")
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


def _agree(all_ok, ok: bool, dest: Path) -> bool:
    try:
        return all_ok(ok)
    except Exception as e:  # a peer's process ended: its connections closed under the collective
        raise PeerFailed(f"another rank failed while writing {dest} ({str(e).splitlines()[0][:160]}); "
                         f"nothing was written") from None


@contextlib.contextmanager
def collective_output(dest: Path, overwrite: bool, finalize=None):
    """Collective: every rank writes its files into the yielded staging directory; when all ranks
    succeeded, rank 0 runs ``finalize(stage)`` (index, config) and renames it to ``dest``. If any
    rank fails, the staging directory is removed and every rank raises: no partial output.

    A rank whose body fails does not enter the agreement collective: the others may be inside the
    body's own collectives (export gathers), which it would never match, and would wait there for
    the full timeout. It raises at once instead; when its process exits (the CLI does at once) its
    connections close and the others' pending collective fails within seconds, and rank 0 removes
    the staging directory whatever collective failed under it."""
    from .runtime.dist import all_ok, rank, world_size

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
    committed = False
    try:
        try:
            yield stage
        except Exception as e:
            error = e
        if error is not None and world_size() > 1:
            raise error
        ok = _agree(all_ok, error is None, dest)
        if rank() == 0 and ok:
            try:
                if finalize is not None:
                    finalize(stage)
                commit(stage, dest)
                committed = True
            except Exception as e:
                error, ok = e, False
        ok = _agree(all_ok, ok, dest)  # rank 0's finalize/commit may have failed
        if not ok:
            raise error or RuntimeError(f"another rank failed while writing {dest}; nothing was written")
    finally:
        if rank() == 0 and not committed:
            shutil.rmtree(stage, ignore_errors=True)
