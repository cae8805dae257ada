"""Process groups: torch.distributed (gloo on CPU, NCCL on GPU) plus megatron's parallel state."""

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
    """Join the job torchrun started, or form a group of one when run as a plain process."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))


def setup(layout: ParallelLayout, device: str = "auto", seed: int = 1234) -> str:
    """Initialise torch.distributed and megatron's parallel state for ``layout``; returns the device.

    Safe to call again with another layout in the same process group (the test pool does).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    device = resolve_device(device)
    compat.apply(device)
    init_process_group(device)
    world = dist.get_world_size()
    if world % layout.min_world_size:
        raise LayoutError(f"{world} processes cannot form tp={layout.tp} x pp={layout.pp} with "
                          f"etp={layout.etp} x ep={layout.ep}: launch a multiple of {layout.min_world_size} "
                          f"(--nproc-per-node)")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
        _destroy_subgroups()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp,
        create_gloo_process_groups=False,
        distributed_timeout_minutes=DEFAULT_TIMEOUT_S / 60)  # megatron's own default: 30 minutes
    model_parallel_cuda_manual_seed(seed)
    coords = layout.coords(dist.get_rank(), world)
    actual = {"tp": ps.get_tensor_model_parallel_rank(), "dp": ps.get_data_parallel_rank(),
              "pp": ps.get_pipeline_model_parallel_rank(), "etp": ps.get_expert_tensor_parallel_rank(),
              "ep": ps.get_expert_model_parallel_rank(), "edp": ps.get_expert_data_parallel_rank()}
    if coords != actual:  # our static rank arithmetic must agree with megatron's groups
        raise RuntimeError(f"rank {dist.get_rank()}: layout coordinates {coords} != megatron's {actual}")
    return device


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
