"""Task families: what differs between kinds of tasks (model class, data, batches, logits, evaluation); see ``base``.

``build_family`` picks one from the task and the launcher's flags, or from an adapter's task record (``task.json``).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from adamix_ds.data import GenerationTaskSpec, TaskSpec
from adamix_ds.families.base import TaskFamily
from adamix_ds.families.classification import SequenceClassification
from adamix_ds.families.generation import SEPARATOR, CausalLMGeneration, Decoding
from adamix_ds.families.prompt import LM_HEAD_TRAINING, PromptClassification, lm_kind

__all__ = [
    "LM_HEAD_TRAINING",
    "CausalLMGeneration",
    "Decoding",
    "PromptClassification",
    "SequenceClassification",
    "TaskFamily",
    "build_family",
    "lm_kind",
    "record_arguments",
]


def build_family(
    spec: TaskSpec | GenerationTaskSpec,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    model_path: str,
    prompt: bool = False,
    template: str | None = None,
    label_words: dict[str, str] | None = None,
    train_lm_head: str = "transform",
    decoding: Decoding | None = None,
    label_smoothing: float = 0.0,
) -> TaskFamily:
    """The family of ``spec``: generation for a generation task (``decoding``: its beam search, default the
    paper's); for a classification task prompt-based classification with ``prompt`` (``template``,
    ``label_words``, ``train_lm_head``: see ``PromptClassification``), else sequence classification with a
    fresh head. ``label_smoothing`` applies to the task's cross-entropy."""
    if isinstance(spec, GenerationTaskSpec):
        return CausalLMGeneration(spec, tokenizer, max_length, model_path, decoding or Decoding(), label_smoothing)
    if prompt:
        return PromptClassification(spec, tokenizer, max_length, model_path, template, label_words, train_lm_head, label_smoothing)
    return SequenceClassification(spec, tokenizer, max_length, label_smoothing)


def record_arguments(record: dict[str, Any] | None) -> dict[str, Any]:
    """``build_family``'s keyword arguments that an adapter's task record fixes (``None``: a classification
    adapter of a version that wrote no record); the rest (decoding, label smoothing) come from the flags."""
    family = SequenceClassification.name if record is None else record.get("family")
    if family == SequenceClassification.name:
        return {"prompt": False}
    if family == CausalLMGeneration.name:
        if record.get("separator") != SEPARATOR:  # the adapter learnt to continue after its own separator
            raise ValueError(f"task record separator={record.get('separator')!r} is not this version's {SEPARATOR!r}")
        return {}
    if family != PromptClassification.name:
        allowed = ", ".join(repr(f.name) for f in (SequenceClassification, PromptClassification, CausalLMGeneration))
        raise ValueError(f"task record family={family!r} is unknown: allowed {allowed}")
    return {
        "prompt": True,
        "template": record["template"],
        "label_words": record["label_words"],
        "train_lm_head": record.get("train_lm_head", "transform"),
    }
