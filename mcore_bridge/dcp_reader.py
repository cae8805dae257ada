"""Reading torch_dist checkpoints with one pass over the bytes.

torch.distributed.checkpoint's ``FileSystemReader`` ``torch.load``s every tensor record of a
``__N_M.distcp`` file into a new tensor and then ``copy_``s that into the destination: two passes
over the bytes and a transient allocation of each record. A record is a ``torch.save`` zip stored
without compression, so the tensor's bytes lie contiguous in the file: :class:`DirectReader` reads
the record's small parts (the zip directory, ``data.pkl``) to learn where the bytes sit and what
tensor they form (``torch.load`` under ``torch.serialization.skip_data``: torch's own weights-only
parse, storage left unread), then ``preadv``s the bytes straight into the destination parameter
when the record is exactly it (same dtype and shape, contiguous, on the CPU), or into the
record-sized tensor that parse allocated otherwise (a slice of the record, another layout, a GPU
parameter) and copies the wanted part from there. Records of another form (compressed, several
storages, a view into a larger storage, stream transforms, big-endian) take DCP's own path.

:func:`direct_load_strategy` is megatron-core's torch_dist load strategy with this reader in place
of megatron's (megatron builds its reader inside ``load``, so the body is repeated here, in the
form the installed megatron-core uses: feature-detected, not version-keyed). Nothing of megatron
or torch is patched.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import struct
import traceback
import zipfile

from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

_CHUNK = 1 << 30  # bytes per preadv call (Linux moves at most ~2 GiB per call)


class CorruptRecord(OSError):
    pass


class _Window(io.RawIOBase):
    """A read-only, seekable view of ``length`` bytes at ``offset`` of an open file (by fd)."""

    def __init__(self, fd: int, offset: int, length: int):
        super().__init__()
        self.fd, self.offset, self.length, self.pos = fd, offset, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=0):
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.length + pos
        return self.pos

    def readinto(self, buf):
        n = max(0, min(len(buf), self.length - self.pos))
        got = 0
        if n:
            with memoryview(buf) as whole, whole[:n] as part:
                got = os.preadv(self.fd, [part], self.offset + self.pos)
        self.pos += got
        return got


def pread_exact(fd: int, buf: memoryview, offset: int, what: str) -> None:
    """Fill ``buf`` from ``offset`` of ``fd`` (looping over short reads); a short file is an error."""
    done = 0
    while done < len(buf):
        with buf[done:done + _CHUNK] as part:
            got = os.preadv(fd, [part], offset + done)
        if got <= 0:
            raise CorruptRecord(f"{what}: the file ends {len(buf) - done} bytes early (truncated checkpoint?)")
        done += got


@contextlib.contextmanager
def tensor_bytes(t: torch.Tensor):
    """The bytes of a contiguous CPU tensor as a writable memoryview, without a copy. Released on
    exit: a live view left in a traceback's frames (a failed read or write) would otherwise be
    garbage-collected in a cycle with the array under it, which crashed Python 3.12 (segfault)."""
    if t.numel() == 0:
        yield memoryview(b"")
        return
    array = t.reshape(-1).view(torch.uint8).numpy()
    with memoryview(array) as view:
        yield view


def parse_record(window: _Window):
    """(tensor with allocated but unread storage, offset of its bytes in the window) for a
    ``torch.save`` record of one contiguous tensor stored uncompressed in little-endian order;
    None for any other record (then DCP's own reading applies)."""
    if not hasattr(torch.serialization, "skip_data"):
        return None
    try:
        zf = zipfile.ZipFile(window)
        infos = zf.infolist()
    except zipfile.BadZipFile:
        return None
    data = [i for i in infos if "/data/" in i.filename and not i.filename.endswith("/data.pkl")]
    order = [i for i in infos if i.filename.endswith("/byteorder")]
    if len(data) != 1 or data[0].compress_type != zipfile.ZIP_STORED or len(order) != 1 \
            or zf.read(order[0]) != b"little":
        return None
    with torch.serialization.skip_data():
        window.seek(0)
        tensor = torch.load(window, map_location="cpu", weights_only=True)
    if not isinstance(tensor, torch.Tensor) or not tensor.is_contiguous() or tensor.storage_offset() != 0 \
            or tensor.untyped_storage().nbytes() != data[0].file_size \
            or tensor.numel() * tensor.element_size() != data[0].file_size:
        return None
    head = bytearray(30)
    window.seek(data[0].header_offset)
    if window.readinto(head) != 30 or head[:4] != b"PK\x03\x04":
        raise CorruptRecord("bad zip local header")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return tensor, data[0].header_offset + 30 + name_len + extra_len


def _narrow(t: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for dim, (o, n) in enumerate(zip(offsets, lengths)):
        if o != 0 or n != t.shape[dim]:
            t = t.narrow(dim, o, n)
    return t


class DirectReader(FileSystemReader):
    """DCP's ``FileSystemReader`` reading tensor records straight into their destination (see the
    module docstring); every other item, and every record it does not recognise, as DCP does."""

    direct_items = 0  # records read straight into the destination (for tests and the bench)
    staged_items = 0  # records read into a record-sized tensor, then copied
    defer = None  # an unsplice.Deferred: records that are exactly a window of its tensors stay unread

    def read_data(self, plan, planner) -> Future:
        try:
            self._read_all(plan, planner)
        except BaseException as e:
            traceback.clear_frames(e.__traceback__)  # as in dcp_writer.DirectWriter.write_data
            raise
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _read_all(self, plan, planner) -> None:
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for relative_path, items in per_file.items():
            path = Path(self.path) / relative_path
            fd = os.open(path, os.O_RDONLY)
            try:
                items.sort(key=lambda r: self.storage_data[r.storage_index].offset)
                last = self.storage_data[items[-1].storage_index]
                size = os.fstat(fd).st_size
                if size < last.offset + last.length:
                    raise CorruptRecord(f"{path}: {size} bytes, but the checkpoint's .metadata places "
                                        f"{items[-1].storage_index.fqn} at bytes {last.offset}+{last.length}: "
                                        f"the file is truncated (an interrupted copy or write?)")
                for req in items:
                    self._read_item(fd, path, req, planner)
            finally:
                os.close(fd)

    def _read_item(self, fd: int, path: Path, req, planner) -> None:
        info = self.storage_data[req.storage_index]
        window = _Window(fd, info.offset, info.length)
        what = f"{path} ({req.storage_index.fqn}, bytes {info.offset}+{info.length})"
        if req.type == LoadItemType.BYTE_IO and not info.transform_descriptors:
            buf = bytearray(info.length)
            with memoryview(buf) as view:
                pread_exact(fd, view, info.offset, what)
            planner.load_bytes(req, io.BytesIO(bytes(buf)))
            return
        parsed = None if info.transform_descriptors or req.type == LoadItemType.BYTE_IO else parse_record(window)
        if parsed is None:
            return self._read_as_dcp(window, info, req, planner)
        record, data_offset = parsed
        target = planner.resolve_tensor(req).detach()
        whole = all(o == 0 for o in req.storage_offsets) and tuple(req.lengths) == tuple(record.shape)
        if whole and self.defer is not None and target.dtype == record.dtype \
                and tuple(target.shape) == tuple(record.shape) and self.defer.take(target, path, info.offset + data_offset):
            planner.commit_tensor(req, target)
            return
        if whole and target.device.type == "cpu" and target.is_contiguous() and target.dtype == record.dtype \
                and tuple(target.shape) == tuple(record.shape):
            with tensor_bytes(target) as view:
                pread_exact(fd, view, info.offset + data_offset, what)
            type(self).direct_items += 1
        else:
            with tensor_bytes(record) as view:
                pread_exact(fd, view, info.offset + data_offset, what)
            part = _narrow(record, req.storage_offsets, req.lengths)
            if target.size() != part.size():
                raise AssertionError(f"req {req.storage_index} mismatch sizes {target.size()} vs {part.size()}")
            target.copy_(part)
            type(self).staged_items += 1
        planner.commit_tensor(req, target)

    def _read_as_dcp(self, window: _Window, info, req, planner) -> None:
        """DCP's own handling of one item (stream transforms, records of another form)."""
        window.seek(0)
        stream = self.transforms.transform_load_stream(req, info.transform_descriptors or (), window)
        if req.type == LoadItemType.BYTE_IO:
            planner.load_bytes(req, io.BytesIO(stream.read(-1)))
            return
        if not stream.seekable():
            stream = io.BytesIO(stream.read(-1))
        tensor = _narrow(torch.load(stream, map_location="cpu", weights_only=True), req.storage_offsets, req.lengths)
        target = planner.resolve_tensor(req).detach()
        if target.size() != tensor.size():
            raise AssertionError(f"req {req.storage_index} mismatch sizes {target.size()} vs {tensor.size()}")
        target.copy_(tensor)
        planner.commit_tensor(req, target)


def direct_load_strategy(defer=None):
    """megatron-core's torch_dist load strategy reading through :class:`DirectReader` (``defer``:
    its ``defer``). A tensor megatron allows another shape (``allow_shape_mismatch``: the padded
    vocabulary) whose shape in the checkpoint is the model's is loaded as any other: megatron
    would zero it first, writing every byte once more before reading it."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.strategies import torch as mtorch

    planner_args = inspect.signature(mtorch.MCoreLoadPlanner.__init__).parameters
    # megatron-core that loads without DCP's collectives passes these (0.19); older ones none of them
    local_load = "flatten_sharded_tensors" in planner_args

    class DirectLoad(mtorch.TorchDistLoadShardedStrategy):
        def load(self, sharded_state_dict, checkpoint_dir, *args, **kwargs):
            reader = DirectReader(checkpoint_dir)
            reader.defer = defer
            metadata = reader.read_metadata()
            sizes = {k: tuple(getattr(m, "size", ())) for k, m in metadata.state_dict_metadata.items()}
            tensors = [t for t in nested_values(sharded_state_dict) if isinstance(t, ShardedTensor)]
            for t in tensors:
                if t.allow_shape_mismatch and sizes.get(t.key) == tuple(t.global_shape):
                    t.allow_shape_mismatch = False
            flexible = [t for t in tensors if not t.allow_shape_mismatch]
            mismatch = {t.key: t for t in tensors if t.allow_shape_mismatch}
            orig = sharded_state_dict
            state, flat_mapping, rename_mapping = mtorch._replace_state_dict_keys_with_sharded_keys(sharded_state_dict)
            pyt_state = mtorch.mcore_to_pyt_state_dict(state, True)
            extra = {}
            if local_load:
                extra = dict(flatten_state_dict=False, flatten_sharded_tensors=False)
                if "stream_ckpt_dequant" in planner_args:
                    extra["stream_ckpt_dequant"] = getattr(self, "stream_ckpt_dequant", True)
            planner = mtorch.MCoreLoadPlanner(shapes_validation_sharded_tensors=flexible,
                                              allow_shape_mismatch_sharded_tensors=mismatch, **extra)
            dcp.load(pyt_state, storage_reader=reader, planner=planner, no_dist=local_load)
            self.cached_global_metadata = metadata
            loaded = {k: mtorch._unwrap_pyt_sharded_tensor(v) for k, v in pyt_state.items()}
            loaded = mtorch._replace_sharded_keys_with_state_dict_keys(loaded, flat_mapping, rename_mapping)
            mtorch._restore_dict_types(loaded, orig)
            return loaded

    return DirectLoad()
