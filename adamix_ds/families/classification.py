"""Sequence classification: a fresh classification head on the backbone (``run_glue.py``'s setting)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForSequenceClassification

from adamix_ds.consistency import AdaMixLoss, adamix_loss
from adamix_ds.data import compute_metrics, make_collator
from adamix_ds.families.base import Batch, TaskFamily, backbone_dropout

__all__ = ["SequenceClassification"]


class SequenceClassification(TaskFamily):
    """``AutoModelForSequenceClassification`` with ``spec.num_labels`` outputs (one for STS-B regression),
    trained with the model's own loss (cross-entropy, MSE for regression)."""

    name = "classification"

    def load_model(self, model_path: str, dropout: float | None = None) -> nn.Module:
        # The class names in the model's config: saved adapters record them, exported checkpoints carry them.
        labels = {} if self.spec.is_regression else {"id2label": dict(enumerate(self.spec.label_names))}
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=self.spec.num_labels, **labels, **backbone_dropout(model_path, dropout)
        )
        if model.config.pad_token_id is None:  # decoder classifiers find each row's last token by the pad id
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        return make_collator(self.tokenizer)

    def logits(self, model: Callable[..., Any], inputs: Batch) -> torch.Tensor:
        return model(**inputs).logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.spec.is_regression:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return F.cross_entropy(logits.float(), labels.long(), label_smoothing=self.label_smoothing)

    def train_loss(self, model: Callable[..., Any], batch: Batch, consistency_weight: float) -> AdaMixLoss:
        # The model's own loss (its problem type decides it), and one pass for regression: a one-logit
        # softmax is constant, so the consistency term cannot matter. The model's loss has no label smoothing.
        if self.label_smoothing > 0 and not self.spec.is_regression:
            return adamix_loss(model, batch, consistency_weight, objective=self)
        return adamix_loss(model, batch, consistency_weight)

    def scores(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return {**compute_metrics(self.spec.name, logits.numpy(), labels.numpy()), "loss": float(self.loss(logits, labels))}
