"""Checkpoint-and-stop on Slurm's warning signal before the time limit.

``launchers/slurm/train.sbatch`` asks Slurm for SIGUSR1 shortly before the time limit and requeues the
job when the run leaves ``$ADAMIX_REQUEUE_FILE`` behind; the next start resumes from ``output_dir``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

REQUEUE_FILE_ENV = "ADAMIX_REQUEUE_FILE"


class PreemptionSignal:
    """Records SIGUSR1 on this rank (``received``).

    Ranks can get the signal a moment apart; they agree at the next log line, in the all-reduce that
    ``adamix_ds.training.loop.LossWindow.close`` makes anyway, and all stop after that same step, so no rank waits
    in a collective the others have left and no optimizer step waits for the host. The stop therefore comes within
    ``--logging_steps`` steps of the signal: Slurm's warning (``--signal=USR1@180``) must leave that much time.
    """

    def __init__(self, signum: int = signal.SIGUSR1) -> None:
        self.received = False
        signal.signal(signum, self._record)

    def _record(self, signum: int, frame: object) -> None:
        self.received = True


def request_requeue() -> Path | None:
    """Create the file the batch script checks to requeue the job (when it set one); return its path."""
    path = os.environ.get(REQUEUE_FILE_ENV)
    if not path:
        return None
    Path(path).touch()
    return Path(path)
