"""The merges of ``adamix_ds.merging`` on a run's data: the held-out slice a greedy soup selects on, the training
batches a Fisher merge estimates on, and the record of what each merge chose.

The held-out slice (``--holdout_samples N``) is the last ``N`` examples of the training set, removed before
training: a soup never selects on data it trained on or on the split it is scored on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.utils.data import DataLoader, Subset

from adamix_ds.data import TaskData
from adamix_ds.distributed import DistEnv, broadcast
from adamix_ds.evaluation import evaluate_loss, to_device
from adamix_ds.merging import Coefficients, expert_scores, fisher_coefficients, fisher_diagonals, greedy_soup, soup_coefficients

if TYPE_CHECKING:
    import datasets
    from deepspeed import DeepSpeedEngine

    from adamix_ds.families import TaskFamily

MERGE_MODES = ("greedy_soup", "fisher", "best_expert")  # evaluation modes beside adamix_ds.config.EVAL_MODES
HELD_OUT_MERGES = ("greedy_soup", "best_expert")  # the merges that select on --holdout_samples


def hold_out(data: TaskData, count: int | None) -> tuple[TaskData, datasets.Dataset | None]:
    """``data`` without the last ``count`` training examples, and those examples (``None`` when ``count`` is)."""
    if count is None:
        return data, None
    size = len(data.train)
    if not 1 <= count < size:
        raise ValueError(f"holdout_samples={count} is invalid: allowed 1..{size - 1} (the training set has {size} examples)")
    return dataclasses.replace(data, train=data.train.select(range(size - count))), data.train.select(range(size - count, size))


def selection_split(count: int) -> str:
    """How a soup's selection split is named in the outputs."""
    return f"holdout: the last {count} training examples, removed before training"


def compute_merges(
    names: Sequence[str],
    engine: DeepSpeedEngine | nn.Module,
    family: TaskFamily,
    train: datasets.Dataset,
    holdout: datasets.Dataset | None,
    batch_size: int,
    env: DistEnv,
    fisher_batches: int,
) -> dict[str, tuple[Coefficients, dict[str, Any]]]:
    """Per merge of ``names`` (each one of ``MERGE_MODES``): its coefficients for ``engine``'s experts and a record of
    what it chose (JSON). The greedy soup and the best expert score the negative task loss on ``holdout``, each
    expert scored once for both; Fisher uses the first ``fisher_batches`` batches of ``batch_size`` examples of
    ``train`` (the same on every rank)."""
    bad = [name for name in names if name not in MERGE_MODES]
    if bad:
        raise ValueError(f"merge={bad[0]!r} is invalid: allowed {', '.join(MERGE_MODES)}")
    model = getattr(engine, "module", engine)
    merges: dict[str, tuple[Coefficients, dict[str, Any]]] = {}
    selecting = [name for name in names if name in HELD_OUT_MERGES]
    if selecting:
        if holdout is None:
            raise ValueError(f"{selecting[0]} needs a held-out split: train with --holdout_samples N")
        selection = {"selection_split": selection_split(len(holdout)), "selected_by": "negative task loss"}

        def score() -> float:
            return -evaluate_loss(engine, holdout, family, batch_size, env)

        scores = expert_scores(model, score)
        if "best_expert" in selecting:
            best = scores.index(max(scores))  # ties: the lower index
            merges["best_expert"] = (
                soup_coefficients(model, [best]),
                {**selection, "expert_scores": scores, "chosen": [best], "score": scores[best]},
            )
        if "greedy_soup" in selecting:
            soup = greedy_soup(model, score, scores)
            merges["greedy_soup"] = soup.coefficients, {**selection, **soup.summary()}
    if "fisher" in names:
        if fisher_batches < 1:
            raise ValueError(f"fisher_batches={fisher_batches} is invalid: allowed an integer >= 1")
        count = min(len(train), fisher_batches * batch_size)
        loader = DataLoader(Subset(train, range(count)), batch_size=batch_size, collate_fn=family.collator())
        batches = [to_device(batch, model.device) for batch in loader]

        def loss(module: nn.Module, batch: dict) -> Any:
            return family.loss(family.logits(module, {k: v for k, v in batch.items() if k != "labels"}), batch["labels"])

        fisher = fisher_diagonals(model, batches, loss)
        if env.world_size > 1:
            # Each rank summed the same batches, but reductions on GPUs need not agree to the bit: every rank
            # merges with rank 0's estimate, the one that rank 0 saves.
            for values in (v for entries in fisher.values() for v in entries if v is not None):
                broadcast(values, model.device)
        merges["fisher"] = fisher_coefficients(fisher), {"fisher_batches": len(batches), "batch_size": batch_size, "examples": count}
    return merges
