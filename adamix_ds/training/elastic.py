"""Elastic resume: continue a checkpoint written on W ranks at one ZeRO stage on W' ranks at another.

The optimizer state goes through DeepSpeed's universal checkpoint. Rank 0 converts the checkpoint with
``ds_to_universal`` (DeepSpeed's own knowledge of how every stage partitions the fp32 weights and Adam
moments) into a scratch folder beside the run's checkpoints, and every rank loads it with DeepSpeed's
universal loader, which partitions each full tensor for the new layout. Around it, this module fills
what that path leaves out for checkpoints like ours (adapters trained, the frozen backbone excluded):

* one folder for both loaders, so that the stage can change too: the ZeRO-1/2 loader reads the Adam step
  from each parameter's ``step.pt``, tensors wrapped in a dict, the version from ``zero/optimizer_state.pt``
  and the model states from ``mp_rank_00_model_states.pt``; the ZeRO-3 loader reads the step from
  ``zero/optimizer_state.pt`` and the model states from ``zero_pp_rank_0_mp_rank_00_model_states.pt``.
  The converter writes the saving stage's form only; the other one is added;
* the module state that is not a parameter (the AdaMix routing counters): the universal loader skips
  the model states' ``module`` entry, so those entries are loaded here;
* the hyperparameters of every parameter group: DeepSpeed's ZeRO-3 loader gives all groups those of the
  first, which would decay the biases; each group gets its own again.

Kept exactly: the trainable weights, Adam moments and step, the routing counters, the lr schedule, the
optimizer step count and the best evaluation. The data continues from the checkpoint's sample position
in the epoch's order as far as the new global batch allows (``elastic_position``). A checkpoint at
ZeRO-0 keeps whole tensors on every rank: it continues on any number of ranks at ZeRO-0 with DeepSpeed's
ordinary load; DeepSpeed's universal checkpoint has no ZeRO-0, so ZeRO-0 cannot change to ZeRO 1-3 or back.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from deepspeed.checkpoint import PARAM, ds_to_universal

from adamix_ds.training.checkpoint import TrainerState, first_failure, layout_changed, load_checkpoint
from adamix_ds.training.runtime import logger
from adamix_ds.training.schedule import TrainSchedule

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

UNIVERSAL_SUFFIX = ".universal.partial"  # matches checkpoint.SCRATCH_GLOB: a stale one goes at the next save
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO 0-2, ZeRO-3


@dataclass(frozen=True)
class ElasticResume:
    """What an elastic resume changed, for the log and ``metrics.json``.

    Attributes:
        step: the optimizer step the run continued from.
        from_world_size, to_world_size: ranks of the checkpoint and of this run.
        from_zero_stage, to_zero_stage: their ZeRO stages.
        from_train_batch_size, to_train_batch_size: their global batches (micro-batch x ranks x accumulation).
        epoch, sample: the checkpoint's place in the data: samples of epoch ``epoch``'s order consumed.
        resumed_epoch, resumed_sample: where this run continues in that order.
    """

    step: int
    from_world_size: int
    to_world_size: int
    from_zero_stage: int
    to_zero_stage: int
    from_train_batch_size: int
    to_train_batch_size: int
    epoch: int
    sample: int
    resumed_epoch: int
    resumed_sample: int


def _global_batch(layout: dict[str, Any]) -> int:
    return layout["per_device_train_batch_size"] * layout["world_size"] * layout["gradient_accumulation_steps"]


def elastic_position(state: TrainerState, layout: dict[str, Any], schedule: TrainSchedule) -> tuple[int, int, int, int, int]:
    """Where a checkpoint written under ``state.layout`` continues in the data on ``layout`` (step plan ``schedule``).

    Every layout reads epoch ``e`` in the same order (the sampler's seeded permutation of the training set,
    rank ``r`` taking positions ``r, r + W, ...``): after ``s`` steps of a global batch ``B`` an epoch has
    consumed its first ``s * B`` samples, whatever the number of ranks. The new layout can only start an
    epoch's steps at multiples of its own global batch ``B'``: the run continues at the largest multiple not
    past the checkpoint's position (the same position when ``B'`` divides it; else fewer than ``B'`` samples
    are read a second time, none skipped), and at the next epoch when the new layout's epoch is already over.

    Returns ``(data_step_offset, epoch, sample, resumed_epoch, resumed_sample)``: the new
    ``TrainerState.data_step_offset`` (``schedule.position(step + offset)`` is the new position), the
    checkpoint's epoch and sample position in it, and the run's.
    """
    saved = state.layout
    before = TrainSchedule.build(
        saved["train_samples"],
        saved["world_size"],
        saved["per_device_train_batch_size"],
        saved["gradient_accumulation_steps"],
        1.0,
        saved["total_steps"],
        0.0,
        0,
    )
    epoch, micro_batches = before.position(state.global_step + state.data_step_offset)
    sample = micro_batches * saved["per_device_train_batch_size"] * saved["world_size"]
    resumed_epoch, steps = epoch, sample // _global_batch(layout)
    if steps >= schedule.steps_per_epoch:
        resumed_epoch, steps = epoch + 1, 0
    offset = resumed_epoch * schedule.steps_per_epoch + steps - state.global_step
    return offset, epoch, sample, resumed_epoch, steps * _global_batch(layout)


def resume_checkpoint(
    engine: DeepSpeedEngine, checkpoint: Path, state: TrainerState, layout: dict[str, Any], schedule: TrainSchedule, scratch_root: Path
) -> ElasticResume | None:
    """Restore ``checkpoint`` into ``engine`` on all ranks; ``None`` when it was written on this layout.

    On another layout (``check_resumable`` allowed it) the state continues elastically: ``state`` gets this
    run's layout and data position, rank 0 logs one line, and the returned record says what changed.
    ``scratch_root`` holds the universal checkpoint while it loads (a folder every rank reads: the run's
    checkpoint folder).
    """
    if not layout_changed(state.layout, layout):
        load_checkpoint(engine, checkpoint)
        return None
    if layout["zero_stage"] == 0:  # whole tensors on every rank: any number of ranks loads them as saved
        load_checkpoint(engine, checkpoint)
    else:
        _load_universal(engine, checkpoint, scratch_root / f".{checkpoint.name}{UNIVERSAL_SUFFIX}")
    offset, epoch, sample, resumed_epoch, resumed_sample = elastic_position(state, layout, schedule)
    record = ElasticResume(
        step=state.global_step,
        from_world_size=state.layout["world_size"],
        to_world_size=layout["world_size"],
        from_zero_stage=state.layout["zero_stage"],
        to_zero_stage=layout["zero_stage"],
        from_train_batch_size=_global_batch(state.layout),
        to_train_batch_size=_global_batch(layout),
        epoch=epoch,
        sample=sample,
        resumed_epoch=resumed_epoch,
        resumed_sample=resumed_sample,
    )
    state.layout, state.data_step_offset = dict(layout), offset
    if dist.get_rank() == 0:
        logger.info(
            "resumed elastically from %d to %d rank(s), ZeRO-%d to ZeRO-%d, global batch %d to %d, at step %d: "
            "the checkpoint had read %d samples of epoch %d, this run continues at sample %d of epoch %d",
            record.from_world_size,
            record.to_world_size,
            record.from_zero_stage,
            record.to_zero_stage,
            record.from_train_batch_size,
            record.to_train_batch_size,
            record.step,
            sample,
            epoch,
            resumed_sample,
            resumed_epoch,
        )
    return record


def _load_universal(engine: DeepSpeedEngine, checkpoint: Path, scratch: Path) -> None:
    """Convert ``checkpoint`` to a universal checkpoint in ``scratch`` (rank 0) and load it on every rank."""
    universal = scratch / checkpoint.name
    failure = first_failure(_convert(checkpoint, universal) if dist.get_rank() == 0 else None)
    try:
        if failure is not None:
            raise RuntimeError(f"could not convert {checkpoint} to DeepSpeed's universal checkpoint: {failure}")
        # DeepSpeed reads this config flag when it loads; set for this one load, the run's config stays as given.
        engine._config.load_universal_checkpoint = True
        try:
            path, _ = engine.load_checkpoint(str(scratch), tag=universal.name, load_module_strict=False)
        finally:
            engine._config.load_universal_checkpoint = False
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no universal checkpoint in {universal}")
        _load_module_extra_state(engine, universal)
        _restore_group_hyperparameters(engine, universal)
    finally:
        dist.barrier()  # every rank has read the files
        if dist.get_rank() == 0:
            shutil.rmtree(scratch, ignore_errors=True)


def _convert(checkpoint: Path, universal: Path) -> str | None:
    """``ds_to_universal`` from ``checkpoint`` into ``universal``, completed for every stage's loader; the error
    as one line, or ``None``."""
    shutil.rmtree(universal.parent, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(checkpoint),
        output_folder=str(universal),
        num_extract_workers=1,  # in-process: no worker pool inside a rank
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # the engine records no universal_checkpoint_info without Megatron-style patterns
    )
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress bars
            ds_to_universal.main(args)
        _complete_universal(universal)
    except Exception as error:  # whatever stops the converter is reported on every rank, which then all raise
        return " ".join(f"{type(error).__name__}: {error}".split())
    return None


def _complete_universal(universal: Path) -> None:
    """Add what the other stage's loader reads to the converter's output (see the module docstring)."""
    present = next(universal / name for name in MODEL_STATES if (universal / name).is_file())
    for name in MODEL_STATES:
        if not (universal / name).is_file():
            shutil.copyfile(present, universal / name)
    zero = universal / "zero"
    optimizer_state = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
    if "optimizer_state_dict" in optimizer_state:  # from ZeRO-3: bare tensors, one step in this file, no version
        step = optimizer_state["optimizer_state_dict"]["state"][0]["step"]
        for folder in (path for path in zero.iterdir() if path.is_dir()):
            for file in folder.glob("*.pt"):
                torch.save({PARAM: torch.load(file, map_location="cpu", weights_only=False)}, file)
            torch.save(step, folder / "step.pt")
        optimizer_state["ds_version"] = torch.load(present, map_location="cpu", weights_only=False)["ds_version"]
    else:  # from ZeRO-1/2: the step beside each parameter
        step = torch.load(next(zero.glob("*/step.pt")), map_location="cpu", weights_only=False)
        optimizer_state["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": optimizer_state["param_groups"]}
    torch.save(optimizer_state, zero / "optimizer_state.pt")


def _load_module_extra_state(engine: DeepSpeedEngine, universal: Path) -> None:
    """Load the saved module entries that are not parameters (the routing counters; any persistent buffer)."""
    saved = torch.load(universal / MODEL_STATES[0], map_location="cpu", weights_only=False)["module"]
    parameters = {name for name, _ in engine.module.named_parameters()}
    result = engine.module.load_state_dict({k: v for k, v in saved.items() if k not in parameters}, strict=False)
    missing = sorted(set(result.missing_keys) - parameters)
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the checkpoint's module state does not fit this model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )


def _restore_group_hyperparameters(engine: DeepSpeedEngine, universal: Path) -> None:
    """Give every optimizer parameter group the saved hyperparameters of the same group (lr, weight decay, ...)."""
    saved = torch.load(universal / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)["param_groups"]
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group, values in zip(base.param_groups, saved, strict=True):
        group.update({key: value for key, value in values.items() if key != "params"})
