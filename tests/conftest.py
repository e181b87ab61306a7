"""Shared fixtures and the paths CI provides."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from adamix_ds.training.runtime import free_port  # noqa: F401  (re-exported for the tests)

from tiny_models import ARCHITECTURES

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
VENV_BIN = str(Path(sys.executable).parent)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker's in-process torch gets its share of the cores: ``make test`` runs one
    worker per core, and OpenMP threads competing for the same cores slow everything down."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def tiny_rte_sweep_args(max_steps: int) -> dict[str, object]:
    """Launcher flags of a real MiniLM run on a few RTE examples that takes seconds (for sweep tests)."""
    return {
        "task_name": "rte",
        "data_dir": str(SHARED_DATA / "glue" / "RTE"),
        "max_train_samples": 32,
        "max_eval_samples": 24,
        "max_seq_length": 32,
        "per_device_train_batch_size": 8,
        "max_steps": max_steps,
        "bottleneck_dim": 8,
    }


def subprocess_env() -> dict[str, str]:
    """The environment for launched ranks: this venv's tools first on PATH."""
    env = dict(os.environ)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def release_stale_shared_memory(command: list[str]) -> None:
    """Unlink the DeepSpeed allreduce buffers in ``/dev/shm`` of the run ``command`` launched: ranks that
    were killed or stopped on an error never reach shutdown_distributed, which unlinks them."""
    port = command[command.index("--master_port") + 1]
    for stale in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        stale.unlink()


@pytest.fixture(params=ARCHITECTURES)
def model_type(request) -> str:
    return request.param


@pytest.fixture(params=("bottleneck", "lora"))
def adapter_type(request) -> str:
    return request.param
