"""Pickles from checkpoints we did not write: the ``.metadata`` of a torch_dist checkpoint.

torch.distributed.checkpoint reads ``.metadata`` with plain ``pickle.load`` and every byte item
(megatron's ``ShardedObject``s, e.g. ``_extra_state``) with ``torch.load(weights_only=False)``
(``DefaultLoadPlanner.load_bytes``): either would run code a hostile checkpoint carries. So before
megatron-core reads a checkpoint, :func:`check_dcp_metadata`

1. refuses any pickle opcode outside :data:`OPCODES` (no ``INST``/``OBJ``/``EXT*``/persistent ids:
   the ways to reach a callable other than through ``find_class``);
2. unpickles with :class:`AllowListUnpickler`, whose ``find_class`` returns only the exact
   ``(module, qualname)`` pairs of :data:`DCP_METADATA`, and raises for anything else while the
   pickle is read, so a refused global is never called and nothing built from it exists. ``REDUCE``
   and ``NEWOBJ`` can then only call those classes (dataclasses, enums, ``torch.Size``: they store
   their arguments and run nothing else); ``copyreg._reconstructor`` (protocol 0/1 objects) is not
   needed by DCP (it pickles with protocol >= 2: ``NEWOBJ``) and is refused;
3. checks what the metadata points at: every storage entry names a plain file of the checkpoint
   directory (no ``..``, no separator, no symlink out of it) and a byte range inside it, and every
   byte item loads with ``torch.load(weights_only=True)``, so DCP's own ``weights_only=False`` load
   of it afterwards sees only data.

``DCP_METADATA`` was taken by recording every global that unpickling real ``.metadata`` files asks
for (torch 2.13.0 + megatron-core 0.16.1: ``dist_checkpointing.save`` of dense, MoE, MLA, vision-
language, LoRA adapter-only and LoRA-merged models, tp/pp/ep-sharded). torch 2.11 (the GPU host) was
not run here; its ``torch/distributed/checkpoint/metadata.py`` as published defines the same
dataclasses and ``_MEM_FORMAT_ENCODING`` at the same paths. Pickles from older torch releases (where
``TensorProperties`` lived in ``torch.distributed._shard``) are refused.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from pathlib import Path

from .hf_io import CheckpointError

_DCP = "torch.distributed.checkpoint."
DCP_METADATA = frozenset({
    # the Metadata object and what it holds (torch.distributed.checkpoint.metadata)
    (_DCP + "metadata", "Metadata"),
    (_DCP + "metadata", "StorageMeta"),
    (_DCP + "metadata", "MetadataIndex"),
    (_DCP + "metadata", "TensorStorageMetadata"),
    (_DCP + "metadata", "BytesStorageMetadata"),
    (_DCP + "metadata", "ChunkStorageMetadata"),
    (_DCP + "metadata", "TensorProperties"),
    (_DCP + "metadata", "_MEM_FORMAT_ENCODING"),  # an Enum: TensorProperties.__getstate__
    # storage_data values (filesystem writer)
    (_DCP + "filesystem", "_StorageInfo"),
    # megatron-core stores every rank's save plan in Metadata.all_local_plans (plan caching)
    (_DCP + "planner", "SavePlan"),
    (_DCP + "planner", "WriteItem"),
    (_DCP + "planner", "WriteItemType"),  # an Enum
    (_DCP + "planner", "TensorWriteData"),
    # megatron-core keeps this empty class "to load old checkpoint weights" (strategies/torch.py)
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"),
    # torch objects: Size (a tuple), layouts by name, dtypes (values, not callables)
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # str -> a torch.layout from torch's own table
    *(("torch", d) for d in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16",
                             "int8", "uint8", "bool", "complex64", "float8_e4m3fn", "float8_e5m2")),
    # StorageMeta.checkpoint_id when a writer was given a path object (torch's FileSystemWriter);
    # building one does no I/O
    ("pathlib", "PosixPath"),
})

# Opcodes of protocols 2-5 that build data, plus GLOBAL/STACK_GLOBAL (through find_class), REDUCE /
# NEWOBJ (call what find_class returned) and BUILD (sets the state of such an object).
OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP", "NONE", "NEWTRUE", "NEWFALSE",
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING",
    "SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_LIST", "LIST", "APPEND", "APPENDS",
    "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_SET", "ADDITEMS", "FROZENSET",
    "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET",
    "GLOBAL", "STACK_GLOBAL", "REDUCE", "NEWOBJ", "BUILD",
})


class AllowListUnpickler(pickle.Unpickler):
    """Resolves only the ``allowed`` ``(module, qualname)`` pairs; anything else raises
    :class:`CheckpointError` at the global itself, before it could be called."""

    def __init__(self, file, allowed=DCP_METADATA):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise CheckpointError(f"refusing to unpickle {module}.{name}: not checkpoint metadata")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise CheckpointError("refusing to unpickle a persistent id: not checkpoint metadata")


def scan(data: bytes) -> None:
    """Refuse a pickle with an opcode outside :data:`OPCODES` (nothing is built)."""
    for op, _, pos in pickletools.genops(data):
        if op.name not in OPCODES:
            raise CheckpointError(f"refusing to unpickle: opcode {op.name} at byte {pos} is not used by "
                                  f"checkpoint metadata")


def loads(data: bytes, allowed=DCP_METADATA):
    """Unpickle ``data`` with only ``allowed`` globals (raises :class:`CheckpointError`)."""
    scan(data)
    return AllowListUnpickler(io.BytesIO(data), allowed).load()


def object_keys(sharded_state: dict) -> set[str]:
    """The keys of the ``ShardedObject``s in a megatron sharded state dict: the byte items a load
    of it reads."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {v.key for v in nested_values(sharded_state) if isinstance(v, ShardedObject)}


def check_dcp_metadata(ckpt_dir: Path, objects: set[str] | None = None):
    """Check a torch_dist checkpoint's ``.metadata`` and byte items (see the module docstring)
    before torch.distributed.checkpoint reads them; returns the Metadata. Raises
    :class:`CheckpointError` naming the file. ``objects``: the ShardedObject keys the load will
    read (:func:`object_keys`); only those byte items are checked (DCP unpickles no other: a
    Megatron-LM checkpoint's RNG state holds numpy arrays, which weights_only refuses, and is
    never read). ``None``: every byte item."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / ".metadata"
    if not path.exists():
        raise CheckpointError(f"{ckpt_dir}: no .metadata file: the checkpoint is incomplete")
    try:
        meta = loads(path.read_bytes())
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # truncated or corrupt, or an allowed class given bad arguments
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(meta, Metadata) or not isinstance(meta.state_dict_metadata, dict):
        raise CheckpointError(f"{path}: holds a {type(meta).__name__}, not torch.distributed.checkpoint Metadata")
    _check_storage(ckpt_dir, path, meta, objects)
    return meta


def _check_storage(ckpt_dir: Path, path: Path, meta, objects) -> None:
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    storage = meta.storage_data
    if not isinstance(storage, dict):
        raise CheckpointError(f"{path}: storage_data is a {type(storage).__name__}, not a dict")
    root = ckpt_dir.resolve()
    sizes = {}
    for index, info in storage.items():
        if not isinstance(info, _StorageInfo):
            raise CheckpointError(f"{path}: storage entry {index} is a {type(info).__name__}")
        rel = info.relative_path
        if not isinstance(rel, str) or not rel or "/" in rel or "\\" in rel or rel in (".", ".."):
            raise CheckpointError(f"{path}: storage entry {getattr(index, 'fqn', index)!r} names "
                                  f"{rel!r}, not a file of the checkpoint directory")
        if rel not in sizes:
            file = ckpt_dir / rel
            if not file.is_file() or file.resolve().parent != root:
                raise CheckpointError(f"{path}: storage entry {index.fqn!r} names {rel!r}, which is not a "
                                      f"file inside {ckpt_dir}")
            sizes[rel] = file.stat().st_size
        offset, length = info.offset, info.length
        if not (type(offset) is int and type(length) is int and 0 <= offset and 0 <= length
                and offset + length <= sizes[rel]):
            raise CheckpointError(f"{path}: storage entry {index.fqn!r}: bytes {offset!r}+{length!r} are "
                                  f"not inside {rel} ({sizes[rel]} bytes)")
    byte_items = {k for k, v in meta.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)
                  and (objects is None or k.split("/shard_", 1)[0] in objects)}
    for index, info in storage.items():
        if index.fqn not in byte_items:
            continue
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{path}: byte item {index.fqn!r} is stored transformed "
                                  f"({info.transform_descriptors}): not checked, so not read")
        with open(ckpt_dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        try:  # torch.distributed.checkpoint will load these with weights_only=False
            torch.load(io.BytesIO(data), weights_only=True)
        except Exception as e:
            lines = [x for x in str(e).splitlines() if "GLOBAL" in x or "nsupported" in x]
            first = lines[0].strip() if lines else type(e).__name__
            raise CheckpointError(f"{ckpt_dir / info.relative_path}: byte item {index.fqn!r} is not plain "
                                  f"data (torch.load weights_only=True refused it: {first})") from None
