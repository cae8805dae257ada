"""Writing safetensors files at the I/O floor (issue 21 item 1).

``write_safetensors`` writes the format itself: the JSON header, then each tensor's bytes straight
from its memory in large sequential ``os.write`` calls, then one ``fsync`` for the file.
``safetensors.torch.save_file`` first copies every tensor into a Python ``bytes`` object (a second
full copy of the shard in fresh memory, whose page faults cost as much as the write on a CPU host).
Readers see the same file: the header lists each tensor's dtype, shape and byte range; tensors are
laid out by element size, largest first, so every tensor starts aligned to its element size (the
header is padded with spaces to a multiple of 8), as safetensors itself does.

``BackgroundWriter`` writes finished shards on one thread while the caller prepares the next
(gathers, transforms): at most ``depth`` shards wait. An error on the thread is re-raised, as the
original exception, by the caller's next ``submit`` or by ``close``; nothing after it is written,
and the caller's staging directory (``hf_io.collective_output``) is removed as for any failure.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
from pathlib import Path

import torch

from .splice import Runs, write_runs

WRITE_CHUNK = 64 << 20  # bytes per os.write: large sequential writes, bounded by the tensor's own memory

_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
for _attr, _name in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"), ("float8_e8m0fnu", "F8_E8M0")):
    if hasattr(torch, _attr):
        _NAMES[getattr(torch, _attr)] = _name


def dtype_name(dtype: torch.dtype, name: str) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise TypeError(f"{name}: dtype {dtype} has no safetensors name; convert it (e.g. --dtype bf16)") from None


def _write_all(fd: int, buf) -> None:
    view = memoryview(buf).cast("B")
    while len(view):
        n = os.write(fd, view[:WRITE_CHUNK])
        view = view[n:]


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      fsync: bool = True) -> None:
    """``tensors`` (CPU; or ``splice.Runs``, copied from their files) as one safetensors file at
    ``path``; no copy of a contiguous tensor's bytes."""
    items = []
    for name, t in tensors.items():
        if isinstance(t, Runs):
            items.append((name, t))
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {type(t).__name__} is not a tensor")
        if t.device.type != "cpu":
            raise ValueError(f"{name}: on {t.device}; move it to the CPU before writing")
        items.append((name, t.detach()))
    items.sort(key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in items:
        n = t.nbytes if isinstance(t, Runs) else t.numel() * t.element_size()
        header[name] = {"dtype": dtype_name(t.dtype, name), "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, struct.pack("<Q", len(raw)) + raw)
        for _, t in items:
            if isinstance(t, Runs):
                write_runs(fd, t.runs)
            elif t.numel():
                flat = t.contiguous().reshape(-1)  # a copy only if the caller's tensor is strided
                _write_all(fd, flat.view(torch.uint8).numpy())
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


class BackgroundWriter:
    """``submit(fn, *args)`` runs ``fn(*args)`` on one writer thread, in order, with at most ``depth``
    calls waiting; ``close()`` waits for all and re-raises the first error. Use as a context manager:
    leaving it by an exception stops the thread without running what is still queued."""

    def __init__(self, depth: int = 1):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._reported = False
        self._thread = threading.Thread(target=self._run, name="mcore-bridge-writer", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is None:  # after a failure, drain without writing
                try:
                    job[0](*job[1:])
                except BaseException as e:  # re-raised in the caller's thread
                    self._error = e

    def _raise(self):
        if self._error is not None and not self._reported:  # once; the thread keeps skipping jobs
            self._reported = True
            raise self._error

    def submit(self, fn, *args) -> None:
        self._raise()
        self._queue.put((fn, *args))

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is not None:  # the caller failed: stop after the job in progress
            self._error = self._error or value
            self._queue.put(None)
            self._thread.join()
            return False
        self.close()
        return False
