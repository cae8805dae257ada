"""Process groups: torch.distributed (gloo on CPU, NCCL on GPU) plus megatron's parallel state.

``setup`` creates them in a process of ours, or adopts the ones a host (a trainer) created when they
match the layout; it never tears a host's groups down (only ``reinit``, for the test pool). The
bridge communicates over WORLD, megatron's tp/pp/ep/etp groups and, for ``receivers=[...]`` syncs,
one group per receiver set that ``Bridge`` creates once and keeps.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from ..layout import LayoutError, ParallelLayout
from . import compat
from .faults import maybe_fail  # noqa: F401  (tests only: MCORE_BRIDGE_FAULT, see faults.py)

# Every collective (the world group and megatron's tp/pp/ep/... groups alike) gives up after this
# many seconds, so that a rank that died or hangs makes the others fail instead of waiting forever.
DEFAULT_TIMEOUT_S = int(os.environ.get("MCORE_BRIDGE_TIMEOUT", "600"))


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or auto, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible; use --device cpu")
    return device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(device: str, timeout_s: int = DEFAULT_TIMEOUT_S):
    """Join the job torchrun started, or form a group of one when run as a plain process. A
    process group the host initialised is used as it is. Sets no environment variable."""
    if dist.is_initialized():
        return
    kw = {}
    if "RANK" not in os.environ:  # a plain process: a group of one on a free local port
        port = os.environ.get("MASTER_PORT") or free_port()
        kw = dict(init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s), **kw)


_REINIT = False  # see allow_reinit


def allow_reinit(allow: bool = True) -> None:
    """Let ``setup`` tear down and re-create megatron's parallel state when it does not match the
    layout asked for. For processes the caller owns and reuses for many layouts (the test pool,
    ``verify/pool.py``); never in a host's process, whose groups it would destroy."""
    global _REINIT
    _REINIT = allow


def setup(layout: ParallelLayout, device: str = "auto", seed: int = 1234, *, reinit: bool | None = None) -> str:
    """Make torch.distributed and megatron's parallel state fit ``layout``; returns the device.

    * Neither initialised: creates both (gloo on CPU, NCCL on GPU), megatron's groups with
      ``initialize_model_parallel`` and the model-parallel RNG seeds.
    * Already initialised -- a trainer's or RL framework's process -- with the same groups (tp,
      pp, cp, ep, etp, and the same dp): adopted as they are; nothing is destroyed, re-created or
      re-seeded, and the bridge communicates over megatron's groups (see ``bridge_parts.local.LocalPlan.groups``).
    * Initialised with other groups: ``LayoutError`` naming both layouts, unless ``reinit`` (or
      ``allow_reinit()`` in this process) asks to destroy megatron's state and every process
      group but WORLD and re-create them for ``layout``.
    """
    from megatron.core import parallel_state as ps

    device = resolve_device(device)
    reinit = _REINIT if reinit is None else reinit
    with compat.scope(device):
        init_process_group(device)
        world = dist.get_world_size()
        if world % layout.min_world_size:
            raise LayoutError(f"{world} processes cannot form tp={layout.tp} x cp={layout.cp} x pp={layout.pp} "
                              f"with etp={layout.etp} x ep={layout.ep}: launch a multiple of "
                              f"{layout.min_world_size} (--nproc-per-node)")
        if ps.model_parallel_is_initialized():
            current = ParallelLayout.from_parallel_state()
            if current.same_grid(layout) and current.vpp in (1, layout.vpp) and not reinit:
                _check_coords(layout, ps)
                return device  # adopted: the host's groups, untouched
            if not reinit:
                raise LayoutError(
                    f"megatron's parallel state in this process is {current.short()} (world {world}), the "
                    f"bridge's layout is {layout.short()}: build the Bridge with "
                    f"ParallelLayout.from_parallel_state() to use the existing groups; setup(reinit=True) "
                    f"would destroy them and create new ones")
            ps.destroy_model_parallel()
            _destroy_subgroups()
        _initialize(layout, ps)
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
        _check_coords(layout, ps)
    return device


def _initialize(layout: ParallelLayout, ps):
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp,
        create_gloo_process_groups=False,
        distributed_timeout_minutes=DEFAULT_TIMEOUT_S / 60)  # megatron's own default: 30 minutes


def _check_coords(layout: ParallelLayout, ps):
    """Our static rank arithmetic must agree with megatron's groups."""
    coords = layout.coords(dist.get_rank(), dist.get_world_size())
    actual = {"tp": ps.get_tensor_model_parallel_rank(), "cp": ps.get_context_parallel_rank(),
              "dp": ps.get_data_parallel_rank(), "pp": ps.get_pipeline_model_parallel_rank(),
              "etp": ps.get_expert_tensor_parallel_rank(), "ep": ps.get_expert_model_parallel_rank(),
              "edp": ps.get_expert_data_parallel_rank()}
    if coords != actual:
        raise RuntimeError(f"rank {dist.get_rank()}: layout coordinates {coords} != megatron's {actual} (a rank "
                           f"order other than megatron's default tp-cp-ep-dp-pp is not supported)")


def _destroy_subgroups():
    """megatron's destroy_model_parallel() forgets its groups without destroying them; each gloo
    group keeps its threads alive, so re-initialising per case (the test pool) would pile them up."""
    from torch.distributed import distributed_c10d as c10d

    for group in list(c10d._world.pg_map):
        if group is not c10d.GroupMember.WORLD:
            dist.destroy_process_group(group)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_ok(ok: bool) -> bool:
    """Collective: True when every rank reports ``ok`` (used to fail together instead of hanging)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag)
    return int(flag.item()) == 0
