"""Shared test fixtures: the model cache and pools of gloo worker processes (verify/pool.py).

Worker processes inherit ``os.environ`` when they are spawned, so everything they need is set
here, at import time and by the session fixtures, before any pool starts.

Tests that use a pool carry ``@pytest.mark.world(n)``. They run grouped by ``n`` so that each pool
size starts once per session (a 4-process pool costs ~10 s to start, a reused one ~1 s per case);
under pytest-xdist each pool size's tests go to a single xdist worker for the same reason.
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest

os.environ.update(OMP_NUM_THREADS="1", MCORE_BRIDGE_QUIET="1")  # no TORCHDYNAMO_DISABLE: compat.scope


def pytest_configure(config):
    config.addinivalue_line("markers", "world(n): the test runs on a pool of n worker processes")
    if getattr(config.option, "dist", "no") == "load" and not hasattr(config, "workerinput"):
        fd, config._mcore_worlds = tempfile.mkstemp(prefix="mcore-bridge-worlds-", suffix=".json")
        os.close(fd)


def pytest_unconfigure(config):
    if getattr(config, "_mcore_worlds", None):
        os.unlink(config._mcore_worlds)


def _world(item) -> int:
    mark = item.get_closest_marker("world")
    return mark.args[0] if mark else 0


def pytest_collection_modifyitems(config, items):
    """Run tests by pool size (stable sort; tests without a ``world`` mark keep their order and come
    first). Under xdist, also tell the controller which pool each test needs (see below)."""
    items.sort(key=_world)
    path = getattr(config, "workerinput", {}).get("mcore_bridge_worlds")
    if path:
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({item.nodeid: _world(item) for item in items if _world(item)}, f)
        os.replace(tmp, path)


# -- pytest-xdist: one xdist worker per pool size ------------------------------------------------
# xdist's own "--dist loadgroup" does not group under pytest 9 (it renames node ids through an
# attribute pytest no longer reads), so the workers write {node id: world} at collection and the
# controller schedules each world size as one unit; tests without a world mark stay one per unit.
@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    if getattr(node.config, "_mcore_worlds", None):
        node.workerinput["mcore_bridge_worlds"] = node.config._mcore_worlds


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    path = getattr(config, "_mcore_worlds", None)
    if path is None:
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByPoolSize(LoadScopeScheduling):
        worlds = None

        def _split_scope(self, nodeid: str) -> str:
            if self.worlds is None:  # written by the workers before they report their collection
                with open(path) as f:
                    self.worlds = json.load(f)
            world = self.worlds.get(nodeid)
            return f"pool-world{world}" if world else nodeid

    return ByPoolSize(config, log)


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def bridge_cache(tmp_path_factory):
    """``MCORE_BRIDGE_CACHE`` in a temp dir (shared by xdist workers: the zoo builds atomically)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "mcore_bridge_cache"
    root.mkdir(exist_ok=True)
    old = os.environ.get("MCORE_BRIDGE_CACHE")
    os.environ["MCORE_BRIDGE_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("MCORE_BRIDGE_CACHE", None)
    else:
        os.environ["MCORE_BRIDGE_CACHE"] = old


@pytest.fixture(scope="session")
def zoo_model(bridge_cache):
    """``zoo_model(name)`` -> directory of the built-in model, built once (in this process). Pass
    the directory to pool cases, so that both sides read the very same checkpoint."""
    from mcore_bridge import zoo

    return zoo.materialize


class Pools:
    """One ``verify.pool.Pool`` per world size, created on demand; switching sizes closes the
    previous pool (2 cores: idle workers of another size would only compete for memory)."""

    def __init__(self):
        self.current = None

    def get(self, world_size: int):
        from verify.pool import Pool

        if self.current is not None and self.current.world_size != world_size:
            self.current.close()
            self.current = None
        if self.current is None:
            self.current = Pool(world_size)
        return self.current

    def close(self):
        if self.current is not None:
            self.current.close()
            self.current = None


@pytest.fixture(scope="session")
def pools(bridge_cache):
    """``pools.get(n)``: a pool of ``n`` gloo worker processes, reused across tests."""
    p = Pools()
    yield p
    p.close()
