"""The launcher's training loop in named parts: the micro-batches of each optimizer step, the step itself, the
window of losses that a log line reports, when to evaluate and to checkpoint, and evaluation with the best
checkpoint. Every rank runs them alike.

What each rank asks of its device per optimizer step: the forward and backward passes of the step's micro-batches,
the logged losses added up on the device, and the engine's step. The host reads the device once per logging
window (``LossWindow.close``: one all-reduce of four numbers, then one copy to the host); that all-reduce is also
where the ranks agree to stop on a preemption signal, so no optimizer step waits for the host.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from adamix_ds.consistency import AdaMixLoss
from adamix_ds.data import TaskData
from adamix_ds.distributed import DistEnv, all_reduce
from adamix_ds.evaluation import to_device
from adamix_ds.optim import ExpertStepGuard
from adamix_ds.training.checkpoint import TrainerState, save_model
from adamix_ds.training.data import evaluate_splits
from adamix_ds.training.runtime import logger
from adamix_ds.training.schedule import TrainSchedule

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from adamix_ds.families import TaskFamily

Batch = dict[str, torch.Tensor]


def step_batches(loader: DataLoader, schedule: TrainSchedule, state: TrainerState) -> Iterator[list[Batch]]:
    """The micro-batches of every optimizer step from ``state.global_step`` to the end of the schedule, on the host:
    a step's ``gradient_accumulation_steps`` micro-batches at a time, continuing an epoch part-way after a resume
    (``loader`` has a ``ResumableSampler``)."""
    accumulation = schedule.gradient_accumulation_steps
    step = state.global_step
    while step < schedule.total_steps:
        epoch, skip = schedule.position(step + state.data_step_offset)
        loader.sampler.set_position(epoch, skip * loader.batch_size)
        micro_batches = itertools.islice(loader, schedule.steps_per_epoch * accumulation - skip)
        while step < schedule.total_steps and (batches := list(itertools.islice(micro_batches, accumulation))):
            yield batches
            step += 1


class LossWindow:
    """The losses of the micro-batches since the last log line, summed on ``device``: adding costs no host sync."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums = torch.zeros(4, device=device)  # task loss, consistency loss, micro-batches, preemption votes
        self.start = time.perf_counter()

    def add(self, out: AdaMixLoss) -> None:
        """Count one micro-batch's losses."""
        self.sums[:2] += torch.stack([out.task_loss.detach().float(), out.consistency_loss.detach().float()])
        self.sums[2] += 1

    def close(self, preempted: bool) -> WindowMeans:
        """Sum the window over every rank with this rank's vote to stop (``preempted``), read it, and start the
        next window. Every rank calls it at the same step: the one collective and the one host sync of a window."""
        self.sums[3] = float(preempted)
        if dist.is_initialized():  # one process without a launcher (the Trainer under plain python) has no group
            all_reduce(self.sums, self.device)
        task_loss, consistency, count, votes = self.sums.tolist()
        per_batch = max(count, 1.0)
        means = WindowMeans(task_loss / per_batch, consistency / per_batch, int(count), time.perf_counter() - self.start, votes > 0)
        self.sums.zero_()
        self.start = time.perf_counter()
        return means


@dataclass(frozen=True)
class WindowMeans:
    """A closed ``LossWindow``: mean losses per micro-batch over every rank, how many, the seconds it took, and
    whether any rank was signalled to stop."""

    task_loss: float
    consistency_loss: float
    micro_batches: int
    seconds: float
    stop: bool

    def logs(self, consistency_weight: float, learning_rate: float, micro_batch_size: int) -> dict[str, float]:
        """The log line's values, named as the monitor writes them (``train_`` + name)."""
        return {
            "train_loss": self.task_loss + consistency_weight * self.consistency_loss,
            "train_task_loss": self.task_loss,
            "train_consistency_loss": self.consistency_loss,
            "train_learning_rate": learning_rate,
            "train_samples_per_second": self.micro_batches * micro_batch_size / self.seconds,
        }


def train_step(
    engine: DeepSpeedEngine,
    guard: ExpertStepGuard,
    family: TaskFamily,
    batches: list[Batch],
    consistency_weight: float,
    window: LossWindow,
    dropout_seed: int,
) -> None:
    """One optimizer step on this rank: every micro-batch of ``batches`` forward (the AdaMix passes of
    ``family.train_loss``) and backward, then the step with the expert semantics of ``guard``. Dropout draws from
    ``dropout_seed``, so a resumed run draws the masks an uninterrupted one would."""
    torch.manual_seed(dropout_seed)
    for batch in batches:
        out = family.train_loss(engine, to_device(batch, engine.device), consistency_weight)
        engine.backward(out.loss)
        window.add(out)
        if engine.is_gradient_accumulation_boundary():
            guard.step(engine.step)
        else:
            engine.step()  # DeepSpeed only counts the micro-step here


def evaluation_due(strategy: str, eval_steps: int | None, step: int, data_step: int, steps_per_epoch: int) -> bool:
    """Whether the run evaluates after optimizer step ``step`` (``data_step``: the step's position in the data,
    which an elastic resume shifts): every ``eval_steps`` steps, or at each epoch's end."""
    if strategy == "steps":
        return step % eval_steps == 0
    return strategy == "epoch" and data_step % steps_per_epoch == 0


def checkpoint_due(save_steps: int | None, step: int, evaluated: bool) -> bool:
    """Whether the run saves a resumable checkpoint after step ``step``: every ``save_steps`` steps, or (without
    ``--save_steps``) after each evaluation."""
    return evaluated if save_steps is None else step % save_steps == 0


def log_events(engine: DeepSpeedEngine, metrics: dict[str, float], step: int) -> None:
    """Write ``metrics`` to the engine's monitors (TensorBoard, W&B, CSV as its config enables), ``train/loss`` style."""
    if engine.monitor.enabled:
        engine.monitor.write_events([(name.replace("_", "/", 1), value, step) for name, value in metrics.items()])


@dataclass
class BestKeeper:
    """Evaluates the run and keeps its best model: ``best_dir`` holds the merged adapter (the model, for full
    fine-tuning) of the evaluation with the highest ``best_key`` so far, recorded in ``state``."""

    engine: DeepSpeedEngine
    data: TaskData
    family: TaskFamily
    batch_size: int
    env: DistEnv
    output_dir: Path
    state: TrainerState
    best_key: str
    best_dir: Path
    save_options: dict[str, Any]  # save_model's tokenizer and model-card hyperparameters

    def __call__(self, step: int) -> dict[str, float]:
        """Evaluate after step ``step`` on every rank; returns the metrics with their ``step``."""
        metrics = evaluate_splits(self.engine, self.data, self.family, self.batch_size, self.env, self.output_dir)
        log_events(self.engine, metrics, step)
        logger.info("step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        state = self.state
        # A split without a dev set (LiST) has no best evaluation: the model is never selected on the test set.
        if self.best_key in metrics and (state.best_metric is None or metrics[self.best_key] > state.best_metric):
            state.best_metric, state.best_step, state.best_metrics = metrics[self.best_key], step, metrics
            save_model(self.engine, self.best_dir, merged=True, metrics=metrics, **self.save_options)
        return {**metrics, "step": step}
