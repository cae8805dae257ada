"""Conversions that only move bytes (issue 21 item 1).

Most megatron parameters are whole rows of the source's tensors in the source's dtype: a norm, a
column-parallel shard, q/k/v interleaved per query group, [gate; up], the vocabulary rows plus zero
padding. Converting such a parameter from one file to another is a byte copy, and the kernel does
it best: :func:`write_runs` moves the source file's ranges into the output with
``copy_file_range`` (page cache to page cache, as ``cp`` does), so the parameter is never read
into memory: no first touch of freshly allocated parameters, no copy in and copy out (HF ->
torch_dist of a 4 GB checkpoint: 8.1 -> 4.2 s on CPU, start-up 3.3 s of each; ``bench/README.md``).

:func:`plan` gives a parameter's :class:`Runs` (the file ranges and zero fills that make its bytes,
from the transform's ``row_runs`` and the checkpoint's ``row_range``), or None when it is anything
else (a row-parallel split, a dtype cast, a quantised or pickled source, copies that loading must
compare): those are loaded as usual. The loader fills a ``spliced`` dict instead of the model for
the parameters that have runs, and ``checkpoint.save_mcore`` writes them from the runs; those
parameters are left unwritten in the model, so this serves a conversion that writes the model out
and nothing else (the CLI's ``export --to-mcore``).

The plain format writes the parameters themselves. torch_dist writes what megatron's sharded state
dict holds: :class:`Windows` finds the runs of a tensor that is a contiguous view of a spliced
parameter (``dcp_writer.DirectWriter``), and ``check`` refuses, before anything is written, a
sharded state dict holding anything else computed from the model (a strided view of a spliced
parameter, a tensor that views no parameter): :class:`Unsafe`, upon which the CLI loads every
parameter and writes again. The other direction (Megatron -> HF) is ``unsplice``.
"""

from __future__ import annotations

import bisect
import dataclasses
import errno
import os

import torch

_CHUNK = 64 << 20  # bytes per copy_file_range / write call
# copy_file_range not offered for this pair of files (another filesystem, an old kernel): pread + write
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.ETXTBSY}


@dataclasses.dataclass
class Runs:
    """A tensor's bytes as source file ranges ``(path, offset, length)`` and zero fills
    ``(None, 0, length)``, in order."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    runs: list[tuple[object, int, int]]

    @property
    def nbytes(self) -> int:
        return sum(n for _, _, n in self.runs)

    def element_size(self) -> int:
        return self.dtype.itemsize

    def read(self) -> torch.Tensor:
        """The tensor these runs make, read into memory (for a caller that needs its values)."""
        buf = bytearray(self.nbytes)
        view, at = memoryview(buf), 0
        for path, offset, n in self.runs:
            if path is not None:
                with open(path, "rb", buffering=0) as f:
                    f.seek(offset)
                    if f.readinto(view[at:at + n]) != n:
                        raise OSError(errno.EIO, f"{path}: ended early (offset {offset}, {n} bytes)")
            at += n
        return torch.frombuffer(buf, dtype=torch.uint8).view(self.dtype).reshape(self.shape) if buf else \
            torch.empty(self.shape, dtype=self.dtype)


class Unsafe(RuntimeError):
    """A write met a tensor that is neither a spliced parameter's contiguous window nor a view of a
    loaded parameter: it may have been computed from unloaded memory."""


def plan(ckpt, transform, names, regions, target: torch.Tensor, tp: int, rank: int) -> Runs | None:
    """The runs of ``target`` (a parameter's shard, loaded from ``regions`` of ``names`` by
    ``transform``) when it is whole rows of safetensors files in its own dtype; None otherwise."""
    row_range = getattr(ckpt, "row_range", None)
    if row_range is None or target.dim() == 0 or not target.is_contiguous():
        return None
    sources = transform.region_sources(len(regions))
    pieces = [row_range(names[i], r) for i, r in zip(sources, regions)]
    if any(p is None or p[0].dtype != target.dtype for p in pieces):
        return None
    row = target[0].numel() * target.element_size() if target.shape[0] else 0
    if any(p[2] != row for p in pieces):  # trailing dims differ from the shard's: not a concatenation of rows
        return None
    order = transform.row_runs([p[3] for p in pieces], tuple(target.shape), tp, rank)
    if order is None:
        return None
    runs, rows = [], 0
    for piece, start, stop in order:
        if not 0 <= start <= stop or (piece is not None and stop > pieces[piece][3]):
            return None
        if piece is None:
            run = (None, 0, (stop - start) * row)
        else:
            info, offset = pieces[piece][0], pieces[piece][1]
            run = (info.file, offset + start * row, (stop - start) * row)
        last = runs[-1] if runs else None
        if last and last[0] == run[0] and (run[0] is None or last[1] + last[2] == run[1]):
            runs[-1] = (last[0], last[1], last[2] + run[2])
        elif run[2]:
            runs.append(run)
        rows += stop - start
    if rows != target.shape[0]:
        return None
    return Runs(target.dtype, tuple(target.shape), runs)


def write_runs(fd: int, runs: list[tuple[object, int, int]]) -> None:
    """Append ``runs`` to the file open at ``fd`` (at its current position)."""
    handles: dict = {}
    try:
        for path, offset, length in runs:
            if path is None:
                _write_zeros(fd, length)
                continue
            src = handles.get(path)
            if src is None:
                src = handles[path] = os.open(path, os.O_RDONLY)
            _copy(src, fd, offset, length, path)
    finally:
        for src in handles.values():
            os.close(src)


def _copy(src: int, dst: int, offset: int, length: int, path) -> None:
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src, dst, min(length - done, _CHUNK), offset + done)
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
            return _read_write(src, dst, offset + done, length - done, path)
        if n <= 0:
            raise OSError(errno.EIO, f"{path}: ended {length - done} bytes early (offset {offset + done})")
        done += n


def _read_write(src: int, dst: int, offset: int, length: int, path) -> None:
    buf = bytearray(min(length, _CHUNK))
    view = memoryview(buf)
    done = 0
    while done < length:
        n = os.preadv(src, [view[:min(length - done, len(buf))]], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"{path}: ended {length - done} bytes early (offset {offset + done})")
        written = 0
        while written < n:
            written += os.write(dst, view[written:n])
        done += n


def _write_zeros(fd: int, length: int) -> None:
    zeros = bytes(min(length, _CHUNK))
    while length:
        length -= os.write(fd, zeros[:min(length, len(zeros))])


def sub_runs(runs: list[tuple[object, int, int]], offset: int, length: int) -> list[tuple[object, int, int]]:
    """Bytes ``offset:offset + length`` of the bytes ``runs`` make, as runs."""
    out = []
    for path, start, n in runs:
        if length <= 0:
            break
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, length)
        out.append((path, start + offset if path is not None else 0, take))
        length -= take
        offset = 0
    return out


class Windows:
    """The memory of the spliced parameters (``state``: (chunk, name) -> the rank's tensor, as
    ``Bridge.state``), to find the runs of a tensor written from it; ``models``' parameters and
    buffers are the memory a tensor may otherwise view."""

    def __init__(self, state: dict, spliced: dict, models):
        spans = sorted(((t.data_ptr(), t.numel() * t.element_size(), t.device, spliced[k].runs)
                        for k, t in state.items() if k in spliced and t.numel()), key=lambda s: s[0])
        self.starts = [s[0] for s in spans]
        self.spans = spans
        self.storages = {t.untyped_storage().data_ptr() for m in models
                         for t in list(m.parameters()) + list(m.buffers())}

    def runs_in(self, t) -> list | None:
        """The runs of tensor ``t`` when it lies in a spliced parameter; None when it touches none;
        :class:`Unsafe` when it overlaps one without being a contiguous window of it."""
        n = t.numel() * t.element_size()
        if not n:
            return None
        ptr = t.data_ptr()
        i = bisect.bisect_right(self.starts, ptr + n - 1) - 1  # the last span starting before t ends
        if i < 0:
            return None
        start, size, device, runs = self.spans[i]  # spans do not overlap: no earlier one reaches t
        if start + size <= ptr or t.device != device:
            return None
        if not t.is_contiguous():
            raise Unsafe(f"a strided view {tuple(t.shape)} of a spliced parameter")
        if start > ptr or ptr + n > start + size:
            raise Unsafe(f"a tensor {tuple(t.shape)} reaching beyond a spliced parameter's bytes")
        return sub_runs(runs, ptr - start, n)

    def check(self, tensors) -> str | None:
        """Why ``(key, tensor)`` pairs cannot be written from the runs and the loaded memory, or None."""
        for key, t in tensors:
            try:
                if self.runs_in(t) is not None:
                    continue
            except Unsafe as e:
                return f"{key}: {e}"
            if t.numel() and t.untyped_storage().data_ptr() not in self.storages:
                return f"{key}: a tensor {tuple(t.shape)} that views no parameter of the model (computed from them?)"
        return None
