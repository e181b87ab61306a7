"""Consistency regularisation: two stochastically routed passes pulled together by a symmetric KL."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def consistency_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``0.5 * [KL(sg(p_b) || p_a) + KL(sg(p_a) || p_b)]`` in fp32 with ``batchmean``.

    ``logits_*`` are ``[..., C]``; every leading position is a row of the batch mean. ``mask`` (a boolean
    tensor of the leading shape) keeps only some rows, e.g. the target tokens of a language model.
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"logits shapes differ: {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}")
    log_p_a = F.log_softmax(logits_a.float(), dim=-1)
    log_p_b = F.log_softmax(logits_b.float(), dim=-1)
    if mask is not None:
        log_p_a, log_p_b = log_p_a[mask], log_p_b[mask]
    log_p_a = log_p_a.reshape(-1, log_p_a.shape[-1])
    log_p_b = log_p_b.reshape(-1, log_p_b.shape[-1])
    if log_p_a.shape[0] == 0:
        return log_p_a.sum() * 0.0
    kl_to_a = F.kl_div(log_p_a, log_p_b.detach(), log_target=True, reduction="batchmean")
    kl_to_b = F.kl_div(log_p_b, log_p_a.detach(), log_target=True, reduction="batchmean")
    return 0.5 * (kl_to_a + kl_to_b)


@dataclass
class AdaMixLoss:
    """What one AdaMix training step optimises, and its parts (for logging)."""

    loss: torch.Tensor
    task_loss: torch.Tensor
    consistency_loss: torch.Tensor
    logits: torch.Tensor


def adamix_loss(model: Callable[..., object], batch: Mapping[str, torch.Tensor], consistency_weight: float) -> AdaMixLoss:
    """Run the AdaMix training passes on ``batch`` and return task loss + weighted consistency loss.

    ``model`` is a Hugging Face model (or a DeepSpeed engine around one) whose output has ``loss`` and
    ``logits``. Pass 1 gives the task loss; pass 2, with its own routing and dropout, is made only when
    the consistency term can be non-zero (``consistency_weight > 0`` and more than one logit: a
    regression head's one-logit softmax is constant). For 3-D logits with ``labels`` (causal LM), the KL
    is taken at target tokens only, aligned with the model's shifted loss.
    """
    first = model(**batch)
    zero = first.loss.new_zeros(())
    if consistency_weight == 0 or first.logits.shape[-1] == 1:
        return AdaMixLoss(first.loss, first.loss.detach(), zero, first.logits)
    second = model(**batch)
    logits_a, logits_b, mask = first.logits, second.logits, None
    if logits_a.dim() == 3 and "labels" in batch:
        logits_a, logits_b = logits_a[:, :-1], logits_b[:, :-1]
        mask = batch["labels"][:, 1:] != -100
    consistency = consistency_loss(logits_a, logits_b, mask)
    return AdaMixLoss(first.loss + consistency_weight * consistency, first.loss.detach(), consistency.detach(), first.logits)
