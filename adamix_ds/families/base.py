"""The seam between the launcher and a kind of task: ``TaskFamily``.

A family owns what differs between kinds of tasks — its model class, how examples become batches, which
logits the consistency loss compares, how predictions are scored — and nothing else: the training loop,
DeepSpeed, checkpoints, routing, the optimizer guard and input checks are the launcher's and the same for
every family. ``launchers/train.py`` composes one; ``adamix_ds.families.build_family`` picks it from the flags.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from adamix_ds.consistency import AdaMixLoss, adamix_loss
from adamix_ds.data import TaskSpec
from adamix_ds.data.glue import Encoder

__all__ = ["TaskFamily"]

Batch = Mapping[str, torch.Tensor]


class TaskFamily(ABC):
    """One kind of task (sequence classification, prompt-based classification, ...) on one task ``spec``.

    ``logits`` and ``loss`` make it an ``adamix_ds.consistency.Objective``: ``train_loss`` runs the AdaMix
    passes through them, and evaluation scores ``logits`` with ``scores``.
    """

    name: ClassVar[str]

    def __init__(self, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.max_length = max_length
        if tokenizer.pad_token is None:  # GPT-2 and Llama tokenizers have none; padding is masked out anyway
            tokenizer.pad_token = tokenizer.eos_token

    @abstractmethod
    def load_model(self, model_path: str) -> nn.Module:
        """The pretrained model with this family's head; ``ValueError`` when ``model_path`` cannot serve it."""

    def head_modules(self, model: nn.Module) -> list[str] | None:
        """``AdaMixConfig.modules_to_save`` for ``model``: what trains besides the adapters (``None``: the
        architecture's task head)."""
        return None

    def encoder(self) -> Encoder | None:
        """How raw text columns become model inputs (``load_task``'s ``encoder``); ``None``: the tokenizer's own."""
        return None

    @abstractmethod
    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """Turns encoded examples into a padded batch with ``labels``."""

    @abstractmethod
    def logits(self, model: Callable[..., Any], inputs: Batch) -> torch.Tensor:
        """``[B, C]`` class logits of ``inputs`` (a batch without labels): what consistency compares and evaluation scores."""

    @abstractmethod
    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The task loss of ``logits`` against ``labels``."""

    def train_loss(self, model: Callable[..., Any], batch: Batch, consistency_weight: float) -> AdaMixLoss:
        """The AdaMix training loss of ``batch`` (task loss + weighted consistency between two routed passes)."""
        return adamix_loss(model, batch, consistency_weight, objective=self)

    @abstractmethod
    def scores(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """The task's metrics of all ``logits`` of a split, plus ``loss``, keyed without prefix."""

    def record(self) -> dict[str, Any] | None:
        """What an adapter must remember to read inputs the same way later (saved as its ``task.json``)."""
        return None
