"""Writing torch_dist checkpoints with one pass over the bytes.

The files are what torch.distributed.checkpoint's ``FileSystemWriter`` writes and megatron-core
reads back (through DCP's ``FileSystemReader``, which ``torch.load``s each record): ``__R_N.distcp``
files of records, one uncompressed ``torch.save`` zip per tensor, the pickled object items as raw
bytes, and the ``.metadata`` pickle that the base class writes in ``finish``. What differs is how a
tensor record is written: DCP stages each tensor (a full copy of any view into a larger storage,
e.g. megatron's gate/up halves of ``linear_fc1``) and pushes it through ``torch.save``'s zip writer
and a buffered stream. :class:`DirectWriter` asks ``torch.save`` for the record's small parts only
(``torch.serialization.skip_data``: the zip entries and ``data.pkl`` of a standalone tensor of the
same dtype and shape, the data left out), then writes the tensor's own bytes in large ``os.write``
calls from its memory, views included. One ``fsync`` per file; ``thread_count`` files written by
as many threads. The data entry carries CRC-32 0, as ``torch.save`` writes under
``torch.serialization.set_crc32_options(False)`` (``torch.load`` does not check it; computing it
would be one more pass over the bytes).
"""

from __future__ import annotations

import io
import os
import threading
import traceback

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from .dcp_reader import tensor_bytes
from .splice import Unsafe, write_runs

_CHUNK = 64 << 20  # bytes per os.write


def available() -> bool:
    """Whether this torch offers what the direct writer needs (else DCP's writer is used)."""
    import torch.distributed.checkpoint.filesystem as fs

    needed = ("DEFAULT_SUFFIX", "_item_size", "_StorageInfo", "_StoragePrefix")
    return all(hasattr(fs, n) for n in needed) and hasattr(torch.serialization, "skip_data")


class _Sparse(io.RawIOBase):
    """A write sink remembering what was written where (``skip_data`` seeks over the data)."""

    def __init__(self):
        super().__init__()
        self.pos, self.parts = 0, []

    def writable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=0):
        end = max((o + len(b) for o, b in self.parts), default=0)
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else end + pos
        return self.pos

    def write(self, b):
        self.parts.append((self.pos, bytes(b)))
        self.pos += len(b)
        return len(b)


def record_parts(shape, dtype) -> tuple[bytes, bytes, int]:
    """(bytes before the data, bytes after it, data length) of the ``torch.save`` record of a
    contiguous tensor of ``shape``/``dtype``: what ``torch.save`` writes, less the data."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    sink = _Sparse()
    with torch.serialization.skip_data():
        torch.save(torch.empty(shape, dtype=dtype), sink)
    parts = sorted(sink.parts)
    gaps = [(i, parts[i - 1][0] + len(parts[i - 1][1])) for i in range(1, len(parts))
            if parts[i][0] != parts[i - 1][0] + len(parts[i - 1][1])]
    if nbytes == 0 and not gaps:
        return b"".join(b for _, b in parts), b"", 0
    if len(gaps) != 1 or parts[gaps[0][0]][0] - gaps[0][1] != nbytes:
        raise RuntimeError(f"torch.save under skip_data left {len(gaps)} gap(s) for a {nbytes}-byte tensor "
                           f"{tuple(shape)} {dtype}; expected one of its size")
    i = gaps[0][0]
    return b"".join(b for _, b in parts[:i]), b"".join(b for _, b in parts[i:]), nbytes


def _write_all(fd: int, data) -> None:
    with memoryview(data) as whole, whole.cast("B") as view:
        done = 0
        while done < len(view):
            with view[done:done + _CHUNK] as part:
                done += os.write(fd, part)


def _cpu_contiguous(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t if t.is_contiguous() else t.contiguous()


def _split(items, bins: int):
    """Items over ``bins`` files: object items round-robin, tensors largest first onto the
    lightest file (DCP's own split)."""
    from torch.distributed.checkpoint.filesystem import _item_size

    buckets, sizes = [[] for _ in range(bins)], [0] * bins
    objects = [w for w in items if w.type == WriteItemType.BYTE_IO]
    tensors = sorted((w for w in items if w.type != WriteItemType.BYTE_IO), key=_item_size, reverse=True)
    for i, w in enumerate(objects):
        buckets[i % bins].append(w)
    for w in tensors:
        k = sizes.index(min(sizes))
        buckets[k].append(w)
        sizes[k] += _item_size(w)
    return [b for b in buckets if b] or [[]]


class DirectWriter(FileSystemWriter):
    """DCP's ``FileSystemWriter`` with tensor records written from the tensors' own memory (see
    the module docstring). Planning, file naming and ``.metadata`` are the base class's.
    ``windows`` (``splice.Windows``): a tensor lying in a spliced parameter is copied from its
    source files' byte ranges instead."""

    windows = None

    def write_data(self, plan, planner) -> Future:
        from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX

        prefix = plan.storage_data.prefix
        jobs = [(f"{prefix}{i}{DEFAULT_SUFFIX}", bucket)
                for i, bucket in enumerate(_split(plan.items, max(1, self.thread_count)))]
        results: list[list[WriteResult]] = [[] for _ in jobs]
        errors: list[BaseException] = []

        def work(k):
            try:
                results[k] = self._write_file(*jobs[k], planner)
            except BaseException as e:  # re-raised below, in the caller's thread
                # drop the failed frames' locals (resolved tensors, planner, buffers): kept in the
                # traceback, a later gc.collect() crashed Python 3.12 with megatron-core 0.19.2
                # (segfault; measured, not root-caused); the traceback's lines are kept
                traceback.clear_frames(e.__traceback__)
                errors.append(e)

        threads = [threading.Thread(target=work, args=(k,), name=f"dcp-writer-{k}") for k in range(1, len(jobs))]
        for t in threads:
            t.start()
        work(0)
        for t in threads:
            t.join()
        if errors:
            error = errors.pop(0)
            errors.clear()  # no cycle list -> exception -> traceback -> this frame -> list
            raise error
        fut: Future = Future()
        fut.set_result([r for rs in results for r in rs])
        return fut

    def _write_file(self, file_name: str, items, planner) -> list[WriteResult]:
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        out = []
        fd = os.open(os.path.join(self.path, file_name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            offset = 0
            for item in sorted(items, key=lambda w: w.type != WriteItemType.BYTE_IO):  # objects first, as DCP
                data = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    body = data.getbuffer()
                    _write_all(fd, body)
                    length = len(body)
                elif self.windows is not None and self.windows.runs_in(data) is not None:
                    head, tail, nbytes = record_parts(data.shape, data.dtype)
                    _write_all(fd, head)
                    write_runs(fd, self.windows.runs_in(data))
                    _write_all(fd, tail)
                    length = len(head) + nbytes + len(tail)
                else:
                    head, tail, nbytes = record_parts(data.shape, data.dtype)
                    with tensor_bytes(_cpu_contiguous(data)) as raw:
                        if len(raw) != nbytes:
                            raise RuntimeError(f"{item.index.fqn}: {len(raw)} bytes for a {nbytes}-byte record")
                        _write_all(fd, head)
                        _write_all(fd, raw)
                        _write_all(fd, tail)
                    length = len(head) + nbytes + len(tail)
                out.append(WriteResult(index=item.index, size_in_bytes=length,
                                       storage_data=_StorageInfo(file_name, offset, length)))
                offset += length
            if self.sync_files:
                os.fsync(fd)
        finally:
            os.close(fd)
        return out


def writer_for(path: str, thread_count: int, windows=None):
    """The direct writer where this torch supports it, else DCP's own ``FileSystemWriter``
    (which cannot write spliced parameters: ``windows`` is then refused)."""
    if not available():
        if windows is not None:
            raise Unsafe("this torch lacks what the direct torch_dist writer needs")
        return FileSystemWriter(path, thread_count=thread_count)
    writer = DirectWriter(path, thread_count=thread_count)
    writer.windows = windows
    return writer


__all__ = ["DirectWriter", "available", "record_parts", "writer_for"]
