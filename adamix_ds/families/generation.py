"""Causal-LM generation (the paper's E2E setting): a decoder continues a meaning representation with its text.

Training: input = MR, the separator `` ||``, then `` <reference>`` and EOS; the loss (optionally
label-smoothed) is taken on the reference tokens and EOS only, and AdaMix's consistency term is the
symmetric KL over the vocabulary at those same tokens (``adamix_loss`` masks the MR and the padding).

Evaluation decodes every distinct MR of a split once with beam search and scores the hypotheses against all of
the MR's references with the five E2E metrics (``adamix_ds.data.generation_metrics``). Decoding is
transformers' ``generate`` with the paper's settings (``Decoding``): beam search, its length normalisation
``sum log p / generated_length ** length_penalty``, EOS ends a beam, and no n-gram repeated within the
generated tokens: transformers' own ``no_repeat_ngram_size`` also counts the prompt's n-grams, which would
forbid copying a restaurant name from the MR, so the same processor runs on the generated tokens only (as the
LoRA/AdaMix GPT-2 decoder does). Ranks decode interleaved shards of the MRs; under ZeRO-3 they run their
forwards in lockstep (``synced_gpus``) because every forward gathers parameters collectively.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    PreTrainedTokenizerBase,
)

from adamix_ds.data import GenerationTaskSpec, TaskData
from adamix_ds.data.e2e import E2EGroup, group_pairs, read_e2e, read_e2e_pairs
from adamix_ds.data.generation_metrics import E2EScorer
from adamix_ds.distributed import DistEnv
from adamix_ds.evaluation import eval_shard, gather_shards
from adamix_ds.families.base import Batch, TaskFamily
from adamix_ds.families.prompt import lm_kind, load_language_model
from adamix_ds.io import write_atomically

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


__all__ = ["CausalLMGeneration", "Decoding", "GeneratedNoRepeatNGram"]

logger = logging.getLogger(__name__)

# Between the MR and its text: what the model learns to continue after (the LoRA code's E2E format, the named
# generation tasks' ``separator``).
SEPARATOR = GenerationTaskSpec.separator


@dataclass(frozen=True)
class Decoding:
    """Beam-search settings, named as ``generate`` names them; the defaults are the paper's E2E decoding."""

    num_beams: int = 10
    length_penalty: float = 0.8
    no_repeat_ngram_size: int = 4
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        for name in ("num_beams", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: allowed an integer >= 1")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size={self.no_repeat_ngram_size} is invalid: allowed an integer >= 0 (0: off)")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty={self.length_penalty} is invalid: allowed a finite number")


class GeneratedNoRepeatNGram(NoRepeatNGramLogitsProcessor):
    """``NoRepeatNGramLogitsProcessor`` over the tokens generated after a (left-padded) prompt of
    ``prompt_length`` tokens: an n-gram of the prompt may be generated once."""

    def __init__(self, ngram_size: int, prompt_length: int) -> None:
        super().__init__(ngram_size)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return super().__call__(input_ids[:, self.prompt_length :], scores)


def _one_line(text: str) -> str:
    """A hypothesis as one line of a predictions file."""
    return " ".join(text.split())


class CausalLMGeneration(TaskFamily):
    """A pretrained causal LM (GPT-2, the Llama family) fine-tuned to write a task's text from its MR.

    ``decoding`` sets the beam search of evaluation; ``label_smoothing`` the token loss. ``ValueError`` names a
    model that is not a causal LM, or decoding settings the model cannot hold.
    """

    name = "generation"

    def __init__(
        self,
        spec: GenerationTaskSpec,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        model_path: str,
        decoding: Decoding,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(spec, tokenizer, max_length, label_smoothing)
        config = AutoConfig.from_pretrained(model_path)
        classifier = [name for name in config.architectures or [] if name.endswith("ForSequenceClassification")]
        kind = "classifier" if classifier else lm_kind(config, model_path)
        if kind != "causal":
            found = classifier[0] if classifier else f"a {kind} LM"
            raise ValueError(f"model_name_or_path={model_path} is {found}: task {spec.name} needs a causal LM (GPT-2, Llama family)")
        positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if positions is not None and max_length + decoding.max_new_tokens > positions:
            raise ValueError(
                f"max_seq_length={max_length} + max_new_tokens={decoding.max_new_tokens} is more than the {positions} positions "
                f"of {model_path}: allowed a sum <= {positions}"
            )
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of {model_path} has no EOS token: task {spec.name} ends every reference with it")
        self.decoding = decoding
        # One METEOR (Java) process for every evaluation of the run, started at the first; ended with the family.
        self.scorer = E2EScorer()
        weakref.finalize(self, self.scorer.close)

    @property
    def generation_config(self) -> GenerationConfig:
        """The decoding of ``evaluate``: deterministic beam search, nothing of the checkpoint's own defaults."""
        return GenerationConfig(
            do_sample=False,
            num_beams=self.decoding.num_beams,
            length_penalty=self.decoding.length_penalty,
            max_new_tokens=self.decoding.max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    def load_model(self, model_path: str, dropout: float | None = None) -> nn.Module:
        return load_language_model(model_path, AutoModelForCausalLM, dropout)

    def head_modules(self, model: nn.Module) -> list[str]:
        return []  # the LM head is the vocabulary matrix (tied to the input embeddings): it stays frozen

    # -- data -------------------------------------------------------------------------------------
    def load_data(
        self, data_dir: str | os.PathLike[str] | None, max_train_samples: int | None = None, max_eval_samples: int | None = None
    ) -> TaskData:
        """Training pairs and evaluation MRs from a folder (the challenge's CSV files or the LoRA code's
        ``mr || text`` lines, see ``GenerationTaskSpec``) or the Hub. A folder without a training file (the
        offline copy) trains on the dev set and evaluates on the test set, and says so."""
        for name, value in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if data_dir is None:
            train, evals = self._hub_splits()
        else:
            train, evals = self._folder_splits(Path(data_dir))
        if max_train_samples is not None:
            train = train[:max_train_samples]
        if max_eval_samples is not None:
            evals = {split: groups[:max_eval_samples] for split, groups in evals.items()}
        return TaskData(
            train=datasets.Dataset.from_list([self._encode_pair(mr, text) for mr, text in train]),
            eval={split: datasets.Dataset.from_list([self._encode_group(group) for group in groups]) for split, groups in evals.items()},
            spec=self.spec,
        )

    def prompt_completion(self, data_dir: str | os.PathLike[str] | None, max_train_samples: int | None = None) -> datasets.Dataset:
        """The training pairs as TRL's ``SFTTrainer`` takes them: ``prompt`` (the MR and the separator) and ``completion``
        (`` <reference>``; TRL appends EOS and masks the prompt), the tokens ``load_data`` trains on."""
        train, _ = self._hub_splits() if data_dir is None else self._folder_splits(Path(data_dir))
        rows = [{"prompt": mr + self.spec.separator, "completion": " " + text} for mr, text in train[:max_train_samples]]
        return datasets.Dataset.from_list(rows)

    def _folder_splits(self, folder: Path) -> tuple[list[tuple[str, str]], dict[str, list[E2EGroup]]]:
        if not folder.is_dir():
            raise FileNotFoundError(f"data_dir is not an existing folder: {folder}")

        def find(names: tuple[str, ...], required: bool) -> Path | None:
            path = next((folder / name for name in names if (folder / name).is_file()), None)
            if path is None and required:
                raise FileNotFoundError(f"data_dir={folder} has none of {', '.join(names)}")
            return path

        train_file, dev_file = find(self.spec.train_files, False), find(self.spec.dev_files, True)
        test_file = find(self.spec.test_files, True)
        if train_file is None:
            logger.warning(
                "%s: no training file in %s (%s): training on the dev set %s and evaluating on the test set %s",
                self.spec.name,
                folder,
                ", ".join(self.spec.train_files),
                dev_file.name,
                test_file.name,
            )
            return read_e2e_pairs(dev_file), {"test": read_e2e(test_file)}
        return read_e2e_pairs(train_file), {"validation": read_e2e(dev_file), "test": read_e2e(test_file)}

    def _hub_splits(self) -> tuple[list[tuple[str, str]], dict[str, list[E2EGroup]]]:
        try:
            hub = datasets.load_dataset(self.spec.hub_dataset)
        except Exception as error:  # offline: the Hub's many failure types, as one line
            raise ConnectionError(
                f"{self.spec.name}: cannot load {self.spec.hub_dataset} from the Hub ({error}); pass --data_dir"
            ) from None

        def pairs(split: str) -> list[tuple[str, str]]:
            rows = hub[split]
            return list(zip(rows["meaning_representation"], rows["human_reference"], strict=True))

        return pairs("train"), {"validation": group_pairs(pairs("validation")), "test": group_pairs(pairs("test"))}

    def _prompt_ids(self, mr: str) -> list[int]:
        ids = self.tokenizer(mr + self.spec.separator)["input_ids"]  # with the tokenizer's BOS where it adds one
        return ids[: self.max_length - 1]  # room for at least one target token

    def _encode_pair(self, mr: str, text: str) -> dict[str, list[int]]:
        prompt = self._prompt_ids(mr)
        target = self.tokenizer(" " + text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        ids = (prompt + target)[: self.max_length]
        return {"input_ids": ids, "labels": [-100] * len(prompt) + ids[len(prompt) :]}

    def _encode_group(self, group: E2EGroup) -> dict[str, Any]:
        return {"input_ids": self._prompt_ids(group.mr), "mr": group.mr, "references": list(group.references)}

    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        return self._collate

    def _collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        # Right padding: positions count from 0 in every row, as in training without padding.
        length = max(len(f["input_ids"]) for f in features)
        pad = self.tokenizer.pad_token_id

        def padded(key: str, fill: int) -> torch.Tensor:
            return torch.tensor([f[key] + [fill] * (length - len(f[key])) for f in features])

        mask = torch.tensor([[1] * len(f["input_ids"]) + [0] * (length - len(f["input_ids"])) for f in features])
        return {"input_ids": padded("input_ids", pad), "attention_mask": mask, "labels": padded("labels", -100)}

    # -- training ---------------------------------------------------------------------------------
    def logits(self, model: Callable[..., Any], inputs: Batch) -> torch.Tensor:
        return model(**inputs).logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy of the next-token ``logits`` at the target tokens of ``labels`` (-100 elsewhere)."""
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, label_smoothing=self.label_smoothing
        )

    # -- evaluation -------------------------------------------------------------------------------
    def _left_padded(self, rows: list[list[int]], device: torch.device) -> dict[str, torch.Tensor]:
        length = max(len(row) for row in rows)
        ids = [[self.tokenizer.pad_token_id] * (length - len(row)) + row for row in rows]
        mask = [[0] * (length - len(row)) + [1] * len(row) for row in rows]
        return {"input_ids": torch.tensor(ids, device=device), "attention_mask": torch.tensor(mask, device=device)}

    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        prompts: list[list[int]],
        batch_size: int,
        device: torch.device,
        synced_gpus: bool = False,
        progress: bool = False,
    ) -> list[str]:
        """Beam-search hypotheses of ``prompts`` (token ids of MR + separator) by ``model`` (in eval mode),
        ``batch_size`` prompts at a time; ``progress`` shows a progress bar."""
        hypotheses: list[str] = []
        for start in tqdm(range(0, len(prompts), batch_size), desc="decode", unit="batch", disable=not progress, dynamic_ncols=True):
            inputs = self._left_padded(prompts[start : start + batch_size], device)
            width = inputs["input_ids"].shape[1]
            processors = LogitsProcessorList()
            if self.decoding.no_repeat_ngram_size > 0:
                processors.append(GeneratedNoRepeatNGram(self.decoding.no_repeat_ngram_size, width))
            output = model.generate(
                **inputs, generation_config=self.generation_config, logits_processor=processors, synced_gpus=synced_gpus
            )
            texts = self.tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
            hypotheses += [_one_line(text) for text in texts]
        return hypotheses

    def sharded_generate(
        self, engine: DeepSpeedEngine | nn.Module, dataset: datasets.Dataset, batch_size: int, env: DistEnv, progress: bool = True
    ) -> list[str]:
        """The hypothesis of every prompt (``input_ids``) of ``dataset`` in order, on every rank: each rank decodes
        its ``eval_shard`` in eval mode (``progress``: a progress bar on rank 0), and the shards are gathered."""
        model = getattr(engine, "module", engine)
        was_training = model.training
        model.eval()
        count = len(dataset)
        own, padded = eval_shard(count, env)
        # ZeRO-3 gathers every layer's parameters collectively: ranks that finish early keep stepping with the others.
        synced = env.world_size > 1 and bool(getattr(engine, "zero_optimization_partition_weights", lambda: False)())
        prompts = [dataset[i]["input_ids"] for i in padded]
        local = self.generate(model, prompts, batch_size, engine.device, synced, progress=progress and env.is_main)[: len(own)]
        shards = gather_shards(local, env)
        model.train(was_training)
        return [shards[i % env.world_size][i // env.world_size] for i in range(count)]

    @property
    def input_columns(self) -> tuple[str, ...]:
        return (self.spec.input_column,)

    def encode_inputs(self, rows: datasets.Dataset) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"input_ids": [self._prompt_ids(text) for text in rows[self.spec.input_column]]})

    def predict(
        self, model: DeepSpeedEngine | nn.Module, inputs: datasets.Dataset, batch_size: int, env: DistEnv, progress: bool = False
    ) -> list[dict[str, Any]]:
        """The decoded text of every MR of ``inputs`` (``prediction``), with this family's ``decoding``."""
        return [{"prediction": text} for text in self.sharded_generate(model, inputs, batch_size, env, progress)]

    def evaluate(
        self,
        engine: DeepSpeedEngine | nn.Module,
        dataset: datasets.Dataset,
        batch_size: int,
        env: DistEnv,
        predictions: Path | None = None,
    ) -> dict[str, float]:
        """Decode every MR of ``dataset`` and score it against its references; rank 0 writes
        ``<predictions>.txt`` (one hypothesis per MR, in file order: what e2e-metrics reads) and
        ``<predictions>.jsonl`` (MR and hypothesis)."""
        hypotheses = self.sharded_generate(engine, dataset, batch_size, env)
        result: list[dict[str, float] | None] = [None]
        if env.is_main:
            result[0] = self.scorer.score(hypotheses, dataset["references"])
            if predictions is not None:
                write_atomically(predictions.with_suffix(".txt"), "".join(h + "\n" for h in hypotheses))
                lines = (
                    json.dumps({"mr": mr, "hypothesis": h}, ensure_ascii=False) + "\n"
                    for mr, h in zip(dataset["mr"], hypotheses, strict=True)
                )
                write_atomically(predictions.with_suffix(".jsonl"), "".join(lines))
        dist.broadcast_object_list(result, src=0)  # the metrics decide the best checkpoint: the same on every rank
        return result[0]

    def record(self) -> dict[str, Any]:
        # The decoding is the default of later predictions (flags override it).
        return {**super().record(), "separator": self.spec.separator, "decoding": dataclasses.asdict(self.decoding)}
