"""Two "nodes" on one machine: two ``mcore-bridge export`` commands started side by side, each with
its own ``--node-rank`` (or NODE_RANK), that self-launch one torchrun agent each and meet over
loopback (gloo) by static rendezvous, as they would across two hosts sharing a filesystem.

Fault injection (``MCORE_BRIDGE_FAULT``, see ``mcore_bridge/runtime/faults.py``) makes one rank
crash, raise or hang mid-conversion; every process of both nodes must then exit non-zero within a
bounded time, and nothing that looks like a finished checkpoint may be left behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mcore_bridge.hf_io import staging_dir
from mcore_bridge.layout import ParallelLayout
from mcore_bridge.runtime.dist import free_port

from .test_cli import assert_same_weights

CLI = [sys.executable, "-m", "mcore_bridge.cli", "export"]
LIMIT_S = 150  # a run of both nodes past this counts as a hang (all of them take well under it)


class Nodes:
    """Both nodes' commands, their exit codes, stdout/stderr (in files: no pipe can fill up) and
    the seconds they took."""

    def __init__(self, tmp_path: Path, name: str, args, env, flags: bool):
        port = free_port()
        self.logs = tmp_path / f"logs-{name}"
        self.logs.mkdir()
        self.procs = []
        start = time.monotonic()
        for node in (0, 1):
            node_env = dict(os.environ, **env)
            if flags:  # the torchrun-style flags
                extra = ["--nnodes", "2", "--node-rank", str(node), "--master-addr", "127.0.0.1",
                         "--master-port", str(port)]
            else:  # the seed's variables
                extra = []
                node_env.update(NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            with open(self.logs / f"node{node}.out", "w") as out, open(self.logs / f"node{node}.err", "w") as err:
                # own session: on a hang the whole tree (CLI, torchrun agent, workers) is killed
                self.procs.append(subprocess.Popen([*CLI, *map(str, args), *extra], env=node_env, stdout=out,
                                                   stderr=err, start_new_session=True))
        self.codes = self._wait(start)
        self.seconds = time.monotonic() - start
        self.out = [(self.logs / f"node{n}.out").read_text() for n in (0, 1)]
        self.err = [(self.logs / f"node{n}.err").read_text() for n in (0, 1)]

    def _wait(self, start) -> list:
        codes = [None, None]
        while None in codes and time.monotonic() - start < LIMIT_S:
            codes = [p.poll() for p in self.procs]
            time.sleep(0.5)
        for p in self.procs:  # past the limit: kill each node's process group we started
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        return codes

    def tail(self, n=3000) -> str:
        return "\n".join(f"--- node {i} (exit {c})\n{e[-n:]}" for i, (c, e) in enumerate(zip(self.codes, self.err)))


def run_nodes(tmp_path, name, *args, env=None, flags=False, timeout_s=None) -> Nodes:
    env = dict(env or {}, LOGLEVEL="INFO")  # LOGLEVEL: torchrun logs each node's global ranks
    if timeout_s is not None:
        env["MCORE_BRIDGE_TIMEOUT"] = str(timeout_s)
    return Nodes(tmp_path, name, [*args, "--nproc-per-node", "2", "--device", "cpu"], env, flags)


def node_ranks(stderr: str) -> list[int]:
    """The global ranks torchrun gave this node's workers (its INFO log of the rendezvous)."""
    found = re.findall(r"global_ranks=\[([\d, ]+)\]", stderr)
    assert found, "torchrun did not log the node's global ranks"
    return [int(r) for r in found[-1].split(",")]


def plain_format() -> list[str]:
    """The one-file-per-rank Megatron format (``mp_rank_TT_PPP``), where --ckpt-format chooses it."""
    from mcore_bridge.cli import build_parser

    _, unknown = build_parser().parse_known_args(["export", "--save", "x", "--ckpt-format", "plain"])
    return [] if unknown else ["--ckpt-format", "plain"]


def test_two_node_roundtrip(zoo_model, tmp_path):
    """HF -> Megatron tp2 x pp2 over 2 nodes x 2 processes (seed variables), and back to HF (flags):
    byte-identical to the source, and each node wrote its own pipeline stage's files."""
    src = zoo_model("llama")
    mcore, hf = tmp_path / "mcore", tmp_path / "hf"
    run = run_nodes(tmp_path, "to-mcore", "--model", src, "--to-mcore", "--tp", "2", "--pp", "2", "--save", mcore,
                    *plain_format())
    assert run.codes == [0, 0], run.tail()
    assert f"wrote {mcore}" in run.out[0]

    # node n holds global ranks 2n, 2n+1; the layout puts ranks 2, 3 on pipeline stage 1: the stage-1
    # files were written by node 1's processes, the stage-0 files, index and metadata by node 0's
    layout = ParallelLayout(tp=2, pp=2)
    assert node_ranks(run.err[0]) == [0, 1] and node_ranks(run.err[1]) == [2, 3]
    assert [layout.coords(r, 4)["pp"] for r in range(4)] == [0, 0, 1, 1]
    assert sorted(p.name for p in mcore.glob("mp_rank_*")) == [
        "mp_rank_00_000.safetensors", "mp_rank_00_001.safetensors",
        "mp_rank_01_000.safetensors", "mp_rank_01_001.safetensors"]
    assert (mcore / "mcore_bridge.json").exists() and not staging_dir(mcore).exists()

    run = run_nodes(tmp_path, "to-hf", "--load", mcore, "--to-hf", "--save", hf, flags=True)
    assert run.codes == [0, 0], run.tail()
    assert node_ranks(run.err[1]) == [2, 3]
    assert_same_weights(src, hf)
    assert (hf / "config.json").read_bytes() and not staging_dir(hf).exists()


def test_two_node_torch_dist_read_back_by_one_process(zoo_model, tmp_path):
    """A torch_dist checkpoint written by 2 nodes x 2 processes (tp2 x pp2, every rank writes its own
    part into the shared directory) and read back by a single process at tp1: byte-identical."""
    src = zoo_model("qwen3")
    mcore, hf = tmp_path / "mcore", tmp_path / "hf"
    run = run_nodes(tmp_path, "dist", "--model", src, "--to-mcore", "--tp", "2", "--pp", "2", "--save", mcore)
    assert run.codes == [0, 0], run.tail()
    assert (mcore / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    writers = {int(p.name.split("_")[2]) for p in (mcore / "release").glob("__*_*.distcp")}
    assert writers == {0, 1, 2, 3}  # ranks 2, 3 live on node 1
    r = subprocess.run([*CLI, "--load", str(mcore), "--to-hf", "--tp", "1", "--save", str(hf), "--device", "cpu"],
                       capture_output=True, text=True, timeout=LIMIT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(src, hf)


def assert_no_partial_output(save: Path):
    """No --save directory, and no staging directory (``.NAME.partial``) with the shards of the
    ranks that got that far: rank 0 removes it when the ranks fail together, node 0's launcher
    when a crash or a broken collective took the ranks down before that."""
    assert not save.exists(), f"{save} exists after a failed run"
    assert not staging_dir(save).exists(), sorted(p.name for p in staging_dir(save).iterdir())


TIMEOUT_S = 15  # MCORE_BRIDGE_TIMEOUT for the fault runs
TIMED_OUT = f"Timed out waiting {TIMEOUT_S * 1000}ms"  # gloo's words when the collective timeout fires
# a worker's own traceback, or its one-line CLI error, not a silent exit
WORKER_ERROR = r"\[rank\d\]: \w*(Error|Exception|Fault): |mcore-bridge: error \[rank \d\]: "
FAULTS = {  # fault -> what must show in (node 0's stderr, node 1's, either's)
    # a crash on node 1 while the ranks save: node 1's agent stops rank 2, node 0's ranks see their
    # connections to node 1 close
    "crash": ("rank:3:save:exit", ("Connection (closed|reset) by peer|Broken pipe", r"exitcode  : 17 ", "")),
    # an exception on node 0 while the others are in the export's collectives with it: the failing
    # rank does not wait in the agreement collective (io.collective_output) but exits, so the others'
    # collectives fail on its closed connections, not at the timeout
    "raise": ("rank:1:save:raise", ("", "", "Connection closed by peer")),
    # a rank on node 1 that stops responding (sockets open): only timeouts get the others out, then
    # node 1's agent stops the hung rank (SIGTERM) once its node-mate failed
    "hang": ("rank:2:save:hang", ("", r"exitcode  : -15 .*\(SIGTERM\)", TIMED_OUT)),
}


@pytest.mark.parametrize("kind", list(FAULTS))
def test_rank_failure_fails_every_node(zoo_model, tmp_path, kind):
    """HF -> megatron tp2 x pp2 -> HF over two nodes with one rank failing mid-save: every process
    of both nodes exits non-zero in bounded time, each node's stderr names an error, no output.
    (Which survivor sees what first is a race; only what must happen whatever the order is checked.)"""
    fault, (on_node0, on_node1, on_either) = FAULTS[kind]
    faulty_rank = int(fault.split(":")[1])
    save = tmp_path / "out"
    run = run_nodes(tmp_path, kind, "--model", zoo_model("llama"), "--to-hf", "--tp", "2", "--pp", "2",
                    "--save", save, env={"MCORE_BRIDGE_FAULT": fault}, timeout_s=TIMEOUT_S)
    assert None not in run.codes, f"a node hung past {LIMIT_S} s:\n{run.tail()}"
    assert all(c != 0 for c in run.codes), run.tail()
    assert f"injected fault (MCORE_BRIDGE_FAULT) on rank {faulty_rank} at save" in run.err[faulty_rank // 2]
    for node, expect in ((0, on_node0), (1, on_node1)):
        # torchrun's summary of this node's failed worker, or -- when that worker failed with a
        # one-line error (exit 2, e.g. "another rank failed") -- the launcher's quiet exit 2
        assert "ChildFailedError" in run.err[node] or run.codes[node] == 2, run.tail()
        if node != faulty_rank // 2:  # and a surviving worker's own error, not a silent exit
            assert re.search(WORKER_ERROR, run.err[node]), run.tail()
        assert re.search(expect, run.err[node]), f"node {node}: no {expect!r}\n{run.tail()}"
        assert "wrote" not in run.out[node]
    assert on_either in run.err[0] + run.err[1], run.tail()
    # rank 0 removes the staging directory itself even when a collective broke under it
    # (io.collective_output); the node-0 launcher's clean-up is the fallback for a rank 0 that died
    assert_no_partial_output(save)


# -- the launch arithmetic and its errors (no processes) --------------------------------------------

def parse(argv, env=None, monkeypatch=None):
    from mcore_bridge.cli import build_parser

    for name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    return build_parser().parse_args(["export", "--model", "m", "--to-mcore", "--save", "s", *argv])


@pytest.mark.parametrize("world, nnodes, nproc, expect", [
    (4, 2, None, 2), (4, 1, None, 4), (2, 4, None, 1), (6, 4, None, 3), (4, 2, 4, 4), (4, 3, None, 4),
    (4, 3, 1, "= 3 processes"), (4, 2, 3, "6 processes"),
])
def test_processes_per_node(monkeypatch, world, nnodes, nproc, expect):
    from mcore_bridge.launch import procs_per_node

    argv = ["--nnodes", str(nnodes)] + (["--nproc-per-node", str(nproc)] if nproc else [])
    args = parse(argv, monkeypatch=monkeypatch)
    if isinstance(expect, int):
        assert procs_per_node(args, world) == expect
    else:
        with pytest.raises(ValueError, match=f"{expect} cannot form this layout"):
            procs_per_node(args, world)


def test_torchrun_command_for_two_nodes(monkeypatch):
    from mcore_bridge.launch import procs_per_node, torchrun_command

    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400",
}
    args = parse([], env, monkeypatch)  # the seed's variables
    cmd = torchrun_command(procs_per_node(args, 4), args)
    for flag in ("--nproc-per-node=2", "--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1",
                 "--master-port=29400", "--max-restarts=0"):
        assert flag in cmd
    from mcore_bridge.runtime.dist import DEFAULT_TIMEOUT_S  # a node that never comes: the same timeout

    assert f"--rdzv-conf=timeout={DEFAULT_TIMEOUT_S}" in cmd
    assert "--standalone" not in cmd
    # flags win over the variables
    args = parse(["--node-rank", "0", "--master-port", "29401"], env, monkeypatch)
    assert {"--node-rank=0", "--master-port=29401"} <= set(torchrun_command(2, args))
    assert "--standalone" in torchrun_command(4, parse([], {}, monkeypatch))

    with pytest.raises(ValueError, match="--node-rank 2 .* 0..1"):
        procs_per_node(parse(["--nnodes", "2", "--node-rank", "2"], {}, monkeypatch), 4)
    for missing in ("MASTER_ADDR", "MASTER_PORT"):
        args = parse([], {k: v for k, v in env.items() if k != missing}, monkeypatch)
        with pytest.raises(ValueError, match=f"--nnodes 2: set {missing}"):
            torchrun_command(2, args)


def test_missing_master_address_is_refused(zoo_model, tmp_path):
    """Through the command line: an error naming what is missing, before anything is launched."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    save = tmp_path / "out"
    r = subprocess.run([*CLI, "--model", zoo_model("llama"), "--to-mcore", "--tp", "2", "--pp", "2",
                        "--save", save, "--device", "cpu"], capture_output=True, text=True, timeout=120,
                       env=dict(env, NNODES="2", NODE_RANK="1"))
    assert r.returncode == 2
    assert "mcore-bridge: error: --nnodes 2: set MASTER_ADDR and MASTER_PORT" in r.stderr
    assert "torch.distributed.run" not in r.stderr and not save.exists()


def test_fault_specs():
    from mcore_bridge.runtime.faults import parse as parse_faults

    assert parse_faults("rank:3:save") == [(3, "save", "exit")]
    assert parse_faults("rank:0:load:raise, rank:2:save:hang") == [(0, "load", "raise"), (2, "save", "hang")]
    for bad in ("3:save", "rank:x:save", "rank:1:commit", "rank:1:save:explode"):
        with pytest.raises(ValueError, match="MCORE_BRIDGE_FAULT"):
            parse_faults(bad)
