"""Consistency regularisation: two stochastically routed passes pulled together by a symmetric KL."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from adamix_ds.model import adamix_layers


def consistency_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``0.5 * [KL(sg(p_b) || p_a) + KL(sg(p_a) || p_b)]`` in fp32 with ``batchmean``.

    ``logits_*`` are ``[..., C]``; every leading position is a row of the batch mean. ``mask`` (a boolean
    tensor of the leading shape) keeps only some rows, e.g. the target tokens of a language model.
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"logits shapes differ: {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}")
    log_p_a = F.log_softmax(logits_a.float(), dim=-1)
    log_p_b = F.log_softmax(logits_b.float(), dim=-1)
    # Per row: the two KL terms summed over classes; batchmean is then the mean over the kept rows.
    kl_to_a = F.kl_div(log_p_a, log_p_b.detach(), log_target=True, reduction="none").sum(-1)
    kl_to_b = F.kl_div(log_p_b, log_p_a.detach(), log_target=True, reduction="none").sum(-1)
    rows = 0.5 * (kl_to_a + kl_to_b)
    if mask is None:
        return rows.mean() if rows.numel() else rows.sum()
    # Weighted by the mask rather than indexed with it: boolean indexing waits for the device to count the rows.
    weights = mask.to(rows.dtype)
    return (rows * weights).sum() / weights.sum().clamp_min(1.0)


@dataclass
class AdaMixLoss:
    """What one AdaMix training step optimises, and its parts (for logging)."""

    loss: torch.Tensor
    task_loss: torch.Tensor
    consistency_loss: torch.Tensor
    logits: torch.Tensor


class Objective(Protocol):
    """Which logits a task compares and how it scores them, when that is not the model's own ``loss`` and
    ``logits`` (prompt-based classification: the LM head's logits of the label words at the mask; generation:
    a label-smoothed token loss)."""

    def logits(self, model: Callable[..., object], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[B, C]`` logits of the batch ``inputs`` (no labels) through ``model``, or a language model's
        ``[B, T, V]`` (compared at the target tokens of ``labels``, as without an objective)."""
        ...

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The task loss of ``logits`` against ``labels``."""
        ...


@contextlib.contextmanager
def stacked_passes(model: nn.Module, passes: int) -> Iterator[None]:
    """Inside the block, one training forward of ``passes`` stacked copies of a batch is ``passes``
    routed passes: every AdaMix layer routes each batch chunk separately, consuming the same routing
    stream as that many consecutive forwards."""
    layers = [layer for _, layer in adamix_layers(model)]
    for layer in layers:
        layer.passes = passes
    try:
        yield
    finally:
        for layer in layers:
            layer.passes = 1


def adamix_loss(
    model: Callable[..., object], batch: Mapping[str, torch.Tensor], consistency_weight: float, objective: Objective | None = None
) -> AdaMixLoss:
    """Run the AdaMix training passes on ``batch`` and return task loss + weighted consistency loss.

    ``model`` is a Hugging Face model (or a DeepSpeed engine around one) whose output has ``loss`` and
    ``logits``; every tensor of ``batch`` is batch-first. The two passes, each with its own routing and
    dropout, run as one forward over the batch stacked twice: the same routes as two sequential passes,
    but one larger matrix product per backbone weight instead of two. The task loss is pass 1's (pass 2's
    labels are ignored with -100). A single pass runs when the term cannot matter:
    ``consistency_weight == 0`` or float labels (regression: a one-logit softmax is constant). For 3-D
    logits with ``labels`` (causal LM), the KL is taken at target tokens only, aligned with the model's
    shifted loss. With an ``objective``, its ``logits`` of the stacked batch are compared and its ``loss``
    of pass 1 is the task loss; the second pass then also runs for float labels (a regression task scored
    through several logits, as prompt-based STS-B is).
    """
    if objective is not None:
        return _objective_loss(model, batch, consistency_weight, objective)
    labels = batch.get("labels")
    if consistency_weight == 0 or (labels is not None and labels.is_floating_point()):
        out = model(**batch)
        return AdaMixLoss(out.loss, out.loss.detach(), out.loss.new_zeros(()), out.logits)
    stacked = {key: torch.cat([value, value]) for key, value in batch.items()}
    if labels is not None:
        stacked["labels"] = torch.cat([labels, torch.full_like(labels, -100)])
    with stacked_passes(getattr(model, "module", model), 2):
        out = model(**stacked)
    first, second = out.logits.chunk(2)
    consistency = _token_consistency(first, second, labels)
    return AdaMixLoss(out.loss + consistency_weight * consistency, out.loss.detach(), consistency.detach(), first)


def _token_consistency(first: torch.Tensor, second: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """``consistency_loss`` of two passes' logits; for a language model's ``[B, T, V]`` logits with ``labels``,
    at target tokens only (position t predicts label t + 1, as the shifted loss; -100 marks the rest)."""
    if first.dim() == 3 and labels is not None:
        return consistency_loss(first[:, :-1], second[:, :-1], labels[:, 1:] != -100)
    return consistency_loss(first, second)


def _objective_loss(
    model: Callable[..., object], batch: Mapping[str, torch.Tensor], consistency_weight: float, objective: Objective
) -> AdaMixLoss:
    labels = batch["labels"]
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    if consistency_weight == 0:
        logits = objective.logits(model, inputs)
        loss = objective.loss(logits, labels)
        return AdaMixLoss(loss, loss.detach(), loss.new_zeros(()), logits)
    stacked = {key: torch.cat([value, value]) for key, value in inputs.items()}
    with stacked_passes(getattr(model, "module", model), 2):
        logits = objective.logits(model, stacked)
    first, second = logits.chunk(2)
    task_loss = objective.loss(first, labels)
    consistency = _token_consistency(first, second, labels)
    return AdaMixLoss(task_loss + consistency_weight * consistency, task_loss.detach(), consistency.detach(), first)
