"""Task data for the launcher: task specs, tokenized datasets, a padding collator and the metrics."""

from adamix_ds.data.glue import TaskData, load_task, make_collator, read_glue_folder, read_split_file, tokenizer_encoder
from adamix_ds.data.metrics import compute_metrics
from adamix_ds.data.tasks import (
    CUSTOM_TASK,
    GENERATION_TASKS,
    GLUE_TASKS,
    EvalSplit,
    GenerationTaskSpec,
    TaskSpec,
    custom_task_spec,
    get_task_spec,
)

__all__ = [
    "CUSTOM_TASK",
    "GENERATION_TASKS",
    "GLUE_TASKS",
    "EvalSplit",
    "GenerationTaskSpec",
    "TaskData",
    "TaskSpec",
    "compute_metrics",
    "custom_task_spec",
    "get_task_spec",
    "load_task",
    "make_collator",
    "read_glue_folder",
    "read_split_file",
    "tokenizer_encoder",
]
