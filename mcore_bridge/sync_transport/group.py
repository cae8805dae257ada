"""The transport's own process group: trainer sender rank(s) + engine ranks, made from an explicit
rendezvous (a TCP store address and the transport's world), never from or into the host's
default group or megatron's groups.

``connect("tcp://HOST:PORT", rank, world_size)``: rank 0 (the trainer's sending rank) hosts the
TCP store at HOST:PORT, every other rank (the engines) connects to it; the group is a
``ProcessGroupGloo`` (CPU tensors) or ``ProcessGroupNCCL`` (CUDA tensors; ``backend="auto"``
picks NCCL when ``device`` is CUDA) built directly on that store. ``torch.distributed`` need not
be initialised and is left as it was: nothing is registered as a default or named group, so
``dist.get_world_size()``, megatron's groups and their collectives are unchanged. Collectives go
through the group object itself (``TransportGroup.broadcast``).

Messages (``send_message``/``recv_message``): a fixed 4-int64 header ``[kind, index, json bytes,
buffer bytes]``, then the JSON text as uint8 (when non-empty), then the buffer (when non-empty),
each one broadcast from rank 0.
"""

from __future__ import annotations

import datetime
import json
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from ..errors import UsageError

STORE_PREFIX = "mcore_bridge_sync/"


def _backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend not in ("gloo", "nccl"):
        raise UsageError(f"backend={backend!r}: choose 'auto', 'gloo' (CPU tensors) or 'nccl' (CUDA tensors)")
    if backend == "nccl" and device.type != "cuda":
        raise UsageError(f"backend='nccl' needs a CUDA device, got device={device}; use backend='gloo' on CPU")
    if backend == "gloo" and device.type != "cpu":
        raise UsageError(f"backend='gloo' moves CPU tensors, got device={device}; use backend='nccl' on GPU")
    return backend


class TransportGroup:
    """One process group of ``world_size`` ranks over its own TCP store (see the module doc)."""

    def __init__(self, init_method: str, rank: int, world_size: int, device="cpu", backend: str = "auto",
                 timeout_s: float = 1800.0):
        url = urlparse(init_method)
        if url.scheme != "tcp" or not url.hostname or not url.port:
            raise UsageError(f"init_method={init_method!r}: expected 'tcp://HOST:PORT' (rank 0 hosts the store there)")
        if world_size < 2 or not 0 <= rank < world_size:
            raise UsageError(f"rank={rank}, world_size={world_size}: the transport needs rank 0 (the trainer's "
                             f"sending rank) and at least one engine rank, 0 <= rank < world_size")
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.backend = _backend(backend, self.device)
        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(url.hostname, url.port, world_size, rank == 0, timeout=timeout,
                                   wait_for_workers=True)
        store = dist.PrefixStore(STORE_PREFIX, self.store)
        if self.backend == "gloo":
            self.pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
        self.metas: dict[int, dict] = {}  # bucket index -> metadata last sent (Sender/Receiver keep it here)
        self._recv = None
        self._header = torch.zeros(4, dtype=torch.int64, device=self.device)

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False):
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        work = self.pg.broadcast([tensor], opts)
        return work if async_op else work.wait()

    def barrier(self):
        self.broadcast(torch.zeros(1, dtype=torch.uint8, device=self.device))

    # -- messages from rank 0 ------------------------------------------------------------------
    def send_message(self, kind: int, index: int, info: dict | None, buffer: torch.Tensor | None,
                     async_op: bool = False):
        """Rank 0: header, JSON ``info`` (None: nothing), ``buffer`` (flat uint8 on this group's
        device, or None). With ``async_op`` the buffer's broadcast is returned unfinished."""
        text = json.dumps(info).encode() if info is not None else b""
        nbytes = 0 if buffer is None else buffer.numel()
        self._header.copy_(torch.tensor([kind, index, len(text), nbytes], dtype=torch.int64))
        self.broadcast(self._header)
        if text:
            self.broadcast(torch.frombuffer(bytearray(text), dtype=torch.uint8).to(self.device))
        if nbytes:
            if buffer.device != self.device or buffer.dtype != torch.uint8:
                raise UsageError(f"transport buffer: expected uint8 on {self.device}, got {buffer.dtype} on "
                                 f"{buffer.device} (export_buckets(device=...) puts buckets there)")
            return self.broadcast(buffer, async_op=async_op)
        return None

    def recv_message(self) -> tuple[int, int, dict | None, torch.Tensor | None]:
        """Engine ranks: ``(kind, index, info or None, buffer or None)``. The buffer is this
        group's receive buffer (grown to the largest bucket, reused): valid until ``release``."""
        self.broadcast(self._header)
        kind, index, ntext, nbytes = (int(x) for x in self._header.tolist())
        info = None
        if ntext:
            t = torch.empty(ntext, dtype=torch.uint8, device=self.device)
            self.broadcast(t)
            info = json.loads(bytes(t.cpu().numpy()).decode())
        buf = None
        if nbytes:
            if self._recv is None or self._recv.numel() < nbytes:
                self._recv = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            buf = self._recv[:nbytes]
            self.broadcast(buf)
        return kind, index, info, buf

    def release(self):
        """The engine is done with the last received buffer (a no-op here: the next broadcast
        into it waits for the engine's stream)."""

    def close(self):
        """Drops the group (the TCP store closes with its last reference)."""
        shutdown = getattr(self.pg, "shutdown", None)
        if shutdown is not None and self.backend == "nccl":
            shutdown()
        self.pg = None


def connect(init_method: str, rank: int, world_size: int, device="cpu", backend: str = "auto",
            timeout_s: float = 1800.0) -> TransportGroup:
    """The transport group (collective over its ``world_size`` ranks: each calls it once)."""
    return TransportGroup(init_method, rank, world_size, device, backend, timeout_s)
