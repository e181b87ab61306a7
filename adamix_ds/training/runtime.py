"""Process setup: starting torch.distributed, threads, logging, seeds, input errors, a launcher's opening, DeepSpeed's
output kept off stdout (the rank itself: ``adamix_ds.distributed``)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from adamix_ds.distributed import DistEnv, dist_env

logger = logging.getLogger("adamix_ds.train")

# Exit status of a run refused for bad input (the same as argparse's for a bad flag).
USAGE_ERROR = 2


def init_distributed(env: DistEnv) -> None:
    """Start torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPUs), also for a plain ``python`` run."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "MASTER_ADDR" not in os.environ:
        # Started by plain python: a one-process group. Port 0: its store binds a free port itself, where a port
        # picked beforehand can be taken by another job before the bind (EADDRINUSE). A one-rank group has no
        # shared-memory buffer named after the port.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(env.local_rank)
    with stdout_to_stderr():  # on CPU it builds and announces its shared-memory op
        deepspeed.init_distributed()


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what the block writes to stdout to stderr: Python's ``sys.stdout`` and file descriptor 1 (where a compiler
    run by DeepSpeed's op builder writes). DeepSpeed prints to stdout (its logger's handler holds the ``sys.stdout``
    of its import; its CPU collectives announce their build), and launchers keep stdout for their results
    (``evaluate.py ... > modes.json``)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)


class CpuAcceleratorNotice(logging.Filter):
    """Drops DeepSpeed's warning that it fell back to its CPU accelerator ("Setting accelerator to CPU. If you have
    GPU or other accelerator, we were unable to detect it.")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


def start_launcher() -> tuple[DistEnv, torch.device]:
    """The opening of a launcher (``train.py``, ``evaluate.py``, ``predict.py``, ``export.py``): this rank (``dist_env``), its logging
    (``setup_logging``) and threads (``configure_threads``), and the device it runs on: its GPU, else the CPU."""
    env = dist_env()
    setup_logging(env)
    configure_threads(env)
    return env, torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def configure_threads(env: DistEnv) -> None:
    """On CPU, share the cores between the ranks of this machine unless OMP_NUM_THREADS says otherwise.

    Each rank would otherwise start one thread per core, and the ranks would fight over every core.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(1, env.local_world_size)))


def setup_logging(env: DistEnv) -> None:
    """Log lines on rank 0; other ranks report warnings and errors only."""
    level = logging.INFO if env.is_main else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=level, force=True)
    for name in ("DeepSpeed", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import datasets
    import transformers

    # DeepSpeed calls collectives that torch has renamed; the warning repeats at every step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def shutdown_distributed(env: DistEnv) -> None:
    """End this rank's part in torch.distributed after its last collective; every rank calls it.

    Waits for the other ranks, unlinks this rank's ``/dev/shm`` buffer of DeepSpeed's CPU allreduce
    (DeepSpeed 0.19 creates one, about 70 MB, per CPU rank and run and never removes it; peers that still
    map it keep their mapping until they exit), and destroys the process group: a gloo worker thread
    still alive at interpreter exit otherwise sometimes aborts a rank that has finished its work
    ("terminate called without an active exception", exit code 250 through the launcher).
    """
    torch.distributed.barrier()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_{env.rank}"
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join("/dev/shm", name))
    torch.distributed.destroy_process_group()


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of optimizer step ``step`` on ``rank``: dropout is a pure function of the step, so a
    resumed run draws the same masks as an uninterrupted one without saving RNG states."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] % (2**63))


@contextlib.contextmanager
def usage_errors(env: DistEnv, prog: str = "train.py") -> Iterator[None]:
    """Turn bad input found in the block (``ValueError``, ``OSError``) into one line on stderr and exit 2.

    Only rank 0 prints: every rank checks the same input and would repeat the line.
    """
    try:
        yield
    except (ValueError, OSError) as error:
        message = " ".join(str(error).split())
        if env.is_main:
            print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(USAGE_ERROR) from None


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
