"""Where this process sits in a data-parallel job: its rank and the world's size, read from the environment the
launcher (``deepspeed``, ``torchrun``, Slurm through either) set. Every layer passes a ``DistEnv`` around;
starting the process group is ``adamix_ds.training.init_distributed``'s job."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "all_reduce", "broadcast", "dist_env"]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, read from the environment the launcher set."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """Rank and world size from ``deepspeed``/``torchrun`` variables; one process when started by ``python``."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=world_size,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world_size))),
    )


def _on_device(tensor: torch.Tensor, device: torch.device | str) -> None:
    """``RuntimeError`` unless ``tensor`` is on ``device``: NCCL, the GPU backend, takes only device tensors ("No
    backend type associated with device type cpu"), which gloo on CPU ranks would never show."""
    expected = torch.device(device)
    index_differs = None not in (expected.index, tensor.device.index) and expected.index != tensor.device.index
    if tensor.device.type != expected.type or index_differs:
        raise RuntimeError(f"a collective of a tensor on {tensor.device}: this job's collectives take tensors on {expected}")


def all_reduce(tensor: torch.Tensor, device: torch.device | str, op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
    """``torch.distributed.all_reduce`` in place, of a tensor that must be on the engine's ``device``."""
    _on_device(tensor, device)
    dist.all_reduce(tensor, op=op)


def broadcast(tensor: torch.Tensor, device: torch.device | str, src: int = 0) -> None:
    """``torch.distributed.broadcast`` in place from rank ``src``, of a tensor that must be on the engine's ``device``."""
    _on_device(tensor, device)
    dist.broadcast(tensor, src=src)
