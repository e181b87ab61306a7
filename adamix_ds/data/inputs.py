"""Unlabelled inputs for prediction: a task's split by name (GLUE's ``test.tsv`` included), a user's own TSV, CSV or
JSON-lines file, and the files the GLUE leaderboard takes (``SST-2.tsv``, ``MNLI-m.tsv``, ...).

A split is read with the task's own reader (``read_split_file``); its rows keep the file's order, which is the order
of a GLUE submission file. A user's file names its text columns; a missing column, a malformed row or an unknown
file type is a ``ValueError`` naming the file and what is allowed.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets

from adamix_ds.data.glue import read_split_file
from adamix_ds.data.tasks import TaskSpec

__all__ = ["GLUE_SUBMISSION", "SubmissionFile", "read_input_file", "read_task_split", "submission_lines", "task_splits"]

INPUT_FORMATS = (".tsv", ".csv", ".jsonl", ".json")


@dataclass(frozen=True)
class SubmissionFile:
    """One file of a GLUE leaderboard submission: its ``name`` in the submission, the ``split`` it predicts and
    where that split lives in a GLUE download (``path``, relative to the GLUE root)."""

    name: str
    split: str
    path: str


# The files the GLUE server expects, per task (AX, the diagnostic set, is predicted by the MNLI model).
GLUE_SUBMISSION: dict[str, tuple[SubmissionFile, ...]] = {
    "cola": (SubmissionFile("CoLA.tsv", "test", "CoLA/test.tsv"),),
    "sst2": (SubmissionFile("SST-2.tsv", "test", "SST-2/test.tsv"),),
    "mrpc": (SubmissionFile("MRPC.tsv", "test", "MRPC/test.tsv"),),
    "stsb": (SubmissionFile("STS-B.tsv", "test", "STS-B/test.tsv"),),
    "qqp": (SubmissionFile("QQP.tsv", "test", "QQP/test.tsv"),),
    "mnli": (
        SubmissionFile("MNLI-m.tsv", "test_matched", "MNLI/test_matched.tsv"),
        SubmissionFile("MNLI-mm.tsv", "test_mismatched", "MNLI/test_mismatched.tsv"),
        SubmissionFile("AX.tsv", "diagnostic", "diagnostic/diagnostic.tsv"),
    ),
    "qnli": (SubmissionFile("QNLI.tsv", "test", "QNLI/test.tsv"),),
    "rte": (SubmissionFile("RTE.tsv", "test", "RTE/test.tsv"),),
    "wnli": (SubmissionFile("WNLI.tsv", "test", "WNLI/test.tsv"),),
}
# STS-B scores are similarities in [0, 5]: a submission clips the regression output to that range.
STSB_RANGE = (0.0, 5.0)


def task_splits(spec: TaskSpec) -> tuple[str, ...]:
    """The split names ``read_task_split`` takes for ``spec``: ``train``, its eval splits, its test splits."""
    return ("train", *(split.name for split in spec.eval_splits), *(file.split for file in GLUE_SUBMISSION.get(spec.name, ())))


def _split_path(spec: TaskSpec, data_dir: Path, split: str) -> tuple[Path, bool]:
    """Where ``split`` of ``spec`` is in ``data_dir`` (the GLUE root or the task's folder), and whether it is labelled."""
    files = {"train": spec.train_file, **{s.name: s.file for s in spec.eval_splits}}
    if split in files:
        name = files[split]
        return (data_dir / name if (data_dir / name).is_file() else data_dir / spec.glue_dir / name), True
    relative = Path(next(file.path for file in GLUE_SUBMISSION[spec.name] if file.split == split))
    in_task_folder = data_dir / relative.name if relative.parent.name == spec.glue_dir else data_dir.parent / relative
    return (in_task_folder if in_task_folder.is_file() else data_dir / relative), False


def read_task_split(spec: TaskSpec, data_dir: str | os.PathLike[str], split: str) -> datasets.Dataset:
    """The rows of ``split`` of a GLUE-format ``data_dir`` in file order: the text columns (``spec.text_columns``)
    and, for a labelled split, ``labels``. ``ValueError`` names a split the task does not have;
    ``FileNotFoundError`` the file a split should be in."""
    allowed = task_splits(spec)
    if split not in allowed:
        raise ValueError(f"split={split!r} is not a split of {spec.name}: allowed {', '.join(allowed)}")
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"data_dir is not an existing folder: {folder}")
    path, labelled = _split_path(spec, folder, split)
    if not path.is_file():
        raise FileNotFoundError(f"{spec.name} has no {split} split in {folder}: {path} is missing")
    return read_split_file(spec, path, labelled=labelled)


def read_input_file(path: str | os.PathLike[str], columns: dict[str, str]) -> datasets.Dataset:
    """The rows of a user's file as a dataset with one text column per key of ``columns``, read from the file's
    column named by its value (``{"sentence": "text"}``); the file's other columns are not read.

    ``.tsv`` (tab-separated, a header, no quoting: GLUE's convention), ``.csv`` (a header, quoting) or ``.jsonl``/``.json``
    (one JSON object per line). ``ValueError`` names a missing column, a malformed row or an unknown file type."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    if path.suffix.lower() not in INPUT_FORMATS:
        raise ValueError(f"input={path} has an unknown file type {path.suffix!r}: allowed {', '.join(INPUT_FORMATS)}")
    try:
        rows = _json_rows(path) if path.suffix.lower() in (".jsonl", ".json") else _table_rows(path)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason})") from None
    if not rows:
        raise ValueError(f"{path}: no data rows")
    present = list(rows[0])
    data: dict[str, list[str]] = {}
    for target, source in columns.items():
        if source not in present:
            raise ValueError(f"input={path} has no column {source!r} (for {target}): the columns are {present}")
        values = [row[source] for row in rows]
        if any(value is None for value in values):
            raise ValueError(f"input={path}: column {source!r} is null in row {values.index(None) + 1}")
        data[target] = [str(value) for value in values]
    return datasets.Dataset.from_dict(data)


def _table_rows(path: Path) -> list[dict[str, str]]:
    tsv = path.suffix.lower() == ".tsv"
    with path.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.reader(file, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        header = next(reader, None)
        if header is None:
            return []
        rows = []
        try:
            for fields in reader:
                if not fields:
                    continue
                if len(fields) != len(header):
                    raise ValueError(f"{path}: line {reader.line_num} has {len(fields)} fields, the header {len(header)}")
                rows.append(dict(zip(header, fields, strict=True)))
        except csv.Error as error:
            raise ValueError(f"{path}: line {reader.line_num}: {error}") from None
    return rows


def _json_rows(path: Path) -> list[dict[str, object]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number} is not JSON: {error}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number} is a JSON {type(row).__name__}, allowed an object per line")
        rows.append(row)
    if rows and any(row.keys() != rows[0].keys() for row in rows):
        keys = next(row.keys() for row in rows if row.keys() != rows[0].keys())
        raise ValueError(f"{path}: the rows have different keys ({sorted(rows[0])} and {sorted(keys)})")
    return rows


def submission_lines(spec: TaskSpec, predictions: Sequence[int | float]) -> str:
    """The text of a GLUE submission file for ``predictions`` (class ids, or STS-B scores) in test order: the
    header ``index<TAB>prediction``, then one row per test row with its label as the task's files write it
    (``entailment``, or ``1``), STS-B's score clipped to [0, 5]."""
    if spec.is_regression:
        low, high = STSB_RANGE
        values = [f"{min(max(float(score), low), high):.3f}" for score in predictions]
        if not all(math.isfinite(float(score)) for score in predictions):
            raise ValueError(f"{spec.name}: a prediction is not a finite number")
    else:
        values = [spec.file_labels[int(label)] for label in predictions]
    return "index\tprediction\n" + "".join(f"{index}\t{value}\n" for index, value in enumerate(values))
