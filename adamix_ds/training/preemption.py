"""Checkpoint-and-stop on Slurm's warning signal before the time limit.

``launchers/slurm/train.sbatch`` asks Slurm for SIGUSR1 shortly before the time limit and requeues the
job when the run leaves ``$ADAMIX_REQUEUE_FILE`` behind; the next start resumes from ``output_dir``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

REQUEUE_FILE_ENV = "ADAMIX_REQUEUE_FILE"


class PreemptionSignal:
    """Records SIGUSR1; ``requested()`` tells every rank at once whether any rank received it.

    Ranks can get the signal a moment apart; agreeing through one all-reduce per optimizer step makes
    them all stop after the same step, so no rank waits in a collective the others have left.
    """

    def __init__(self, device: torch.device, signum: int = signal.SIGUSR1) -> None:
        self.device = device
        self.received = False
        signal.signal(signum, self._record)

    def _record(self, signum: int, frame: object) -> None:
        self.received = True

    def requested(self) -> bool:
        """True on every rank once any rank has received the signal."""
        flag = torch.tensor([float(self.received)], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def request_requeue() -> Path | None:
    """Create the file the batch script checks to requeue the job (when it set one); return its path."""
    path = os.environ.get(REQUEUE_FILE_ENV)
    if not path:
        return None
    Path(path).touch()
    return Path(path)
