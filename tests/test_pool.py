"""The worker pool surfaces a failing rank at once, times out a hung case, and recovers."""

from __future__ import annotations

import os
import time

import pytest

from tests import cases
from verify.pool import WorkerError

pytestmark = pytest.mark.world(2)


def _reaped(pids):
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_rank_error_surfaces_fast_and_pool_recovers(pools):
    pool = pools.get(2)
    assert pool.run(cases.whoami) == [(0, 2), (1, 2)]
    pids = pool.pids
    timeout = 300
    start = time.monotonic()
    with pytest.raises(WorkerError) as err:
        pool.run(cases.raise_on, timeout=timeout, rank=1)
    assert time.monotonic() - start < timeout / 4  # raised without waiting for rank 0's barrier
    assert err.value.rank == 1
    assert "ValueError: deliberate failure on rank 1" in err.value.traceback
    assert "raise_on" in str(err.value)
    _reaped(pids)
    assert pool.run(cases.whoami) == [(0, 2), (1, 2)]


def test_hung_case_times_out_and_pool_recovers(pools):
    pool = pools.get(2)
    assert pool.run(cases.whoami) == [(0, 2), (1, 2)]
    pids = pool.pids
    with pytest.raises(TimeoutError, match=r"hang_on\(rank=1\)") as err:
        pool.run(cases.hang_on, timeout=3, rank=1)
    stacks = str(err.value).split("Stacks:", 1)[1]  # where each rank was stuck
    assert "--- rank 0 ---" in stacks and "--- rank 1 ---" in stacks and "in hang_on" in stacks
    _reaped(pids)
    assert pool.run(cases.whoami) == [(0, 2), (1, 2)]


def test_dead_rank_surfaces_fast_and_pool_recovers(pools):
    pool = pools.get(2)
    assert pool.run(cases.whoami) == [(0, 2), (1, 2)]
    pids = pool.pids
    start = time.monotonic()
    with pytest.raises(WorkerError, match="exited with code 3") as err:
        pool.run(cases.exit_on, timeout=300, rank=0)
    assert time.monotonic() - start < 300 / 4
    assert err.value.rank == 0
    _reaped(pids)
    assert pool.run(cases.whoami) == [(0, 2), (1, 2)]


def test_a_peer_s_connection_error_names_the_rank_that_died(pools):
    """The survivors of a crashed rank fail in their collective ('connection reset by peer'), often
    before the pool sees the crash: the error names the dead rank and keeps the survivor's message."""
    pool = pools.get(2)
    pids = pool.pids
    with pytest.raises(WorkerError, match="exited with code 3") as err:
        pool.run(cases.exit_on_after_peer_error, timeout=300, rank=0)
    assert err.value.rank == 0 and "then rank 1 failed" in str(err.value) and "reset by peer" in str(err.value)
    _reaped(pids)
    assert pool.run(cases.whoami) == [(0, 2), (1, 2)]
