"""Task families: what differs between kinds of tasks (model class, batches, logits, scoring); see ``base``.

``build_family`` picks one from the launcher's flags, or from an adapter's task record (``task.json``).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from adamix_ds.data import TaskSpec
from adamix_ds.families.base import TaskFamily
from adamix_ds.families.classification import SequenceClassification
from adamix_ds.families.prompt import LM_HEAD_TRAINING, PromptClassification, lm_kind

__all__ = [
    "LM_HEAD_TRAINING",
    "PromptClassification",
    "SequenceClassification",
    "TaskFamily",
    "build_family",
    "lm_kind",
    "record_arguments",
]


def build_family(
    spec: TaskSpec,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    model_path: str,
    prompt: bool = False,
    template: str | None = None,
    label_words: dict[str, str] | None = None,
    train_lm_head: str = "transform",
) -> TaskFamily:
    """Prompt-based classification with ``prompt`` (``template``, ``label_words``, ``train_lm_head``: see
    ``PromptClassification``), else sequence classification with a fresh head."""
    if prompt:
        return PromptClassification(spec, tokenizer, max_length, model_path, template, label_words, train_lm_head)
    return SequenceClassification(spec, tokenizer, max_length)


def record_arguments(record: dict[str, Any] | None) -> dict[str, Any]:
    """``build_family``'s keyword arguments from an adapter's task record (``None``: a classification adapter)."""
    if record is None:
        return {"prompt": False}
    if record.get("family") != PromptClassification.name:
        raise ValueError(f"task record family={record.get('family')!r} is unknown: allowed {PromptClassification.name!r}")
    return {
        "prompt": True,
        "template": record["template"],
        "label_words": record["label_words"],
        "train_lm_head": record.get("train_lm_head", "transform"),
    }
