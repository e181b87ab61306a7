"""How many steps a run takes, where step ``n`` sits in the data, and its learning rate: pure functions of the flags."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_linear_schedule_with_warmup

# The learning-rate schedule of every run, as checkpoints record it (transformers' SchedulerType name).
LR_SCHEDULE = "linear"


@dataclass(frozen=True)
class TrainSchedule:
    """The step plan of a run.

    Every rank sees ``ceil(num_samples / world_size)`` samples per epoch (the sampler pads by repeating),
    cut into micro-batches; an epoch ends with its last full group of ``gradient_accumulation_steps``
    micro-batches, so that every optimizer step averages the same number of micro-batches.

    Attributes:
        micro_batches_per_epoch: micro-batches each rank's loader yields per epoch.
        gradient_accumulation_steps: micro-batches per optimizer step.
        steps_per_epoch: optimizer steps per epoch.
        total_steps: optimizer steps of the whole run.
        warmup_steps: steps of linear warmup.
        num_epochs: epochs started (the last one may stop early at ``total_steps``).
    """

    micro_batches_per_epoch: int
    gradient_accumulation_steps: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    num_epochs: int

    @classmethod
    def build(
        cls,
        num_samples: int,
        world_size: int,
        micro_batch_size: int,
        gradient_accumulation_steps: int,
        num_train_epochs: float,
        max_steps: int,
        warmup_ratio: float,
        warmup_steps: int,
    ) -> TrainSchedule:
        """The plan for ``num_samples`` training examples; ``ValueError`` if they make no optimizer step."""
        micro_batches = math.ceil(math.ceil(num_samples / world_size) / micro_batch_size)
        steps_per_epoch = micro_batches // gradient_accumulation_steps
        if steps_per_epoch == 0:
            raise ValueError(
                f"gradient_accumulation_steps={gradient_accumulation_steps} is larger than the {micro_batches} micro-batches per rank "
                f"that {num_samples} training samples give (per_device_train_batch_size={micro_batch_size}, {world_size} rank(s))"
            )
        total = max_steps if max_steps > 0 else math.ceil(num_train_epochs * steps_per_epoch)
        warmup = warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total)
        return cls(micro_batches, gradient_accumulation_steps, steps_per_epoch, total, warmup, math.ceil(total / steps_per_epoch))

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, micro-batches already consumed in it)`` after ``step`` optimizer steps."""
        epoch, steps_in_epoch = divmod(step, self.steps_per_epoch)
        return epoch, steps_in_epoch * self.gradient_accumulation_steps

    def lr_scheduler(self, optimizer: Optimizer) -> LambdaLR:
        """The reference's schedule (``run_glue.py``'s, LiST's and the E2E code's, all transformers'): step ``n``
        (from 0) trains at each group's own ``lr`` times ``n / warmup_steps`` during warmup, then times
        ``(total_steps - n) / (total_steps - warmup_steps)``: no warmup starts at the full rate.

        What ``deepspeed.initialize(lr_scheduler=...)`` takes: the engine steps it after every optimizer step that
        it does not skip (an fp16 overflow) and keeps its state in checkpoints.
        """
        return get_linear_schedule_with_warmup(optimizer, self.warmup_steps, self.total_steps)
