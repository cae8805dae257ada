"""A reusable pool of worker processes forming one gloo process group (CPU tests, benchmarks).

A fresh N-process gloo group costs seconds (process start, imports, rendezvous); a reused one lets
each case pay only for megatron's ``destroy/initialize_model_parallel``. ``Pool(n).run("mod:fn",
**kwargs)`` calls ``fn(**kwargs)`` on every rank and returns the per-rank results. The function
sets up its own layout (``runtime.dist.setup`` / ``Bridge.setup``): the workers call
``dist.allow_reinit()``, so megatron's parallel state is torn down and re-created per case, and
keep one ``compat.scope("cpu")`` (and ``compat.compile_off()``) open for their whole life. A
``bare`` pool does none of this: its workers stand in for a host's processes (tests/test_guest.py).

Failure handling: when a rank raises, the others are usually stuck in a collective, so the parent
raises ``WorkerError`` (with that rank's traceback) at once and kills the pool; likewise when a
rank dies or the case runs past its timeout (``TimeoutError``). The next ``run`` respawns it.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
import traceback
import weakref
from multiprocessing.connection import wait

from mcore_bridge.runtime.dist import free_port


class WorkerError(RuntimeError):
    """A rank raised (or died) inside a case; ``traceback`` holds the worker's traceback text."""

    def __init__(self, case: str, rank: int, tb: str):
        super().__init__(f"{case}: rank {rank} failed\n{tb}")
        self.case, self.rank, self.traceback = case, rank, tb


def _resolve(spec: str):
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _worker(rank: int, world: int, port: int, conn, stack_file: str, bare: bool = False):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    # SIGUSR1 (sent on timeout) dumps every thread's Python stack: shows where a rank hangs.
    faulthandler.register(signal.SIGUSR1, file=open(stack_file, "w"), all_threads=True)
    if bare:  # a stand-in for someone else's process: the case initialises everything itself
        conn.send(("ready", None, None))
        _serve(conn)
        return
    try:
        from mcore_bridge.runtime import compat, dist

        dist.allow_reinit()  # on purpose: this process is ours, each case sets up its own layout
        dist.init_process_group("cpu")
        compat.compile_off().__enter__()  # the worker's whole life (its own process): quicker imports
        scope = compat.scope("cpu")  # the worker's whole life: cases run megatron forwards too
        scope.__enter__()
    except BaseException:
        conn.send(("error", None, traceback.format_exc()))
        return
    try:
        conn.send(("ready", None, None))
        _serve(conn)
    finally:
        scope.__exit__(None, None, None)


def _serve(conn):
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent went away
            return
        if msg is None:
            return
        task, spec, kwargs = msg
        try:
            reply = ("ok", task, _resolve(spec)(**kwargs))
            conn.send(reply)
        except BaseException:
            conn.send(("error", task, traceback.format_exc()))


_LIVE: "weakref.WeakSet[Pool]" = weakref.WeakSet()


@atexit.register
def _close_all():
    for pool in list(_LIVE):
        pool.close()


class Pool:
    """``world_size`` spawned workers in one gloo group, started lazily, restarted after a failure.
    ``bare``: workers that only know their RANK/WORLD_SIZE/MASTER_* environment -- no process group,
    no compat scope: a host process (a trainer) that a case sets up itself (tests/test_guest.py)."""

    def __init__(self, world_size: int, start_timeout: float = 180.0, bare: bool = False):
        self.world_size, self.start_timeout, self.bare = world_size, start_timeout, bare
        self.procs: list = []
        self.conns: list = []
        self._task = 0
        self._stacks = tempfile.mkdtemp(prefix=f"pool{world_size}-")
        weakref.finalize(self, shutil.rmtree, self._stacks, ignore_errors=True)
        _LIVE.add(self)

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self, attempts: int = 2):
        """Spawn the workers and wait until they have joined the process group."""
        for attempt in range(attempts):
            ctx = mp.get_context("spawn")
            port = free_port()  # another process may grab it before rank 0 binds: retry then
            for rank in range(self.world_size):
                parent, child = ctx.Pipe()
                # not daemonic: a case may start processes of its own (megatron's torch_dist writer
                # forks one per file); a worker exits when the parent's end of its pipe closes
                p = ctx.Process(target=_worker, name=f"pool{self.world_size}-rank{rank}", daemon=False,
                                args=(rank, self.world_size, port, child, self._stack_file(rank), self.bare))
                p.start()
                child.close()
                self.procs.append(p)
                self.conns.append(parent)
            try:
                self._collect(None, f"starting a {self.world_size}-process pool", self.start_timeout)
                return
            except (WorkerError, TimeoutError):
                self.close()
                if attempt == attempts - 1:
                    raise

    def _stack_file(self, rank: int) -> str:
        return os.path.join(self._stacks, f"rank{rank}.txt")

    def _dump_stacks(self, ranks) -> str:
        """The Python stacks of ``ranks`` (faulthandler in the workers), to explain a timeout."""
        for r in ranks:
            with contextlib.suppress(OSError):
                os.kill(self.procs[r].pid, signal.SIGUSR1)
        time.sleep(1.0)
        out = []
        for r in ranks:
            with contextlib.suppress(OSError), open(self._stack_file(r)) as f:
                out.append(f"--- rank {r} ---\n{f.read().strip()}")
        return "\n".join(out)

    def close(self):
        """Stop every worker: terminate, then kill what is left; reap them all (no zombies)."""
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + 5
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
            p.close()
        self.procs, self.conns = [], []

    # -- running cases -------------------------------------------------------------------------
    def run(self, fn, *, timeout: float = 300.0, **kwargs) -> list:
        """Run ``fn(**kwargs)`` (``"module:function"`` or a module-level function) on every rank;
        returns the list of per-rank return values."""
        spec = fn if isinstance(fn, str) else f"{fn.__module__}:{fn.__qualname__}"
        case = f"{spec}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
        if not self.alive:
            self.close()
            self.start()
        self._task += 1
        try:
            for conn in self.conns:
                conn.send((self._task, spec, kwargs))
            return self._collect(self._task, case, timeout)
        except BaseException:  # error, timeout, Ctrl-C: ranks may be stuck in a collective
            self.close()
            raise

    def _collect(self, task, case: str, timeout: float) -> list:
        results, pending = [None] * self.world_size, set(range(self.world_size))
        deadline = time.monotonic() + timeout
        by_conn = {c: r for r, c in enumerate(self.conns)}
        by_sentinel = {p.sentinel: r for r, p in enumerate(self.procs)}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{case}: no result after {timeout:.0f} s from rank(s) {sorted(pending)} "
                                   f"of a {self.world_size}-process pool; the pool was killed. Stacks:\n"
                                   f"{self._dump_stacks(sorted(pending))}")
            ready = wait([self.conns[r] for r in pending] + [self.procs[r].sentinel for r in pending], left)
            for obj in ready:
                if obj in by_conn:
                    rank = by_conn[obj]
                    try:
                        status, got, value = obj.recv()
                    except (EOFError, OSError):  # the worker is gone
                        self.procs[rank].join(5)
                        raise WorkerError(case, rank, f"worker exited with code {self.procs[rank].exitcode}")
                    if status == "error":  # a rank that died first is the cause (its peers then fail
                        # in a collective with "connection reset/closed by peer")
                        dead = self._dead_peer(rank, 2.0 if "peer" in str(value) else 0.0)
                        if dead is not None:
                            raise WorkerError(case, dead, f"worker exited with code {self.procs[dead].exitcode} "
                                                          f"(then rank {rank} failed: {_last_line(value)})")
                        raise WorkerError(case, rank, value)
                    if got == task and status in ("ok", "ready"):
                        results[rank] = value
                        pending.discard(rank)
                elif not self.conns[by_sentinel[obj]].poll():  # died without a word (a reply is read first)
                    rank = by_sentinel[obj]
                    self.procs[rank].join(5)  # the sentinel fires as its fds close, before it is reapable
                    raise WorkerError(case, rank, f"worker exited with code {self.procs[rank].exitcode}")
        return results

    def _dead_peer(self, failed: int, grace: float) -> int | None:
        """A rank other than ``failed`` whose process has exited, waiting up to ``grace`` s for one
        (a peer's exit reaches the others' sockets before its process is reapable)."""
        deadline = time.monotonic() + grace
        while True:
            for r, proc in enumerate(self.procs):
                if r != failed and proc.exitcode is not None:
                    return r
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _last_line(text) -> str:
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""
