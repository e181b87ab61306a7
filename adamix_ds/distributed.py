"""Where this process sits in a data-parallel job: its rank and the world's size, read from the environment the
launcher (``deepspeed``, ``torchrun``, Slurm through either) set. Every layer passes a ``DistEnv`` around;
starting the process group is ``adamix_ds.training.init_distributed``'s job."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["DistEnv", "dist_env"]


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
