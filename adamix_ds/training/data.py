"""Data loading for distributed training and evaluation: resumable shuffles, exact sharded evaluation."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler, Subset

from adamix_ds.data import TaskData
from adamix_ds.training.runtime import DistEnv

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


def train_loader(dataset: datasets.Dataset, collator: Callable, micro_batch_size: int, env: DistEnv, seed: int) -> DataLoader:
    """Micro-batches of this rank's share of ``dataset``; position it with ``loader.sampler.set_position``.

    No worker processes: batches come in the same order with the same contents on every run.
    """
    return DataLoader(dataset, batch_size=micro_batch_size, sampler=ResumableSampler(len(dataset), env, seed), collate_fn=collator)


@torch.no_grad()
def evaluate(
    engine: DeepSpeedEngine | nn.Module, dataset: datasets.Dataset, family: TaskFamily, batch_size: int, env: DistEnv
) -> dict[str, float]:
    """The task metrics of ``engine`` (a DeepSpeed engine, or a plain model on every rank) on ``dataset``
    (keys without prefix, plus ``loss``), the same on every rank: ``family`` batches the examples, gives
    their logits and scores them.

    Rank ``r`` scores examples ``r, r + W, ...``; shards are padded to equal length (ZeRO-3 gathers
    parameters collectively, so every rank must run the same number of forward passes) and the padding
    is dropped before scoring, so every example counts exactly once.
    """
    # A DeepSpeed engine's own ``training`` flag does not follow train()/eval(); its module's does.
    was_training = getattr(engine, "module", engine).training
    engine.eval()
    count = len(dataset)
    own = list(range(env.rank, count, env.world_size))
    padded = own + [own[-1] if own else 0] * (math.ceil(count / env.world_size) - len(own))
    loader = DataLoader(Subset(dataset, padded), batch_size=batch_size, collate_fn=family.collator())
    logits = []
    for batch in loader:
        inputs = {key: value.to(engine.device) for key, value in batch.items() if key != "labels"}
        logits.append(family.logits(engine, inputs).float().cpu())
    local = torch.cat(logits)[: len(own)]
    shards: list[torch.Tensor | None] = [None] * env.world_size
    dist.all_gather_object(shards, local)
    predictions = torch.empty(count, *local.shape[1:])
    for rank, shard in enumerate(shards):
        predictions[rank :: env.world_size] = shard
    labels = torch.as_tensor(dataset["labels"])
    engine.train(was_training)
    return family.scores(predictions, labels)


def evaluate_splits(
    engine: DeepSpeedEngine | nn.Module, task_data: TaskData, family: TaskFamily, batch_size: int, env: DistEnv
) -> dict[str, float]:
    """``evaluate`` on every evaluation split of ``task_data``, named like ``run_glue.py``:
    ``eval_<metric>`` for the dev set, ``_mm`` appended for MNLI mismatched, ``test_<metric>`` for the
    GLUE dev set of a k-shot folder."""
    metrics: dict[str, float] = {}
    for split, dataset in task_data.eval.items():
        prefix = "test" if split.startswith("test") else "eval"
        suffix = "_mm" if split.endswith("mismatched") else ""
        scores = evaluate(engine, dataset, family, batch_size, env)
        metrics.update({f"{prefix}_{name}{suffix}": value for name, value in scores.items()})
    return metrics
