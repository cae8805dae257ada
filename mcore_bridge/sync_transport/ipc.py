"""Colocated transport: the engine shares the trainer's GPU and maps the trainer's bucket buffers
through CUDA IPC handles, so a bucket crosses the process boundary as one device-to-device copy.

``IpcChannel`` has the interface of ``TransportGroup`` (``send_message``/``recv_message``/
``release``, ``rank``, ``device``, ``metas``), so ``Sender``, ``push`` and ``Receiver`` work over
either. Rank 0 (the trainer's process on this GPU) holds ``slots`` (default two) bucket buffers;
each is shared ONCE (its IPC handle travels with the first message that uses it, and again only
when a larger bucket makes it grow). Per bucket the trainer waits until every engine released the
slot it filled ``slots`` buckets ago, copies the bucket in, synchronises its stream and posts the
message; the engine copies out (loads) from the mapped slot, synchronises its stream and
releases it -- so the trainer fills one buffer while the engine reads the other.

Control messages (headers, metadata, handles: JSON, no pickle) go through a TCP store at
``init_method`` hosted by rank 0 (the engines on the same host connect to it). The handle is the
tuple ``torch.multiprocessing.reductions.reduce_tensor`` makes for a CUDA tensor, rebuilt with
``rebuild_cuda_tensor``; both processes must see the GPU under the same index. CUDA only: on CPU
the constructor refuses (use ``connect(...)``, the gloo transport).
"""

from __future__ import annotations

import base64
import datetime
import json
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from ..errors import UsageError
from .sender import END

PREFIX = "mcore_bridge_ipc/"


def _b64(x):
    return None if x is None else base64.b64encode(bytes(x)).decode()


def _unb64(x):
    return None if x is None else base64.b64decode(x)


def share(buf: torch.Tensor) -> dict:
    """The IPC handle of a flat uint8 CUDA tensor, as JSON-able fields."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, a = reduce_tensor(buf)
    return {"numel": buf.numel(), "tensor_offset": a[3], "device": a[6], "handle": _b64(a[7]),
            "size_bytes": a[8], "offset_bytes": a[9], "ref_handle": _b64(a[11]), "ref_offset": a[12],
            "event_handle": _b64(a[13]), "event_sync": bool(a[14])}


def open_shared(h: dict) -> torch.Tensor:
    """The engine's view of a trainer buffer shared by ``share``."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(torch.Tensor, torch.Size([h["numel"]]), (1,), h["tensor_offset"],
                               torch.storage.TypedStorage, torch.uint8, h["device"], _unb64(h["handle"]),
                               h["size_bytes"], h["offset_bytes"], False, _unb64(h["ref_handle"]),
                               h["ref_offset"], _unb64(h["event_handle"]), h["event_sync"])


class IpcChannel:
    """One trainer process (rank 0) and ``world_size - 1`` engine processes on the same GPU."""

    def __init__(self, init_method: str, rank: int, world_size: int, device="cuda", slots: int = 2,
                 timeout_s: float = 1800.0):
        device = self._check_device(torch.device(device))
        url = urlparse(init_method)
        if url.scheme != "tcp" or not url.hostname or not url.port:
            raise UsageError(f"init_method={init_method!r}: expected 'tcp://HOST:PORT' (rank 0 hosts the store there)")
        if world_size < 2 or not 0 <= rank < world_size or slots < 1:
            raise UsageError(f"rank={rank}, world_size={world_size}, slots={slots}: need rank 0 (the trainer), "
                             f"at least one engine rank and one slot")
        self.rank, self.world_size, self.slots = rank, world_size, slots
        self.device = device
        store = dist.TCPStore(url.hostname, url.port, world_size, rank == 0,
                              timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=True)
        self.store = dist.PrefixStore(PREFIX, store)
        self._root = store
        self.metas: dict = {}
        self.seq = 0  # messages posted (trainer) / taken (engine)
        self.buffers: list[torch.Tensor | None] = [None] * slots  # trainer: own; engine: mapped
        self.used_by: list[int | None] = [None] * slots  # trainer: the message that last filled each slot
        self._current = None  # engine: the message whose slot is being read
        self._control: list[int] = []  # trainer: messages without a slot, deleted once read

    # -- trainer ------------------------------------------------------------------------------
    def _wait_released(self, seq: int):
        for e in range(1, self.world_size):
            self.store.get(f"done/{seq}/{e}")  # blocks until the engine released it
            self.store.delete_key(f"done/{seq}/{e}")
        self.store.delete_key(f"msg/{seq}")

    def send_message(self, kind: int, index: int, info: dict | None, buffer: torch.Tensor | None,
                     async_op: bool = False):
        msg = {"kind": kind, "index": index, "info": info, "slot": None, "nbytes": 0, "share": None}
        if buffer is not None and buffer.numel():
            if buffer.device != self.device or buffer.dtype != torch.uint8:
                raise UsageError(f"transport buffer: expected uint8 on {self.device}, got {buffer.dtype} on "
                                 f"{buffer.device} (export_buckets(device=...) puts buckets there)")
            slot = self.seq % self.slots
            if self.used_by[slot] is not None:
                self._wait_released(self.used_by[slot])
            n = buffer.numel()
            if self.buffers[slot] is None or self.buffers[slot].numel() < n:
                self.buffers[slot], msg["share"] = self._allocate(n, slot)
            self.buffers[slot][:n].copy_(buffer)
            self._sync()
            msg.update(slot=slot, nbytes=n)
            self.used_by[slot] = self.seq
        self.store.set(f"msg/{self.seq}", json.dumps(msg))
        if msg["slot"] is None:
            self._control.append(self.seq)
        self.seq += 1
        if kind == END:  # the step ends when every engine has loaded every bucket
            released = [seq for seq in self.used_by if seq is not None]
            for seq in released:
                self._wait_released(seq)
            self.used_by = [None] * self.slots
            if released:  # the engines read every message before the last released one
                for seq in [c for c in self._control if c < max(released)]:
                    self.store.delete_key(f"msg/{seq}")
                self._control = [c for c in self._control if c > max(released)]
        return None

    # -- engine -------------------------------------------------------------------------------
    def recv_message(self):
        msg = json.loads(self.store.get(f"msg/{self.seq}").decode())
        seq, self.seq = self.seq, self.seq + 1
        buf = None
        if msg["nbytes"]:
            slot = msg["slot"]
            if msg["share"] is not None:
                self.buffers[slot] = self._open(msg["share"])
            buf = self.buffers[slot][:msg["nbytes"]]
            self._current = seq
        return msg["kind"], msg["index"], msg["info"], buf

    def release(self):
        if self._current is not None:
            self._sync()  # the copies out of the slot are done
            self.store.set(f"done/{self._current}/{self.rank}", "")
            self._current = None

    def close(self):
        self.buffers = [None] * self.slots

    # -- the shared memory: CUDA IPC (a subclass may share other memory the same way) ---------------
    @staticmethod
    def _check_device(device: torch.device) -> torch.device:
        if device.type != "cuda" or not torch.cuda.is_available():
            raise UsageError(f"colocated transport (CUDA IPC) needs a CUDA device, got device={device}"
                             f"{'' if torch.cuda.is_available() else ' and no GPU is visible'}; on CPU use "
                             f"sync_transport.connect(...) (a gloo group) instead")
        return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())

    def _allocate(self, nbytes: int, slot: int) -> tuple[torch.Tensor, dict]:
        """Trainer: a new slot buffer and its handle."""
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return buf, share(buf)

    def _open(self, handle: dict) -> torch.Tensor:
        """Engine: the trainer's slot buffer from its handle."""
        return open_shared(handle)

    def _sync(self):
        torch.cuda.current_stream(self.device).synchronize()


def colocate(init_method: str, rank: int, world_size: int, device="cuda", slots: int = 2,
             timeout_s: float = 1800.0) -> IpcChannel:
    """The colocated channel (each of its ``world_size`` processes calls it once)."""
    return IpcChannel(init_method, rank, world_size, device, slots, timeout_s)
