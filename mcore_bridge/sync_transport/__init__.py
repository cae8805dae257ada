"""RL weight sync into a separate engine process: transports for ``Bridge.export_buckets``.

Disaggregated (engines on other GPUs or hosts; ``group``, ``sender``, ``receiver``)::

    # trainer, every rank (the export is collective); global rank 0 sends
    from mcore_bridge.sync_transport import connect, Sender, push
    sender = Sender(connect("tcp://trainer0:29700", rank=0, world_size=1 + n_engines, device="cuda"))
    ... (other ranks: sender = None)
    push(bridge, models, sender)                 # bf16 as the checkpoint; dtype="fp8"; lora=True

    # engine rank i (1..n_engines), another process
    group = connect("tcp://trainer0:29700", rank=i, world_size=1 + n_engines, device="cuda")
    receiver = Receiver(group, model)            # a transformers model, loaded in place
    receiver.receive()                           # one step; raises SyncError naming what did not add up

The group is the library's own (``group.TransportGroup``: a TCP store at the given address hosted
by rank 0, a gloo or NCCL process group on it), created once, explicitly; the host's default group
and megatron's groups are neither used nor changed. Each step: the buckets reach the sending rank
(``export_buckets(receivers=sending_rank)``), which broadcasts each one (header, metadata when it
changed, buffer) while the next is exported.

Colocated (engine on the same GPU; ``ipc``): CUDA IPC handles of two bucket buffers, shared once;
per bucket the trainer fills a free buffer and the engine copies out and hands it back. GPU only.
"""

from .group import TransportGroup, connect
from .ipc import IpcChannel, colocate
from .receiver import ModelTargets, Receiver, SyncError
from .sender import Sender, push

__all__ = ["TransportGroup", "connect", "IpcChannel", "colocate", "Sender", "push", "Receiver", "ModelTargets",
           "SyncError"]
