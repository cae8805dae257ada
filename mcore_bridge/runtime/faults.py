"""Deliberate fault injection, for tests only: make one rank crash, raise or hang at a known point.

    MCORE_BRIDGE_FAULT=rank:<r>:<where>[:<how>][,rank:<r>:<where>[:<how>]...]

``where`` names a ``maybe_fail(where)`` call site: ``load`` (start of ``Bridge.load_weights``),
``save`` (``Bridge.save_weights``, after the shard plan, once the staging directory exists and
before any shard is written) or ``write`` (inside ``io.write_shard``, as the file is written: every
safetensors shard of an HF or plain save) or ``splice`` (torch_dist's check of spliced parameters,
``dist_ckpt``: ``raise`` makes that rank find a tensor it cannot write from them). ``how``: ``exit`` (default: ``os._exit(17)``, like a
crash, no clean-up and no Python exception), ``raise`` (a RuntimeError), ``enospc`` (an
``OSError(ENOSPC)``, as a full disk gives) or ``hang`` (sleep forever, with every
socket still open, so that the other ranks can only get out through the collective timeout,
``MCORE_BRIDGE_TIMEOUT``). ``<r>`` is the global rank. Unset (always, outside tests), it costs one
environment lookup.
"""

from __future__ import annotations

import errno
import os
import sys
import time

from ..errors import UsageError

ENV = "MCORE_BRIDGE_FAULT"
WHERE = ("load", "save", "write", "splice")
HOW = ("exit", "raise", "enospc", "hang")
EXIT_CODE = 17


class InjectedFault(RuntimeError):
    """Raised by ``maybe_fail`` for ``how=raise``."""


def parse(spec: str) -> list[tuple[int, str, str]]:
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        fields = part.split(":")
        if len(fields) not in (3, 4) or fields[0] != "rank" or not fields[1].isdigit():
            raise UsageError(f"{ENV}={spec!r}: expected rank:<r>:<where>[:<how>]")
        where, how = fields[2], fields[3] if len(fields) == 4 else "exit"
        if where not in WHERE or how not in HOW:
            raise UsageError(f"{ENV}={spec!r}: where is one of {WHERE}, how one of {HOW}")
        faults.append((int(fields[1]), where, how))
    return faults


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def maybe_fail(where: str):
    spec = os.environ.get(ENV)
    if not spec:
        return
    rank = _rank()
    for r, w, how in parse(spec):
        if r != rank or w != where:
            continue
        msg = f"mcore-bridge: injected fault ({ENV}) on rank {rank} at {where}: {how}"
        print(msg, file=sys.stderr, flush=True)
        if how == "exit":
            os._exit(EXIT_CODE)
        if how == "raise":
            raise InjectedFault(msg)
        if how == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        while True:  # hang
            time.sleep(3600)
