"""torchrun integration: process group set-up from the environment, and the few collectives the trainer needs.

A run started by ``torchrun --nproc_per_node N -m tokenprune finetune ...`` (or any launcher that sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) trains with DistributedDataParallel: gloo on CPU, nccl on CUDA.
Without those variables everything here degrades to single-process no-ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "all_reduce_sum", "all_gather_objects", "barrier"]


@dataclass
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, metrics and logs."""
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if the environment describes one, and choose this process's device.

    Args:
        device: "auto" (CUDA if available), "cpu", "cuda" or "cuda:N" (one process).

    Raises:
        ConfigError: an unknown device, or CUDA asked for where there is none.
    """
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ConfigError(f"run.device={device!r} is unknown; use 'auto', 'cpu', 'cuda' or 'cuda:N'.")
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"run.device={device!r} but CUDA is not available here; use run.device=cpu or auto.")
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ConfigError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (as torchrun sets them).") from None
    if device.startswith("cuda:"):
        local = int(device.split(":")[1]) if world == 1 else local
    if use_cuda and local >= torch.cuda.device_count():
        raise ConfigError(
            f"run.device={device!r} (local rank {local}) names a GPU this machine does not have "
            f"({torch.cuda.device_count()} visible)."
        )
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local, dev, owns)


def cleanup_distributed(info: DistInfo) -> None:
    """Leave the process group if `init_distributed` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum `tensor` over ranks in place (no-op on one process) and return it."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order (``[obj]`` on one process)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    """Wait for all ranks (no-op on one process)."""
    if info.enabled:
        dist.barrier()
