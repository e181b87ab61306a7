"""The seam between the launcher and a kind of task: ``TaskFamily``.

A family owns what differs between kinds of tasks — its model class, how its data is read and examples become
batches, which logits the consistency loss compares, how a split is evaluated (class logits scored, or text
decoded and scored) — and nothing else: the training loop,
DeepSpeed, checkpoints, routing, the optimizer guard and input checks are the launcher's and the same for
every family. ``launchers/train.py`` composes one; ``adamix_ds.families.build_family`` picks it from the flags.
"""

from __future__ import annotations

import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import datasets
import torch
from torch import nn
from transformers import AutoConfig, PreTrainedTokenizerBase

from adamix_ds.consistency import AdaMixLoss, adamix_loss
from adamix_ds.data import GenerationTaskSpec, TaskData, TaskSpec, load_task, tokenizer_encoder
from adamix_ds.data.glue import Encoder
from adamix_ds.distributed import DistEnv
from adamix_ds.evaluation import evaluate_logits, sharded_logits

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


__all__ = ["TaskFamily", "backbone_dropout"]

Batch = Mapping[str, torch.Tensor]
logger = logging.getLogger(__name__)
# Config fields holding one of the backbone's dropout probabilities: GPT-2's attn_pdrop, resid_pdrop, embd_pdrop;
# BERT's hidden_dropout_prob, attention_probs_dropout_prob; Llama's attention_dropout; DeBERTa's pooler_dropout.
_DROPOUT_FIELD = re.compile(r"dropout|pdrop")


def backbone_dropout(model_path: str, probability: float | None) -> dict[str, float]:
    """``from_pretrained`` keyword arguments that set every dropout probability in ``model_path``'s config to
    ``probability`` (``{}`` for ``None``: the checkpoint's own). The model builds its dropout from the config,
    so this reaches functional dropout too. Logs each change, or that there was none to make."""
    if probability is None:
        return {}
    if not 0 <= probability < 1:
        raise ValueError(f"backbone_dropout={probability} is invalid: allowed 0 <= backbone_dropout < 1")
    config = AutoConfig.from_pretrained(model_path)
    fields = {
        name: value
        for name, value in config.to_dict().items()
        if _DROPOUT_FIELD.search(name) and isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    changed = [f"{name} {value:g} -> {probability:g}" for name, value in fields.items() if value != probability]
    if changed:
        logger.info("backbone dropout: %s", ", ".join(changed))
    else:
        already = ", ".join(f"{name}={value:g}" for name, value in fields.items()) or "its config has no dropout probability"
        logger.info("backbone dropout %g: nothing to change in %s (%s)", probability, config.model_type, already)
    return dict.fromkeys(fields, float(probability))


class TaskFamily(ABC):
    """One kind of task (sequence classification, prompt-based classification, generation) on one task ``spec``.

    ``logits`` and ``loss`` make it an ``adamix_ds.consistency.Objective``: ``train_loss`` runs the AdaMix
    passes through them; ``evaluate`` scores a split (by default ``scores`` of all ``logits``).
    """

    name: ClassVar[str]

    def __init__(
        self, spec: TaskSpec | GenerationTaskSpec, tokenizer: PreTrainedTokenizerBase, max_length: int, label_smoothing: float = 0.0
    ) -> None:
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing_factor={label_smoothing} is invalid: allowed 0 <= label_smoothing_factor < 1")
        self.spec = spec
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.label_smoothing = label_smoothing  # of the task's cross-entropy (transformers' label_smoothing_factor)
        if tokenizer.pad_token is None:  # GPT-2 and Llama tokenizers have none; padding is masked out anyway
            tokenizer.pad_token = tokenizer.eos_token

    @abstractmethod
    def load_model(self, model_path: str, dropout: float | None = None) -> nn.Module:
        """The pretrained model with this family's head; ``ValueError`` when ``model_path`` cannot serve it.
        ``dropout`` replaces every dropout probability of the backbone (``backbone_dropout``)."""

    def head_modules(self, model: nn.Module) -> list[str] | None:
        """``AdaMixConfig.modules_to_save`` for ``model``: what trains besides the adapters (``None``: the
        architecture's task head)."""
        return None

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The metrics ``evaluate`` reports (keys without prefix), the task's main metric first."""
        return self.spec.metric_names

    def encoder(self) -> Encoder | None:
        """How raw text columns become model inputs (``load_task``'s ``encoder``); ``None``: the tokenizer's own."""
        return None

    def load_data(
        self, data_dir: str | os.PathLike[str] | None, max_train_samples: int | None = None, max_eval_samples: int | None = None
    ) -> TaskData:
        """The task's training and evaluation splits, encoded for this family (``data_dir``: see ``load_task``;
        ``None``: the Hub). ``ValueError``/``FileNotFoundError`` name a malformed or missing file."""
        return load_task(
            self.spec.name,
            self.tokenizer,
            max_seq_length=self.max_length,
            data_dir=data_dir,
            max_train_samples=max_train_samples,
            max_eval_samples=max_eval_samples,
            encoder=self.encoder(),
        )

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

    def scores(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """The task's metrics of all ``logits`` of a split, plus ``loss``, keyed without prefix (what the
        default ``evaluate`` reports; a family that evaluates otherwise need not score logits)."""
        raise NotImplementedError(f"{type(self).__name__} does not score logits")

    def evaluate(
        self,
        engine: DeepSpeedEngine | nn.Module,
        dataset: datasets.Dataset,
        batch_size: int,
        env: DistEnv,
        predictions: Path | None = None,
    ) -> dict[str, float]:
        """The metrics of ``engine`` on ``dataset`` (keys without prefix), the same on every rank; every rank
        calls it. ``predictions`` (a path without suffix) is where a family that produces text writes it;
        the default scores ``logits`` and writes nothing."""
        return evaluate_logits(engine, dataset, self, batch_size, env)

    def record(self) -> dict[str, Any]:
        """What an adapter must remember to read inputs the same way later (saved as its ``task.json``): the family,
        the task and its sequence length; a family adds what else decides its inputs (a template, a separator)."""
        return {
            "family": self.name,
            "task_name": self.spec.name,
            "max_seq_length": self.max_length,
            "text_columns": list(self.input_columns),
            "dataset": self.spec.hub_dataset,
        }

    # -- prediction on unlabelled inputs ------------------------------------------------------------
    @property
    def input_columns(self) -> tuple[str, ...]:
        """The text columns an input row needs (``encode_inputs``): the task's text columns."""
        return self.spec.text_columns

    def encode_inputs(self, rows: datasets.Dataset) -> datasets.Dataset:
        """``rows`` (``input_columns`` as text, any labels ignored) encoded as this family reads inputs, in order."""
        encoder = self.encoder() or tokenizer_encoder(self.spec, self.tokenizer, self.max_length)
        return rows.select_columns(list(self.input_columns)).map(encoder, batched=True, remove_columns=list(self.input_columns))

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """What ``logits`` predict: class logits unchanged, a regression task's ``[B]`` scores."""
        return logits[:, 0] if self.spec.is_regression else logits

    def predict(
        self, model: DeepSpeedEngine | nn.Module, inputs: datasets.Dataset, batch_size: int, env: DistEnv, progress: bool = False
    ) -> list[dict[str, Any]]:
        """One result per row of ``inputs`` (``encode_inputs``' output), in order, on every rank; every rank calls
        it and predicts its shard. Classification: ``prediction`` (the class id), ``label`` (its name) and
        ``probabilities`` (class name -> probability); regression: ``prediction`` (the score)."""
        logits = sharded_logits(model, inputs, self, batch_size, env, progress)
        values = self.predictions(logits)
        if self.spec.is_regression:
            return [{"prediction": float(value)} for value in values]
        probabilities = torch.softmax(values, dim=-1)
        names = self.spec.label_names
        return [
            {
                "prediction": int(row.argmax()),
                "label": names[int(row.argmax())],
                "probabilities": {name: float(p) for name, p in zip(names, row, strict=True)},
            }
            for row in probabilities
        ]
