"""Exact sharded evaluation across data-parallel ranks: each rank runs an interleaved shard, padded so that
every rank runs the same number of forward passes, and the shards are gathered back in example order."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from adamix_ds.distributed import DistEnv

if TYPE_CHECKING:
    import datasets
    from deepspeed import DeepSpeedEngine

__all__ = ["ScoredFamily", "eval_shard", "evaluate_logits", "evaluate_loss", "gather_shards", "sharded_logits", "to_device"]


class ScoredFamily(Protocol):
    """What evaluation needs of a task family: ``adamix_ds.families.TaskFamily`` is one. Declared here, where
    evaluation is, so that the families, which evaluate with these functions, are not imported back."""

    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]: ...

    def logits(self, model: Callable[..., Any], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor: ...

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...

    def scores(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]: ...


def pinned(device: torch.device) -> bool:
    """Whether loaders for ``device`` pin their batches: host-to-device copies from pinned memory do not block."""
    return torch.device(device).type == "cuda"


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``batch`` on ``device``, copied without waiting for the device when the loader pinned it (``pinned``)."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _shard_loader(dataset: datasets.Dataset, indices: list[int], family: ScoredFamily, batch_size: int, device: torch.device) -> DataLoader:
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, collate_fn=family.collator(), pin_memory=pinned(device))


def eval_shard(count: int, env: DistEnv) -> tuple[list[int], list[int]]:
    """Rank ``r``'s share of ``count`` evaluation examples, ``r, r + W, ...``, and the same padded (by repeating
    its last index) to the length of the longest share: ZeRO-3 gathers parameters collectively, so every rank
    must run the same number of forward passes. The padding's outputs are dropped before scoring."""
    own = list(range(env.rank, count, env.world_size))
    return own, own + [own[-1] if own else 0] * (math.ceil(count / env.world_size) - len(own))


def gather_shards(local: object, env: DistEnv) -> list:
    """Every rank's ``local`` (a picklable shard of ``eval_shard``'s examples), by rank, on every rank (one
    process needs no process group)."""
    if env.world_size == 1:
        return [local]
    shards: list = [None] * env.world_size
    dist.all_gather_object(shards, local)
    return shards


@torch.no_grad()
def sharded_logits(
    engine: DeepSpeedEngine | nn.Module,
    dataset: datasets.Dataset,
    family: ScoredFamily,
    batch_size: int,
    env: DistEnv,
    progress: bool = False,
) -> torch.Tensor:
    """``family.logits`` of every example of ``dataset`` (labelled or not) in example order, on every rank: each
    rank computes its ``eval_shard`` in eval mode, and the shards are gathered; ``progress`` shows a bar on rank 0."""
    # A DeepSpeed engine's own ``training`` flag does not follow train()/eval(); its module's does.
    was_training = getattr(engine, "module", engine).training
    engine.eval()
    count = len(dataset)
    own, padded = eval_shard(count, env)
    loader = _shard_loader(dataset, padded, family, batch_size, engine.device)
    logits = []
    for batch in tqdm(loader, desc="predict", unit="batch", disable=not (progress and env.is_main), dynamic_ncols=True):
        inputs = to_device({key: value for key, value in batch.items() if key != "labels"}, engine.device)
        logits.append(family.logits(engine, inputs).float())
    local = torch.cat(logits)[: len(own)].cpu()  # one copy to the host for the whole shard
    ordered = torch.empty(count, *local.shape[1:])
    for rank, shard in enumerate(gather_shards(local, env)):
        ordered[rank :: env.world_size] = shard
    engine.train(was_training)
    return ordered


def evaluate_logits(
    engine: DeepSpeedEngine | nn.Module, dataset: datasets.Dataset, family: ScoredFamily, batch_size: int, env: DistEnv
) -> dict[str, float]:
    """The task metrics of ``engine`` (a DeepSpeed engine, or a plain model on every rank) on ``dataset``
    (keys without prefix, plus ``loss``), the same on every rank: ``family`` batches the examples, gives
    their logits and scores them. Each rank computes the logits of its ``eval_shard``; every example counts
    exactly once."""
    logits = sharded_logits(engine, dataset, family, batch_size, env)
    return family.scores(logits, torch.as_tensor(dataset["labels"]))


@torch.no_grad()
def evaluate_loss(
    engine: DeepSpeedEngine | nn.Module, dataset: datasets.Dataset, family: ScoredFamily, batch_size: int, env: DistEnv
) -> float:
    """The mean per-example task loss (``family.loss``, the training objective without consistency) of ``engine``
    on ``dataset``, the same on every rank; sharded like ``evaluate_logits``, each example counted once. For
    any family, text generation included: what a held-out selection scores."""
    was_training = getattr(engine, "module", engine).training
    engine.eval()
    own, padded = eval_shard(len(dataset), env)
    loader = _shard_loader(dataset, padded, family, batch_size, engine.device)
    losses = []
    for batch in loader:
        batch = to_device(batch, engine.device)
        logits = family.logits(engine, {key: value for key, value in batch.items() if key != "labels"})
        # Per example (family.loss is a mean over a batch), kept on the device: one copy to the host at the end.
        losses += [family.loss(logits[i : i + 1], batch["labels"][i : i + 1]) for i in range(len(logits))]
    engine.train(was_training)
    shards = gather_shards(torch.stack(losses[: len(own)]).double().cpu().tolist() if own else [], env)
    return sum(sum(shard) for shard in shards) / len(dataset)
