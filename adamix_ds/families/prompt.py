"""Prompt-based classification (LM-BFF, LiST): the pretrained LM head predicts a label word at the template's slot.

Masked LMs (BERT, RoBERTa, DeBERTa-v2 ``*ForMaskedLM``) score the label words with the MLM head's logits at
the mask token; causal LMs (GPT-2, the Llama family) with the next-token logits after the input, which
ends where the mask was (``adamix_ds.prompts``). Classification: cross-entropy over the label words' logits,
prediction their argmax. Regression (STS-B): the two pole words (No/Yes), target ``[1 - y/5, y/5]``, loss
``KL(target || p)``, prediction ``5 * p(Yes)``. LM-BFF computes that KL with ``log_target=True`` on a target
that is a probability, not its log, which is not the KL of the two distributions; this is the paper's intent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from adamix_ds.data import TaskSpec, compute_metrics
from adamix_ds.data.glue import Encoder
from adamix_ds.families.base import Batch, TaskFamily, backbone_dropout
from adamix_ds.prompts import PromptEncoder, label_word_ids, prompt_setup

__all__ = ["LM_HEAD_TRAINING", "PromptClassification", "load_language_model", "lm_kind"]

# What of the pretrained LM head trains (``--train_lm_head``): ``transform`` — every head parameter but the
# vocabulary matrix: an MLM head's dense + LayerNorm + output bias, as LiST trains; a causal LM's head is
# the vocabulary matrix alone, so nothing. ``none``. ``all`` — also the vocabulary matrix, tied to the
# input embeddings in most models: vocabulary x hidden parameters, not parameter-efficient.
LM_HEAD_TRAINING = ("transform", "none", "all")
# STS-B scores lie in [0, 5]: the label-word distribution's high pole is y / 5.
REGRESSION_RANGE = 5.0


def lm_kind(config: PretrainedConfig, model_path: str) -> str:
    """``"masked"`` or ``"causal"``: which LM head the checkpoint at ``model_path`` (its ``config``) has: its
    architectures, else its model type; ``ValueError`` for a model type without one in transformers."""
    architectures = config.architectures or []
    if any(name.endswith("ForMaskedLM") for name in architectures):
        return "masked"
    if any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
        return "causal"
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "masked"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise ValueError(
        f"model_name_or_path={model_path} (model_type={config.model_type!r}) has no LM head in transformers: "
        "--prompt needs a masked LM (BERT, RoBERTa, DeBERTa-v2) or a causal LM (GPT-2, Llama)"
    )


def _as_modules(model: nn.Module, names: list[str]) -> list[str]:
    """``names`` (parameters) with every module whose parameters are all listed named once instead (the
    MLM transform), as ``modules_to_save`` usually reads; parameters outside such a module stay (the output bias)."""
    remaining, modules = set(names), []
    for module_name, module in model.named_modules():  # parents before their children: the largest module first
        params = {f"{module_name}.{name}" for name, _ in module.named_parameters()}
        if module_name and params and params <= remaining:
            modules.append(module_name)
            remaining -= params
    return modules + [name for name in names if name in remaining]


def _drop_frozen_aliases(model: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]) -> None:
    """Leave frozen tied weights out of the state dict under their second name too (``lm_head.weight`` is
    the input embedding matrix): DeepSpeed's ``exclude_frozen_parameters`` knows each parameter by its first
    name only, and would otherwise write the vocabulary matrix into every checkpoint."""
    first = {name for name, _ in model.named_parameters()}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name not in first and not param.requires_grad:
            state_dict.pop(prefix + name, None)


def load_language_model(model_path: str, auto: type, dropout: float | None = None) -> nn.Module:
    """The checkpoint at ``model_path`` through ``auto`` (``AutoModelForCausalLM``/``AutoModelForMaskedLM``) with
    its pretrained LM head; ``ValueError`` when the head is not in the checkpoint (it would be random). Frozen
    tied weights stay out of its state dict under their second name. ``dropout``: see ``backbone_dropout``."""
    model, info = auto.from_pretrained(model_path, output_loading_info=True, **backbone_dropout(model_path, dropout))
    prefix = model.base_model_prefix + "."
    missing = [key for key in info["missing_keys"] if not key.startswith(prefix)]
    if missing:  # a randomly initialised head would predict noise
        raise ValueError(
            f"model_name_or_path={model_path} has no pretrained LM head ({', '.join(missing[:3])} missing): "
            "use a *ForMaskedLM or causal-LM checkpoint"
        )
    model.register_state_dict_post_hook(_drop_frozen_aliases)
    return model


class PromptClassification(TaskFamily):
    """Prompt-based fine-tuning through the pretrained LM head: no new classifier.

    ``template`` and ``label_words`` default to the task's built-in LM-BFF prompt; ``train_lm_head`` is one
    of ``LM_HEAD_TRAINING``. ``ValueError`` names a bad template, label-word map or label word.
    """

    name = "prompt"

    def __init__(
        self,
        spec: TaskSpec,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        model_path: str,
        template: str | None = None,
        label_words: dict[str, str] | None = None,
        train_lm_head: str = "transform",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(spec, tokenizer, max_length, label_smoothing)
        if train_lm_head not in LM_HEAD_TRAINING:
            raise ValueError(f"train_lm_head={train_lm_head!r} is invalid: allowed {', '.join(LM_HEAD_TRAINING)}")
        self.kind = lm_kind(AutoConfig.from_pretrained(model_path), model_path)
        self.template, self.words = prompt_setup(spec, template, label_words)
        self.word_ids = label_word_ids(self.words, tokenizer)
        self._word_index: torch.Tensor | None = None  # word_ids on the model's device, made once
        self.prompt = PromptEncoder(self.template, tokenizer, causal=self.kind == "causal", max_length=max_length)
        self.train_lm_head = train_lm_head

    def load_model(self, model_path: str, dropout: float | None = None) -> nn.Module:
        return load_language_model(model_path, AutoModelForCausalLM if self.kind == "causal" else AutoModelForMaskedLM, dropout)

    def head_modules(self, model: nn.Module) -> list[str]:
        if self.train_lm_head == "none":
            return []
        vocabulary = model.get_output_embeddings().weight
        prefix = model.base_model_prefix + "."
        names = [name for name, param in model.named_parameters() if not name.startswith(prefix) and param is not vocabulary]
        if self.train_lm_head == "all":
            names += [name for name, param in model.named_parameters() if param is vocabulary]
        return _as_modules(model, names)

    def encoder(self) -> Encoder:
        columns = self.spec.text_columns

        def encode(batch: dict[str, list]) -> dict[str, list]:
            return self.prompt.batch([batch[column] for column in columns])

        return encode

    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        return self._collate

    def _collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        # A causal LM's inputs are padded on the left, so that the predicting position is the last one of
        # every row: the head then runs on that position only (logits_to_keep=1).
        left = self.kind == "causal"
        length = max(len(f["input_ids"]) for f in features)
        batch: dict[str, torch.Tensor] = {}
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key not in features[0]:
                continue
            fill = self.tokenizer.pad_token_id if key == "input_ids" else 0
            rows = [[fill] * (length - len(f[key])) + f[key] if left else f[key] + [fill] * (length - len(f[key])) for f in features]
            batch[key] = torch.tensor(rows)
        positions = [f["mask_position"] + (length - len(f["input_ids"]) if left else 0) for f in features]
        batch["mask_position"] = torch.tensor(positions)
        if "labels" in features[0]:  # unlabelled inputs (prediction) have none
            dtype = torch.float32 if self.spec.is_regression else torch.long
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=dtype)
        return batch

    def logits(self, model: Callable[..., Any], inputs: Batch) -> torch.Tensor:
        inputs = dict(inputs)
        positions = inputs.pop("mask_position")
        if self.kind == "causal":
            mask = inputs["attention_mask"]
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens
            vocabulary = model(**inputs, logits_to_keep=1).logits[:, -1]
        else:
            logits = model(**inputs).logits
            vocabulary = logits[torch.arange(logits.shape[0], device=logits.device), positions]
        if self._word_index is None or self._word_index.device != vocabulary.device:
            self._word_index = torch.tensor(self.word_ids, device=vocabulary.device)
        return vocabulary.index_select(-1, self._word_index)

    def _target(self, labels: torch.Tensor) -> torch.Tensor:
        high = labels.float() / REGRESSION_RANGE
        return torch.stack([1 - high, high], dim=-1)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.spec.is_regression:
            return F.kl_div(F.log_softmax(logits.float(), dim=-1), self._target(labels), reduction="batchmean")
        return F.cross_entropy(logits.float(), labels.long(), label_smoothing=self.label_smoothing)

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """Label-word logits unchanged; for regression ``5 * p(high pole)``."""
        if self.spec.is_regression:
            return REGRESSION_RANGE * F.softmax(logits.float(), dim=-1)[:, 1]
        return logits

    def scores(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        metrics = compute_metrics(self.spec.name, self.predictions(logits).numpy(), labels.numpy())
        return {**metrics, "loss": float(self.loss(logits, labels))}

    def record(self) -> dict[str, Any]:
        label_keys = ("0", "1") if self.spec.is_regression else self.spec.file_labels
        return {
            **super().record(),
            "template": self.template.source,
            "label_words": dict(zip(label_keys, self.words, strict=True)),
            "lm": self.kind,
            "train_lm_head": self.train_lm_head,
        }
