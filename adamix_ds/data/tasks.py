"""The nine GLUE tasks and the few-shot tasks of LM-BFF and LiST: where their data lives, how it is
labelled and how it is scored.

Column and label names follow the Hub's ``nyu-mll/glue`` dataset, so a model trained on local GLUE
files and one trained on the Hub copy see the same label ids. The few-shot single-sentence tasks (subj,
mpqa, sst5, mr, cr, trec) and SNLI exist only as local files (LM-BFF's and LiST's CSV/TSV layouts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "EvalSplit",
    "TaskSpec",
    "GenerationTaskSpec",
    "GLUE_TASKS",
    "FEWSHOT_TASKS",
    "GENERATION_TASKS",
    "TASKS",
    "CUSTOM_TASK",
    "custom_task_spec",
    "get_task_spec",
]


@dataclass(frozen=True)
class EvalSplit:
    """One evaluation split of a task.

    ``name`` is its key in ``TaskData.eval``, ``file`` its file in a GLUE task folder and
    ``hub_split`` its split in the Hub dataset.
    """

    name: str
    file: str
    hub_split: str


_DEV = (EvalSplit("validation", "dev.tsv", "validation"),)


@dataclass(frozen=True)
class TaskSpec:
    """Everything the loader and the metrics need to know about one GLUE task.

    Attributes:
        name: the task's name, as in ``run_glue.py --task_name`` (``"sst2"``).
        glue_dir: its folder in a GLUE download (``"SST-2"``).
        text_columns: the text column(s) as the Hub names them; local files are renamed to these.
        file_text_columns: the same columns as named in the GLUE tsv files.
        file_label_column: the label column in the GLUE tsv files.
        label_names: the Hub's class names, index = label id; empty for regression.
        file_labels: how each label id is written in the GLUE tsv files, index = label id.
        is_regression: True for STS-B (a float score instead of a class).
        metric_names: the keys ``compute_metrics`` returns, the task's main metric first.
        eval_splits: the evaluation splits (MNLI has a matched and a mismatched one).
        file_columns: column names for GLUE files written without a header (CoLA), else None.
        hub_dataset: the Hub dataset id (its config is ``hub_config``); ``None`` for tasks read only from files.
        train_file: the training file in a GLUE task folder.
        delimiter: the field separator of the task's files: a tab (GLUE, unquoted) or ``","`` (LM-BFF's
            CSV files, quoted).
        test_file: the labelled test file beside LiST's split folders (``list/SST-2/test.tsv``).
    """

    name: str
    glue_dir: str
    text_columns: tuple[str, ...]
    file_text_columns: tuple[str, ...]
    file_label_column: str
    label_names: tuple[str, ...]
    file_labels: tuple[str, ...]
    is_regression: bool
    metric_names: tuple[str, ...]
    eval_splits: tuple[EvalSplit, ...] = _DEV
    file_columns: tuple[str, ...] | None = None
    hub_dataset: str | None = "nyu-mll/glue"
    train_file: str = "train.tsv"
    delimiter: str = "\t"
    test_file: str = "test.tsv"
    # The spec's default consistency weight (paper: w = 1 for classification).
    consistency_weight: float = 1.0
    # Reports show the metrics (fractions) as percentages.
    report_scale: float = 100.0

    @property
    def hub_config(self) -> str:
        """The Hub dataset config: ``nyu-mll/glue`` names its configs like the tasks."""
        return self.name

    @property
    def num_labels(self) -> int:
        """Output width of the classification head: 1 for regression, else the class count."""
        return 1 if self.is_regression else len(self.label_names)

    def local_copy(self, shared_data: Path) -> Path | None:
        """The GLUE root under ``shared_data`` (``../shared/data``) when it holds this task, else ``None``."""
        root = shared_data / "glue"
        return root if (root / self.glue_dir).is_dir() else None


_ACC = ("accuracy",)
_ACC_F1 = ("accuracy", "f1", "combined_score")
_BINARY = ("0", "1")

GLUE_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="cola",
            glue_dir="CoLA",
            text_columns=("sentence",),
            file_text_columns=("sentence",),
            file_label_column="label",
            label_names=("unacceptable", "acceptable"),
            file_labels=_BINARY,
            is_regression=False,
            metric_names=("matthews_correlation",),
            # GLUE's CoLA train/dev files have no header: source, label, original mark, sentence.
            file_columns=("source", "label", "original_mark", "sentence"),
        ),
        TaskSpec(
            name="sst2",
            glue_dir="SST-2",
            text_columns=("sentence",),
            file_text_columns=("sentence",),
            file_label_column="label",
            label_names=("negative", "positive"),
            file_labels=_BINARY,
            is_regression=False,
            metric_names=_ACC,
        ),
        TaskSpec(
            name="mrpc",
            glue_dir="MRPC",
            text_columns=("sentence1", "sentence2"),
            file_text_columns=("#1 String", "#2 String"),
            file_label_column="Quality",
            label_names=("not_equivalent", "equivalent"),
            file_labels=_BINARY,
            is_regression=False,
            metric_names=_ACC_F1,
        ),
        TaskSpec(
            name="qqp",
            glue_dir="QQP",
            text_columns=("question1", "question2"),
            file_text_columns=("question1", "question2"),
            file_label_column="is_duplicate",
            label_names=("not_duplicate", "duplicate"),
            file_labels=_BINARY,
            is_regression=False,
            metric_names=_ACC_F1,
        ),
        TaskSpec(
            name="stsb",
            glue_dir="STS-B",
            text_columns=("sentence1", "sentence2"),
            file_text_columns=("sentence1", "sentence2"),
            file_label_column="score",
            label_names=(),
            file_labels=(),
            is_regression=True,
            metric_names=("pearson", "spearmanr", "combined_score"),
        ),
        TaskSpec(
            name="mnli",
            glue_dir="MNLI",
            text_columns=("premise", "hypothesis"),
            file_text_columns=("sentence1", "sentence2"),
            file_label_column="gold_label",
            label_names=("entailment", "neutral", "contradiction"),
            file_labels=("entailment", "neutral", "contradiction"),
            is_regression=False,
            metric_names=_ACC,
            eval_splits=(
                EvalSplit("validation", "dev_matched.tsv", "validation_matched"),
                EvalSplit("validation_mismatched", "dev_mismatched.tsv", "validation_mismatched"),
            ),
        ),
        TaskSpec(
            name="qnli",
            glue_dir="QNLI",
            text_columns=("question", "sentence"),
            file_text_columns=("question", "sentence"),
            file_label_column="label",
            label_names=("entailment", "not_entailment"),
            file_labels=("entailment", "not_entailment"),
            is_regression=False,
            metric_names=_ACC,
        ),
        TaskSpec(
            name="rte",
            glue_dir="RTE",
            text_columns=("sentence1", "sentence2"),
            file_text_columns=("sentence1", "sentence2"),
            file_label_column="label",
            label_names=("entailment", "not_entailment"),
            file_labels=("entailment", "not_entailment"),
            is_regression=False,
            metric_names=_ACC,
        ),
        TaskSpec(
            name="wnli",
            glue_dir="WNLI",
            text_columns=("sentence1", "sentence2"),
            file_text_columns=("sentence1", "sentence2"),
            file_label_column="label",
            label_names=("not_entailment", "entailment"),
            file_labels=_BINARY,
            is_regression=False,
            metric_names=_ACC,
        ),
    )
}


def _sentence_task(name: str, folder: str, label_names: tuple[str, ...]) -> TaskSpec:
    """A single-sentence task of LM-BFF/LiST: headerless CSV files ``label,sentence`` with labels 0..C-1."""
    return TaskSpec(
        name=name,
        glue_dir=folder,
        text_columns=("sentence",),
        file_text_columns=("sentence",),
        file_label_column="label",
        label_names=label_names,
        file_labels=tuple(str(i) for i in range(len(label_names))),
        is_regression=False,
        metric_names=_ACC,
        eval_splits=(EvalSplit("validation", "dev.csv", "validation"),),
        file_columns=("label", "sentence"),
        hub_dataset=None,
        train_file="train.csv",
        delimiter=",",
        test_file="test.csv",
    )


# Folder names as in LM-BFF's data/original and LiST's data/clue.
FEWSHOT_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _sentence_task("subj", "subj", ("subjective", "objective")),
        _sentence_task("mpqa", "mpqa", ("negative", "positive")),
        _sentence_task("sst5", "sst-5", ("very negative", "negative", "neutral", "positive", "very positive")),
        _sentence_task("mr", "mr", ("negative", "positive")),
        _sentence_task("cr", "cr", ("negative", "positive")),
        _sentence_task("trec", "trec", ("description", "entity", "expression", "human", "location", "number")),
        TaskSpec(
            name="snli",
            glue_dir="SNLI",
            text_columns=("premise", "hypothesis"),
            file_text_columns=("sentence1", "sentence2"),
            file_label_column="gold_label",
            label_names=("entailment", "neutral", "contradiction"),
            file_labels=("entailment", "neutral", "contradiction"),
            is_regression=False,
            metric_names=_ACC,
            hub_dataset=None,
        ),
    )
}


@dataclass(frozen=True)
class GenerationTaskSpec:
    """A data-to-text task: a meaning representation (MR) in, text out, scored by decoding each distinct MR
    against all of its references.

    Attributes:
        name: the task's name (``"e2e_nlg"``).
        local_folder: its folder under ``../shared/data``.
        train_files, dev_files, test_files: the file names a data folder may hold for each split, in order of
            preference (the challenge's CSV files first, then the LoRA code's ``mr || text`` lines).
        hub_dataset: the Hub dataset id (columns ``meaning_representation``, ``human_reference``).
        metric_names: the generation metrics, the main one first.
        consistency_weight: the default weight of the token-level consistency loss (paper: 100 for GPT-2).
        report_scale: 1: the metrics are already on the scale the papers report (BLEU, METEOR, ROUGE-L x100).
        input_column: the name of an input's text column (the MR).
        separator: what follows the input in the prompt, before the text the model writes (the LoRA code's E2E format).
    """

    name: str
    local_folder: str
    train_files: tuple[str, ...]
    dev_files: tuple[str, ...]
    test_files: tuple[str, ...]
    hub_dataset: str | None
    metric_names: tuple[str, ...]
    consistency_weight: float = 100.0
    report_scale: float = 1.0
    input_column: str = "mr"
    separator: str = " ||"

    def local_copy(self, shared_data: Path) -> Path | None:
        """This task's folder under ``shared_data`` (``../shared/data``) when it exists, else ``None``."""
        folder = shared_data / self.local_folder
        return folder if folder.is_dir() else None


GENERATION_TASKS: dict[str, GenerationTaskSpec] = {
    "e2e_nlg": GenerationTaskSpec(
        name="e2e_nlg",
        local_folder="e2e",
        train_files=("trainset.csv", "train.txt", "lora_train.txt"),
        dev_files=("devset.csv", "valid.txt", "lora_valid.txt"),
        test_files=("testset_w_refs.csv", "test.txt", "lora_test.txt"),
        hub_dataset="tuetschek/e2e_nlg",
        metric_names=("bleu", "nist", "meteor", "rouge_l", "cider"),
    )
}
TASKS: dict[str, TaskSpec | GenerationTaskSpec] = {**GLUE_TASKS, **FEWSHOT_TASKS, **GENERATION_TASKS}
# The task of an adapter known only by its model (saved through the library alone: ``add_adamix``, ``save_adapter``):
# none of the named tasks, so it has no data of its own; its inputs are texts in a column ``text``.
CUSTOM_TASK = "custom"


def custom_task_spec(task_type: str, label_names: Sequence[str] | None) -> TaskSpec | GenerationTaskSpec:
    """The task of an adapter known only by its model (``AdaMixConfig.task_type`` and ``label_names``): for
    ``"SEQ_CLS"`` a classification of one text into ``label_names`` (one name: a regression score, as transformers
    reads ``num_labels=1``), for ``"CAUSAL_LM"`` the continuation of a text as it is (no separator). ``ValueError``
    names what is missing or not allowed."""
    if task_type == "CAUSAL_LM":
        return GenerationTaskSpec(
            name=CUSTOM_TASK,
            local_folder=CUSTOM_TASK,
            train_files=(),
            dev_files=(),
            test_files=(),
            hub_dataset=None,
            metric_names=GENERATION_TASKS["e2e_nlg"].metric_names,
            input_column="text",
            separator="",
        )
    if task_type != "SEQ_CLS":
        raise ValueError(f"task_type={task_type!r} is invalid: allowed SEQ_CLS, CAUSAL_LM")
    if not label_names:
        raise ValueError(f"task_type={task_type} needs the classifier's label_names (its config.id2label), got {label_names!r}")
    regression = len(label_names) == 1
    return TaskSpec(
        name=CUSTOM_TASK,
        glue_dir=CUSTOM_TASK,
        text_columns=("text",),
        file_text_columns=("text",),
        file_label_column="label",
        label_names=() if regression else tuple(label_names),
        file_labels=() if regression else tuple(str(i) for i in range(len(label_names))),
        is_regression=regression,
        metric_names=GLUE_TASKS["stsb"].metric_names if regression else _ACC,
        hub_dataset=None,
    )


def get_task_spec(task_name: str) -> TaskSpec | GenerationTaskSpec:
    """The spec of ``task_name`` (any case, like ``run_glue.py``): a ``TaskSpec`` for classification tasks,
    a ``GenerationTaskSpec`` for generation tasks.

    Raises ``ValueError`` naming the value and the allowed names if there is none.
    """
    spec = TASKS.get(str(task_name).lower())
    if spec is None:
        raise ValueError(f"unknown task {task_name!r}; choose one of: {', '.join(TASKS)}")
    return spec
