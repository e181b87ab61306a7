"""GLUE data for the launcher: task specs, tokenized datasets, a padding collator and the metrics."""

from adamix_ds.data.glue import TaskData, load_task, make_collator, read_glue_folder
from adamix_ds.data.metrics import compute_metrics
from adamix_ds.data.tasks import GLUE_TASKS, EvalSplit, TaskSpec, get_task_spec

__all__ = [
    "GLUE_TASKS",
    "EvalSplit",
    "TaskData",
    "TaskSpec",
    "compute_metrics",
    "get_task_spec",
    "load_task",
    "make_collator",
    "read_glue_folder",
]
