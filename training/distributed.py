"""Multi-process data-parallel training (the book's appendix A.4, PyTorch DDP).

``torchrun --nproc_per_node N`` starts N copies of the job and tells each its
RANK, LOCAL_RANK and WORLD_SIZE through the environment. ``setup`` reads
those, joins the process group (gloo on CPU, nccl on CUDA) and picks the
device; without them it describes a single process. Only rank 0 writes logs
and checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from core.device import resolve_device


class DistributedError(RuntimeError):
    """A torchrun environment that cannot be used (bad variables, device mismatch)."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when started by torchrun, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise DistributedError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {e}") from None
    return rank, world, local


def setup(device_name: str) -> DistEnv:
    """Join the process group when under torchrun; pick this process's device."""
    device = resolve_device(device_name, allow_mps=True)
    found = torchrun_env()
    if found is None or found[1] == 1:
        return DistEnv(device=device)
    rank, world, local = found
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices: lower --nproc_per_node"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device)


def teardown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def mean_across(env: DistEnv, value: float) -> float:
    """The mean of a Python number over all ranks (itself when single-process)."""
    if not env.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / env.world_size


def gather_to_main(env: DistEnv, obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (a list in rank order); None on the other ranks."""
    if not env.enabled:
        return [obj]
    out: list[Any] | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()

