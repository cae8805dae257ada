"""Self-launch through torchrun: how many processes this node starts, the torchrun command for one
or several nodes (static rendezvous), signal forwarding, and clean-up after a failed run."""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

from .errors import UsageError

def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def procs_per_node(args, world: int) -> int:
    """Processes to start on this node: ``--nproc-per-node``, else the fewest that make the
    processes of all nodes (nnodes x nproc) a multiple of ``world``, what the layout needs."""
    nnodes = args.nnodes
    if nnodes < 1:
        raise UsageError(f"--nnodes {nnodes}: need at least 1 node")
    if not 0 <= args.node_rank < nnodes:
        raise UsageError(f"--node-rank {args.node_rank} (env NODE_RANK) is not one of 0..{nnodes - 1} "
                         f"for --nnodes {nnodes}")
    least = world // math.gcd(world, nnodes)
    nproc = args.nproc_per_node or least
    if nproc < 1 or (nproc * nnodes) % world:
        raise UsageError(f"{nnodes} node(s) x {nproc} process(es) per node = {nnodes * nproc} processes "
                         f"cannot form this layout, which needs a multiple of {world}: choose "
                         f"--nproc-per-node from multiples of {least}")
    return nproc


def torchrun_command(nproc: int, args: argparse.Namespace) -> list[str]:
    """torchrun (``torch.distributed.run``) for this node. Several nodes meet by static rendezvous
    at node 0's MASTER_ADDR:MASTER_PORT; global rank = node_rank x nproc + local rank, so each node
    holds a contiguous block of ranks (with tp x pp per node: whole pipeline stages)."""
    cmd = [sys.executable, "-m", "mcore_bridge.torchrun", f"--nproc-per-node={nproc}",
           f"--nnodes={args.nnodes}", f"--node-rank={args.node_rank}", "--max-restarts=0"]
    if args.nnodes == 1:
        return cmd + ["--standalone"]
    missing = [name for name, value in (("MASTER_ADDR", args.master_addr), ("MASTER_PORT", args.master_port))
               if value is None]
    if missing:
        raise UsageError(f"--nnodes {args.nnodes}: set {' and '.join(missing)} (or --master-addr / "
                         f"--master-port), the same on every node: node 0's address, reachable from the "
                         f"others, and a free port on it")
    from .runtime.dist import DEFAULT_TIMEOUT_S

    # A node that never turns up fails the others after MCORE_BRIDGE_TIMEOUT, like a collective.
    return cmd + [f"--master-addr={args.master_addr}", f"--master-port={args.master_port}",
                  f"--rdzv-conf=timeout={DEFAULT_TIMEOUT_S}"]


def relaunch(nproc: int, args: argparse.Namespace, argv: list[str]) -> int:
    """Run this same command under torchrun with ``nproc`` processes on this node.

    If a process fails, its torchrun agent stops the node's other processes and exits non-zero; the
    other nodes' processes then see their connections to it close (or, for a process that hangs,
    hit the collective timeout, MCORE_BRIDGE_TIMEOUT) and fail in turn: every node exits with an
    error and, as writes are committed by rank 0 only after every rank succeeded, no output.
    """
    cmd = torchrun_command(nproc, args)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("NPROC_PER_NODE", None)
    proc = subprocess.Popen(cmd + ["-m", "mcore_bridge.cli", *argv], env=env)
    # A SIGTERM for this process (a scheduler, `timeout`) goes to torchrun, which stops its workers:
    # without this, killing the command would leave the agent and its workers running.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def needs_launch(args, world: int, argv) -> int | None:
    """None when this process should run the command itself (already under torchrun, or a single
    process is enough); else launch torchrun on this node and return its exit code."""
    if under_torchrun():
        return None
    nproc = procs_per_node(args, world)
    if nproc == 1 and args.nnodes == 1:
        return None
    code = relaunch(nproc, args, argv)
    if code != 0 and args.node_rank == 0 and getattr(args, "save", None):
        discard_partial_output(Path(args.save))
    return code


def discard_partial_output(save: Path):
    """After a failed launch, remove what the ranks left in ``--save``'s staging directory.

    Rank 0 removes it itself when the ranks fail together; a rank that crashed (or a collective that
    broke under the ones that were still running) leaves shards there with no index or config. The
    node-0 launcher outlives its torchrun, so it removes them (``--save`` itself is only ever
    renamed into place after every rank succeeded, so it is never touched here).
    """
    import shutil

    from .hf_io import staging_dir

    stage = staging_dir(save.absolute())
    if stage.is_dir():
        shutil.rmtree(stage, ignore_errors=True)
        print(f"mcore-bridge: the conversion failed; removed its partial output {stage}", file=sys.stderr,
              flush=True)
