"""Resumable checkpoints (DeepSpeed ``save_checkpoint`` without frozen weights) and the run's final outputs.

Layout under ``output_dir``::

    checkpoints/step-<N>/      DeepSpeed files: trainable weights, routing counters, optimizer, lr schedule
    checkpoints/step-<N>/trainer_state.json   step, best metric, and the run layout resumption needs
    checkpoints/step-<N>/manifest.json        size and sha256 of every file of the checkpoint
    checkpoints/latest         name of the newest complete checkpoint (written last)

A checkpoint is written into a hidden scratch folder, gets its manifest, is renamed to ``step-<N>``, and
only then does ``latest`` name it: a run killed or failing while saving resumes from the previous one.
Resuming verifies the manifest first; a damaged newest checkpoint is skipped for the newest one that
verifies. Checkpoints are pickles (DeepSpeed's format): load them only from sources you trust.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch import nn

from adamix_ds.distributed import dist_env
from adamix_ds.io import atomic_directory, save_adapter, write_atomically
from adamix_ds.manifest import MANIFEST_NAME, verify_manifest, write_manifest
from adamix_ds.training.runtime import logger

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
_TAG = re.compile(r"step-(\d+)")
SCRATCH_GLOB = ".step-*.partial"
# The layout values an elastic resume may change: ranks, ZeRO stage and how the global batch is split. The
# data (train_samples, seed) and the step plan (total_steps) stay: they are what the resumed run continues.
ELASTIC_KEYS = ("world_size", "zero_stage", "per_device_train_batch_size", "gradient_accumulation_steps")


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written on some rank (disk full, permission lost); raised on every rank.

    Rank 0 has already logged the one line that names the rank and file that failed (the message);
    earlier checkpoints and ``latest`` are as they were.
    """


@dataclass
class TrainerState:
    """What the launcher needs besides DeepSpeed's own state to continue a run exactly.

    ``layout`` holds the values that decide data order and routing (ranks, ZeRO stage, batch sizes, seed,
    data size, steps); resuming under another layout could not continue exactly and is refused unless the
    run asks for an elastic resume (``adamix_ds.training.elastic``).
    ``trainable`` maps every trainable parameter to its shape: DeepSpeed loads checkpoints without frozen
    weights non-strictly, so the launcher checks the keys itself.
    ``data_step_offset``: the data position after ``global_step`` steps is ``schedule.position(global_step +
    data_step_offset)``; 0 unless the run continued elastically, where its steps and epochs no longer align.
    """

    global_step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    layout: dict[str, Any] = field(default_factory=dict)
    trainable: dict[str, list[int]] = field(default_factory=dict)
    data_step_offset: int = 0

    @classmethod
    def load(cls, checkpoint: Path) -> TrainerState:
        path = checkpoint / STATE_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"{checkpoint} is not a checkpoint of this launcher: no {STATE_FILE}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:
            raise ValueError(f"{path} is malformed: {error}") from None


def trainable_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Name and full shape of every trainable parameter (ZeRO-3 partitions report their full ``ds_shape``)."""
    return {name: list(getattr(param, "ds_shape", param.shape)) for name, param in model.named_parameters() if param.requires_grad}


def find_checkpoint(output_dir: Path, resume_from_checkpoint: str | None, overwrite_output_dir: bool) -> Path | None:
    """The checkpoint to resume from: ``--resume_from_checkpoint`` (a ``step-N`` folder, or a folder with
    ``latest``), else the newest one in ``output_dir`` unless ``--overwrite_output_dir``; ``None`` for a fresh
    start. A non-empty ``output_dir`` with nothing to resume is refused (``ValueError``) without
    ``--overwrite_output_dir``, so an earlier run is never silently mixed with a new one.

    Every checkpoint is verified against its manifest first. A ``--resume_from_checkpoint`` that fails is a
    ``ValueError`` naming the file and what is wrong; the automatic resume skips a damaged newest checkpoint
    with a one-line warning and takes the newest one that verifies (``ValueError`` when none does).
    """
    if resume_from_checkpoint is not None:
        path = Path(resume_from_checkpoint)
        for candidate in (path, path / CHECKPOINTS):
            if _TAG.fullmatch(candidate.name) or (candidate / MANIFEST_NAME).is_file() or (candidate / STATE_FILE).is_file():
                _verify_checkpoint(candidate)
                return candidate
            if (candidate / LATEST).is_file():
                checkpoint = candidate / _latest_tag(candidate)
                _verify_checkpoint(checkpoint)
                return checkpoint
        raise FileNotFoundError(f"resume_from_checkpoint={resume_from_checkpoint}: no checkpoint there (no {STATE_FILE} or {LATEST})")
    if overwrite_output_dir:
        return None
    root = output_dir / CHECKPOINTS
    if (root / LATEST).is_file():
        return _newest_verified(root)
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise ValueError(
            f"output_dir={output_dir} is not empty and has no checkpoint to resume: pass --overwrite_output_dir to start afresh"
        )
    return None


def _latest_tag(root: Path) -> str:
    """The checkpoint name in ``root/latest``; ``ValueError`` when the file does not hold one."""
    latest = root / LATEST
    try:
        tag = latest.read_text().strip()
    except UnicodeDecodeError:
        tag = None
    if tag is None or not _TAG.fullmatch(tag):
        raise ValueError(f"{latest} is damaged: it does not name a step-N checkpoint")
    return tag


def _verify_checkpoint(checkpoint: Path) -> None:
    """``ValueError`` naming the file of ``checkpoint`` that is missing, truncated or fails its checksum."""
    if not checkpoint.is_dir():
        raise ValueError(f"checkpoint {checkpoint} is missing")
    try:
        verify_manifest(checkpoint)
    except ValueError as error:
        raise ValueError(f"checkpoint {checkpoint} is damaged: {error}") from None


def _newest_verified(root: Path) -> Path:
    """The checkpoint ``latest`` names if it verifies, else the newest ``step-N`` folder that does."""
    problems, candidates = [], []
    try:
        candidates.append(root / _latest_tag(root))
    except ValueError as error:
        problems.append(str(error))
    steps = sorted((int(m.group(1)), path) for path in root.iterdir() if (m := _TAG.fullmatch(path.name)))
    candidates += [path for _, path in reversed(steps) if path not in candidates]
    for candidate in candidates:
        try:
            _verify_checkpoint(candidate)
        except ValueError as error:
            problems.append(str(error))
            continue
        if problems and dist_env().is_main:  # every rank verifies the same files; one line is enough
            logger.warning("%s: resuming from %s instead", "; ".join(problems), candidate.name)
        return candidate
    raise ValueError(f"no checkpoint in {root} verifies: {'; '.join(problems)}")


def layout_changed(saved: dict[str, Any], layout: dict[str, Any]) -> bool:
    """Whether ``layout`` differs from a checkpoint's ``saved`` one in a value an elastic resume may change."""
    return any(saved.get(key, layout[key]) != layout[key] for key in ELASTIC_KEYS)


def check_resumable(
    checkpoint: Path, state: TrainerState, layout: dict[str, Any], trainable: dict[str, list[int]], elastic: bool = False
) -> None:
    """``ValueError`` naming the first difference that keeps ``checkpoint`` from continuing in this run.

    Without ``elastic`` every layout value must be the checkpoint's (a value an older checkpoint does not
    record is not compared). With it, the values of ``ELASTIC_KEYS`` may change, except ZeRO-0 against
    ZeRO 1-3; the data and the lr schedule (``total_steps``) must not. A checkpoint that records no
    ``lr_schedule`` holds the state of DeepSpeed's ``WarmupDecayLR``, which this launcher no longer runs.
    """
    if "lr_schedule" not in state.layout:
        raise ValueError(
            f"checkpoint {checkpoint} was written under DeepSpeed's WarmupDecayLR schedule, this run has lr_schedule="
            f"{layout['lr_schedule']!r} (the reference's): it cannot continue exactly (start again with --overwrite_output_dir)"
        )
    for key, value in layout.items():
        saved = state.layout.get(key, value)
        if saved == value or (elastic and key in ELASTIC_KEYS):
            continue
        hint = ""
        if key in ELASTIC_KEYS:
            hint = " (pass --elastic_resume to continue it on this layout)"
        elif key == "total_steps":
            hint = f" (pass --max_steps {saved} to continue its lr schedule)"
        raise ValueError(
            f"checkpoint {checkpoint} was written with {key}={saved!r}, this run has {key}={value!r}: it cannot continue exactly{hint}"
        )
    if layout_changed(state.layout, layout):
        before, after = state.layout.get("zero_stage"), layout["zero_stage"]
        if before is None:
            raise ValueError(
                f"checkpoint {checkpoint} records no zero_stage (it predates elastic resume): it continues only on its own layout"
            )
        if before != after and 0 in (before, after):
            raise ValueError(
                f"checkpoint {checkpoint} was written at ZeRO-{before}, this run is ZeRO-{after}: an elastic resume keeps "
                "ZeRO-0 or changes between ZeRO 1-3 (DeepSpeed's universal checkpoint has no ZeRO-0)"
            )
    missing = sorted(set(trainable) - set(state.trainable))
    unexpected = sorted(set(state.trainable) - set(trainable))
    reshaped = sorted(name for name in set(trainable) & set(state.trainable) if trainable[name] != state.trainable[name])
    if missing or unexpected or reshaped:
        raise ValueError(
            f"checkpoint {checkpoint} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"other shapes {[(n, state.trainable[n], trainable[n]) for n in reshaped[:3]]}"
        )


def save_checkpoint(engine: DeepSpeedEngine, output_dir: Path, state: TrainerState, save_total_limit: int | None) -> Path:
    """Save a resumable checkpoint of step ``state.global_step`` on all ranks; return its folder.

    Frozen backbone weights are left out (they are reloaded from the pretrained model); DeepSpeed keeps
    the modules' extra state, which carries the AdaMix routing counters. The files go to a hidden scratch
    folder; rank 0 adds ``trainer_state.json`` and the manifest, renames it to ``step-N`` and then moves
    ``latest``. When a write fails on any rank (disk full, permission lost), the scratch folder is removed,
    earlier checkpoints and ``latest`` stay as they were, rank 0 logs one line and every rank raises
    ``CheckpointSaveError``.
    """
    root = output_dir / CHECKPOINTS
    tag = f"step-{state.global_step}"
    scratch = root / f".{tag}.partial"
    is_main = dist.get_rank() == 0
    failure = first_failure(_attempt(_clear_scratch, root) if is_main else None)
    if failure is None:
        failure = first_failure(_save_deepspeed_files(engine, root, scratch.name))
    if failure is None:
        failure = first_failure(_attempt(_commit, scratch, root / tag, state, save_total_limit) if is_main else None)
    if failure is not None:
        if is_main:
            free = shutil.disk_usage(root).free if root.is_dir() else 0
            shutil.rmtree(scratch, ignore_errors=True)
            logger.error(
                "could not save checkpoint %s: %s (%d bytes were free there); the earlier checkpoints and %s are unchanged",
                root / tag,
                failure,
                free,
                LATEST,
            )
        raise CheckpointSaveError(failure)
    return root / tag


def _attempt(function: Callable[..., object], *args: object) -> str | None:
    """Run ``function`` and return its ``OSError`` as one line instead of raising it."""
    try:
        function(*args)
    except OSError as error:
        return " ".join(str(error).split())
    return None


def first_failure(failure: str | None) -> str | None:
    """The first rank's failure (with its rank), ``None`` when every rank succeeded; called on all ranks."""
    failures: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    return next((f"rank {rank}: {message}" for rank, message in enumerate(failures) if message is not None), None)


def _clear_scratch(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(SCRATCH_GLOB):  # left by a run killed while saving
        shutil.rmtree(stale)


def _save_deepspeed_files(engine: DeepSpeedEngine, root: Path, tag: str) -> str | None:
    """DeepSpeed's ``save_checkpoint`` into ``root/tag``; this rank's first failed write, or ``None``.

    DeepSpeed's save runs collectives between and after its writes: a rank that raised out of it would
    leave the others waiting. The writes (torch.save of each state file, the copy of its recovery scripts)
    record their error instead of raising, so every rank runs the same collectives and the ranks then
    decide together.
    """
    failures: list[str] = []

    def recording(write: Callable[..., object]) -> Callable[..., None]:
        def call(*args: object, **kwargs: object) -> None:
            try:
                write(*args, **kwargs)
            except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
                target = kwargs.get("path") or args[-1]  # both writers take the path last
                failures.append(f"writing {target} failed: {' '.join(str(error).split())}")

        return call

    writers = [
        (owner, name, getattr(owner, name)) for owner, name in ((engine.checkpoint_engine, "save"), (engine, "_copy_recovery_script"))
    ]
    for owner, name, write in writers:
        setattr(owner, name, recording(write))
    try:
        engine.save_checkpoint(str(root), tag=tag, exclude_frozen_parameters=True, save_latest=False)
    finally:
        for owner, name, write in writers:
            setattr(owner, name, write)
    return failures[0] if failures else None


def _commit(scratch: Path, checkpoint: Path, state: TrainerState, save_total_limit: int | None) -> None:
    """On rank 0: complete the scratch folder, move it to ``checkpoint``, point ``latest`` at it, prune."""
    (scratch / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=2) + "\n")
    write_manifest(scratch)
    if checkpoint.exists():  # a damaged or abandoned checkpoint of this step: the run resumed before it
        shutil.rmtree(checkpoint)
    os.replace(scratch, checkpoint)
    root = checkpoint.parent
    write_atomically(root / LATEST, checkpoint.name + "\n")
    if save_total_limit is not None:
        steps = sorted(int(m.group(1)) for p in root.iterdir() if (m := _TAG.fullmatch(p.name)))
        for step in steps[:-save_total_limit]:
            shutil.rmtree(root / f"step-{step}", ignore_errors=True)


def load_checkpoint(engine: DeepSpeedEngine, checkpoint: Path) -> None:
    """Restore weights, routing counters, optimizer and lr schedule from ``checkpoint`` on all ranks."""
    # Not strict: frozen weights are absent by design; check_resumable compared the trainable keys.
    path, _ = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name, load_module_strict=False)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint in {checkpoint}")


def save_model(
    engine: DeepSpeedEngine,
    path: Path,
    merged: bool,
    tokenizer: PreTrainedTokenizerBase | None = None,
    metrics: dict[str, Any] | None = None,
    hyperparameters: dict[str, Any] | None = None,
) -> None:
    """Save the trained weights on all ranks (rank 0 writes): the adapter and head (``merged``: the experts'
    average) for AdaMix methods, with a model card of the run's ``metrics`` and ``hyperparameters``; the whole
    model for full fine-tuning. ZeRO-3 partitions are gathered."""
    model = engine.module
    if getattr(model, "adamix_config", None) is not None:
        save_adapter(model, path, merged=merged, metrics=metrics, hyperparameters=hyperparameters)
        return
    if engine.zero_optimization_partition_weights():
        # One layer gathered at a time and copied to host memory on rank 0 only (None elsewhere), not the whole
        # model on every rank.
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = model.state_dict() if dist.get_rank() == 0 else None
    if dist.get_rank() == 0:
        with atomic_directory(path) as scratch:
            model.save_pretrained(scratch, state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(scratch)


def directory_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
