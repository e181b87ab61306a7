"""Load a task, tokenized, from the Hub, a local GLUE folder, an LM-BFF k-shot folder or a LiST split folder."""

from __future__ import annotations

import csv
import itertools
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from adamix_ds.data.tasks import TaskSpec, get_task_spec

__all__ = ["TaskData", "load_task", "make_collator", "read_glue_folder", "read_split_file", "tokenizer_encoder"]

logger = logging.getLogger(__name__)

# LM-BFF names its few-shot folders "<k>-<seed>" (k-shot/SST-2/16-13), LiST "<K>-<split>" (list/SST-2/30-1).
_KSHOT_FOLDER = re.compile(r"\d+-\d+")
# LiST's copies of some training files have no header: their columns, by task.
_HEADERLESS_COLUMNS = {
    "sst2": ("sentence", "label"),
    "mnli": ("index", "genre", "sentence1", "sentence2", "gold_label"),
}
# Turns a batch of raw rows (text columns -> lists of strings) into model inputs; see load_task.
Encoder = Callable[[dict[str, list]], dict[str, list]]


@dataclass
class TaskData:
    """A tokenized GLUE task.

    Attributes:
        train: the training set, with ``input_ids``, ``attention_mask``, ``token_type_ids`` where the
            tokenizer makes them, and ``labels`` (class ids, or float scores for stsb).
        eval: evaluation sets by split name, with the same columns: ``"validation"`` (MNLI's matched
            dev set), ``"validation_mismatched"`` for MNLI, and ``"test"`` (plus
            ``"test_mismatched"`` for MNLI) where a test set was loaded.
        spec: the task's ``TaskSpec``.
    """

    train: datasets.Dataset
    eval: dict[str, datasets.Dataset]
    spec: TaskSpec

    @property
    def num_labels(self) -> int:
        """Output width of the classification head (1 for stsb)."""
        return self.spec.num_labels

    @property
    def is_regression(self) -> bool:
        """True for stsb."""
        return self.spec.is_regression


def load_task(
    task_name: str,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int = 128,
    data_dir: str | os.PathLike[str] | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    test_file: str | os.PathLike[str] | None = None,
    encoder: Encoder | None = None,
) -> TaskData:
    """Load ``task_name`` and tokenize it for ``tokenizer``, like ``run_glue.py`` does.

    Where the data comes from depends on ``data_dir``:

    - ``None``: the Hub dataset ``nyu-mll/glue`` (``ConnectionError`` if it cannot be reached).
    - a GLUE task folder as written by GLUE's ``download_glue_data.py`` (``glue/SST-2``), or the
      GLUE root holding it (``glue``): ``train.tsv`` and the dev file(s) become ``train`` and the
      eval splits (MNLI: ``dev_matched.tsv`` -> ``"validation"``, ``dev_mismatched.tsv`` ->
      ``"validation_mismatched"``).
    - an LM-BFF k-shot folder, recognised by its ``<k>-<seed>`` name (``k-shot/SST-2/16-13``): its
      ``train.tsv`` and ``dev.tsv`` (MNLI: ``dev_matched.tsv``) become ``train`` and
      ``"validation"``, and the task's GLUE dev set becomes ``"test"`` (MNLI: also
      ``"test_mismatched"``). That is the folder's own ``test.tsv`` where LM-BFF wrote one, else
      ``<k-shot root>/../glue/<TASK>/dev.tsv``.
    - a LiST split folder, a ``<K>-<split>`` folder whose parent holds the task's test file
      (``list/SST-2/30-1`` beside ``list/SST-2/test.tsv``): its training file becomes ``train``, its
      ``dev`` file (if any: RTE's 500-example splits) ``"validation"``, and the parent's test file ``"test"``.

    ``test_file``, a labelled file in the task's GLUE format, is loaded as ``"test"`` instead of
    the k-shot default, or in addition to the other splits. Sequences are truncated to
    ``max_seq_length`` tokens and not padded (see ``make_collator``). ``encoder`` replaces the tokenizer's
    own encoding of the text columns (a prompt template, ``adamix_ds.prompts``): it maps a batch of the
    task's ``text_columns`` to token columns (``input_ids``, ...). ``max_train_samples`` and
    ``max_eval_samples`` keep the first N rows of train and of every eval split, in file order.

    Raises ``ValueError`` for an unknown task or a malformed file (naming the file, line and value),
    ``FileNotFoundError`` naming a missing folder or file.
    """
    spec = get_task_spec(task_name)
    for name, value in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")

    if data_dir is None:
        train, evals = _load_hub(spec)
    else:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"data_dir is not an existing folder: {folder}")
        if _KSHOT_FOLDER.fullmatch(folder.name) and _is_list_split(spec, folder):
            train, evals = _load_list(spec, folder, find_test=test_file is None)
        elif _KSHOT_FOLDER.fullmatch(folder.name):
            train, evals = _load_kshot(spec, folder, find_test=test_file is None)
        else:
            train, evals = _load_glue_folder(spec, folder)
    if test_file is not None:
        evals["test"] = _read_glue_tsv(spec, Path(test_file))

    max_length = min(max_seq_length, tokenizer.model_max_length)
    if max_length < max_seq_length:
        logger.warning(
            "max_seq_length %d is longer than the tokenizer's maximum %d; using %d",
            max_seq_length,
            tokenizer.model_max_length,
            max_length,
        )
    if encoder is None:
        encoder = tokenizer_encoder(spec, tokenizer, max_length)
    return TaskData(
        train=_tokenize(_first(train, max_train_samples), encoder, spec),
        eval={name: _tokenize(_first(ds, max_eval_samples), encoder, spec) for name, ds in evals.items()},
        spec=spec,
    )


def tokenizer_encoder(spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> Encoder:
    """The tokenizer's own encoding of ``spec``'s text columns (one sentence or a pair), truncated to
    ``max_seq_length`` tokens or the tokenizer's maximum, whichever is shorter: ``load_task``'s default."""
    max_length = min(max_seq_length, tokenizer.model_max_length)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(*(batch[c] for c in spec.text_columns), truncation=True, max_length=max_length)

    return encode


def make_collator(tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None) -> DataCollatorWithPadding:
    """The batch collator for ``load_task``'s datasets: pads each batch to its longest sequence.

    ``pad_to_multiple_of`` (8 for fp16/bf16, as ``run_glue.py`` uses) rounds the padded length up
    for tensor cores.
    """
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)


def _load_hub(spec: TaskSpec) -> tuple[datasets.Dataset, dict[str, datasets.Dataset]]:
    if spec.hub_dataset is None:
        raise ValueError(f"task {spec.name} is read from files only: pass --data_dir (a LiST or LM-BFF few-shot folder)")
    try:
        dataset = datasets.load_dataset(spec.hub_dataset, spec.hub_config)
    except ConnectionError as err:
        raise ConnectionError(
            f"could not reach the Hub for {spec.hub_dataset} ({spec.hub_config}): {err}; pass --data_dir with a local GLUE folder"
        ) from err
    dataset = dataset.rename_column("label", "labels")
    return dataset["train"], {split.name: dataset[split.hub_split] for split in spec.eval_splits}


def read_glue_folder(task_name: str, data_dir: str | os.PathLike[str]) -> tuple[datasets.Dataset, dict[str, datasets.Dataset]]:
    """The untokenized ``train`` split and eval splits of ``task_name`` from a GLUE folder, with the folder rules of
    ``load_task``'s ``data_dir`` (the GLUE root ``glue`` or the task folder ``glue/SST-2``); for tools that
    tokenize themselves (the benchmarks). ``FileNotFoundError``/``ValueError`` name a missing or malformed file."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"data_dir is not an existing folder: {folder}")
    return _load_glue_folder(get_task_spec(task_name), folder)


def _load_glue_folder(spec: TaskSpec, data_dir: Path) -> tuple[datasets.Dataset, dict[str, datasets.Dataset]]:
    task_files = (spec.train_file, *(split.file for split in spec.eval_splits))
    folder = data_dir if any((data_dir / name).is_file() for name in task_files) else data_dir / spec.glue_dir
    if not folder.is_dir():
        raise FileNotFoundError(f"no {spec.name} files in {data_dir}, and no GLUE task folder {folder}")
    train = _read_glue_tsv(spec, folder / spec.train_file)
    return train, {split.name: _read_glue_tsv(spec, folder / split.file) for split in spec.eval_splits}


def _load_kshot(spec: TaskSpec, folder: Path, find_test: bool) -> tuple[datasets.Dataset, dict[str, datasets.Dataset]]:
    train = _read_glue_tsv(spec, folder / spec.train_file)
    # LM-BFF writes the k-shot dev set under the name of the task's first GLUE dev file.
    evals = {"validation": _read_glue_tsv(spec, folder / spec.eval_splits[0].file)}
    if find_test:
        # abspath, not resolve: the convention follows the path as given, not where symlinks lead.
        glue_folder = Path(os.path.abspath(folder)).parents[2] / "glue" / spec.glue_dir
        for split in spec.eval_splits:
            # LM-BFF copies each GLUE dev file into the k-shot folder, renamed dev -> test; copies
            # that ship only train/dev (like ../shared/data) keep the GLUE files beside k-shot/.
            in_folder = folder / split.file.replace("dev", "test")
            beside = glue_folder / split.file
            found = next((path for path in (in_folder, beside) if path.is_file()), None)
            if found is None:
                raise FileNotFoundError(f"no GLUE dev set for the k-shot test split at {beside} (nor {in_folder}); pass test_file")
            evals[split.name.replace("validation", "test")] = _read_glue_tsv(spec, found)
    return train, evals


def _is_list_split(spec: TaskSpec, folder: Path) -> bool:
    """LiST keeps each task's test file beside its split folders; its MNLI and QQP copies ship none, but sit under ``list/``."""
    return (folder.parent / spec.test_file).is_file() or Path(os.path.abspath(folder)).parents[1].name == "list"


def _load_list(spec: TaskSpec, folder: Path, find_test: bool) -> tuple[datasets.Dataset, dict[str, datasets.Dataset]]:
    train = _read_glue_tsv(spec, folder / spec.train_file)
    dev = folder / spec.eval_splits[0].file
    evals = {"validation": _read_glue_tsv(spec, dev)} if dev.is_file() else {}
    if find_test:
        test = folder.parent / spec.test_file
        if not test.is_file():
            raise FileNotFoundError(
                f"no {spec.name} test file for the LiST split {folder} at {test} (LiST ships none for this task): put one there"
            )
        evals["test"] = _read_glue_tsv(spec, test)
    return train, evals


def read_split_file(spec: TaskSpec, path: str | os.PathLike[str], labelled: bool = True) -> datasets.Dataset:
    """The untokenized rows of one task file in the task's own format (GLUE tsv, LiST's headerless tsv, LM-BFF's
    csv): columns ``spec.text_columns`` and, for a ``labelled`` file, ``labels``. An unlabelled file (GLUE's
    ``test.tsv``) always has a header. ``FileNotFoundError``/``ValueError`` name a missing or malformed file."""
    return _read_glue_tsv(spec, Path(path), labelled)


def _read_glue_tsv(spec: TaskSpec, path: Path, labelled: bool = True) -> datasets.Dataset:
    """Read a task file (GLUE tsv, LiST's headerless tsv, LM-BFF's csv) into columns ``spec.text_columns`` and,
    when ``labelled``, ``labels``."""
    if not path.is_file():
        raise FileNotFoundError(f"{spec.name} data file not found: {path}")
    label_ids = {raw: label_id for label_id, raw in enumerate(spec.file_labels)}
    texts: list[list[str]] = [[] for _ in spec.file_text_columns]
    labels: list[int | float] = []
    # utf-8-sig drops the byte-order mark that GLUE's MRPC files start with, which would otherwise
    # become part of the first column's name.
    with path.open(encoding="utf-8-sig", newline="") as file:
        # GLUE files are not quoted: a '"' is part of the text. LM-BFF's CSV files are.
        quoting = csv.QUOTE_NONE if spec.delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.reader(file, delimiter=spec.delimiter, quoting=quoting)
        try:
            header = list(spec.file_columns) if spec.file_columns and labelled else next(reader, None)
            if header is None:
                raise ValueError(f"{path}: empty file")
            required = (*spec.file_text_columns, spec.file_label_column) if labelled else spec.file_text_columns
            headerless = _HEADERLESS_COLUMNS.get(spec.name)
            first_row = None
            if labelled and headerless and any(c not in header for c in required) and len(header) == len(headerless):
                header, first_row = list(headerless), header
            missing = [c for c in required if c not in header]
            if missing:
                raise ValueError(f"{path}: no column {missing[0]!r}; the columns are {header}")
            text_indices = [header.index(c) for c in spec.file_text_columns]
            label_index = header.index(spec.file_label_column) if labelled else None
            for row in itertools.chain([first_row] if first_row else [], reader):
                # An exact count catches a stray tab, which would silently shift every later column.
                if len(row) != len(header):
                    separator = "tab" if spec.delimiter == "\t" else "comma"
                    raise ValueError(f"{path}: line {reader.line_num} has {len(row)} {separator}-separated fields, expected {len(header)}")
                for column, index in zip(texts, text_indices, strict=True):
                    column.append(row[index])
                if label_index is None:
                    continue
                raw = row[label_index]
                label = _parse_score(raw) if spec.is_regression else label_ids.get(raw)
                if label is None:
                    expected = "a number" if spec.is_regression else f"one of {list(spec.file_labels)}"
                    raise ValueError(
                        f"{path}: line {reader.line_num}, column {spec.file_label_column!r}: bad label {raw!r}, expected {expected}"
                    )
                labels.append(label)
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err.reason})") from err
        except csv.Error as err:
            raise ValueError(f"{path}: line {reader.line_num}: {err}") from err
    if not texts[0]:
        raise ValueError(f"{path}: no data rows")
    columns = dict(zip(spec.text_columns, texts, strict=True))
    if not labelled:
        return datasets.Dataset.from_dict(columns, features=datasets.Features({c: datasets.Value("string") for c in columns}))
    label_feature = datasets.Value("float32") if spec.is_regression else datasets.ClassLabel(names=list(spec.label_names))
    features = datasets.Features({**{c: datasets.Value("string") for c in spec.text_columns}, "labels": label_feature})
    return datasets.Dataset.from_dict({**columns, "labels": labels}, features=features)


def _parse_score(raw: str) -> float | None:
    try:
        score = float(raw)
    except ValueError:
        return None
    return score if math.isfinite(score) else None


def _first(dataset: datasets.Dataset, n: int | None) -> datasets.Dataset:
    return dataset if n is None or n >= len(dataset) else dataset.select(range(n))


def _tokenize(dataset: datasets.Dataset, encoder: Encoder, spec: TaskSpec) -> datasets.Dataset:
    return dataset.map(
        encoder,
        batched=True,
        remove_columns=[c for c in dataset.column_names if c != "labels"],
        desc=f"Tokenizing {spec.name}",
    )
