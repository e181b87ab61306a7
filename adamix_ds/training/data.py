"""Data loading for distributed training and evaluation: resumable shuffles, every evaluation split by name."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from adamix_ds.data import TaskData
from adamix_ds.distributed import DistEnv
from adamix_ds.evaluation import pinned

if TYPE_CHECKING:
    import datasets
    from deepspeed import DeepSpeedEngine

    from adamix_ds.families import TaskFamily


class ResumableSampler(Sampler[int]):
    """``DistributedSampler``'s order (a seeded shuffle per epoch, padded so that every rank gets the same
    number of samples) that can start part-way through an epoch, for exact resumption."""

    def __init__(self, num_samples: int, env: DistEnv, seed: int) -> None:
        self.inner = DistributedSampler(range(num_samples), num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed)
        self.skip = 0

    def set_position(self, epoch: int, skip_samples: int) -> None:
        """Iterate epoch ``epoch``'s order from its ``skip_samples``-th sample on."""
        self.inner.set_epoch(epoch)
        self.skip = skip_samples

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.inner), self.skip, None)

    def __len__(self) -> int:
        return len(self.inner) - self.skip


def train_loader(
    dataset: datasets.Dataset, collator: Callable, micro_batch_size: int, env: DistEnv, seed: int, device: torch.device
) -> DataLoader:
    """Micro-batches of this rank's share of ``dataset`` for ``device`` (pinned for a GPU); position it with
    ``loader.sampler.set_position``.

    No worker processes: batches come in the same order with the same contents on every run.
    """
    sampler = ResumableSampler(len(dataset), env, seed)
    return DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, collate_fn=collator, pin_memory=pinned(device))


def evaluate_splits(
    engine: DeepSpeedEngine | nn.Module,
    task_data: TaskData,
    family: TaskFamily,
    batch_size: int,
    env: DistEnv,
    output_dir: Path | None = None,
) -> dict[str, float]:
    """``family.evaluate`` on every evaluation split of ``task_data``, named like ``run_glue.py``:
    ``eval_<metric>`` for the dev set, ``_mm`` appended for MNLI mismatched, ``test_<metric>`` for the
    GLUE dev set of a k-shot folder. A family that produces text writes it to
    ``output_dir/predictions_<split>.*`` when ``output_dir`` is given."""
    metrics: dict[str, float] = {}
    for split, dataset in task_data.eval.items():
        prefix = "test" if split.startswith("test") else "eval"
        suffix = "_mm" if split.endswith("mismatched") else ""
        predictions = None if output_dir is None else output_dir / f"predictions_{split}"
        scores = family.evaluate(engine, dataset, batch_size, env, predictions)
        metrics.update({f"{prefix}_{name}{suffix}": value for name, value in scores.items()})
    return metrics
