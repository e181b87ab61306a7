"""Resumable checkpoints (DeepSpeed ``save_checkpoint`` without frozen weights) and the run's final outputs.

Layout under ``output_dir``::

    checkpoints/step-<N>/      DeepSpeed files: trainable weights, routing counters, optimizer, lr schedule
    checkpoints/step-<N>/trainer_state.json   step, best metric, and the run layout resumption needs
    checkpoints/latest         name of the newest complete checkpoint (written last)

A checkpoint counts once ``latest`` names it: a run killed while saving resumes from the previous one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch import nn

from adamix_ds.io import atomic_directory, gathered, save_adapter

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
_TAG = re.compile(r"step-(\d+)")


@dataclass
class TrainerState:
    """What the launcher needs besides DeepSpeed's own state to continue a run exactly.

    ``layout`` holds the values that decide data order and routing (ranks, batch sizes, seed, data
    size, steps); resuming under another layout could not continue exactly and is refused.
    ``trainable`` maps every trainable parameter to its shape: DeepSpeed loads checkpoints without frozen
    weights non-strictly, so the launcher checks the keys itself.
    """

    global_step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    layout: dict[str, Any] = field(default_factory=dict)
    trainable: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def load(cls, checkpoint: Path) -> TrainerState:
        path = checkpoint / STATE_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"{checkpoint} is not a checkpoint of this launcher: no {STATE_FILE}") from None
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{path} is malformed: {error}") from None


def trainable_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Name and full shape of every trainable parameter (ZeRO-3 partitions report their full ``ds_shape``)."""
    return {name: list(getattr(param, "ds_shape", param.shape)) for name, param in model.named_parameters() if param.requires_grad}


def find_checkpoint(output_dir: Path, resume_from_checkpoint: str | None, overwrite_output_dir: bool) -> Path | None:
    """The checkpoint to resume from: ``--resume_from_checkpoint`` (a ``step-N`` folder, or a folder with
    ``latest``), else the newest one in ``output_dir`` unless ``--overwrite_output_dir``; ``None`` for a fresh
    start. A non-empty ``output_dir`` with nothing to resume is refused (``ValueError``) without
    ``--overwrite_output_dir``, so an earlier run is never silently mixed with a new one.
    """
    if resume_from_checkpoint is not None:
        path = Path(resume_from_checkpoint)
        for candidate in (path, path / CHECKPOINTS):
            if (candidate / STATE_FILE).is_file():
                return candidate
            if (candidate / LATEST).is_file():
                return candidate / (candidate / LATEST).read_text().strip()
        raise FileNotFoundError(f"resume_from_checkpoint={resume_from_checkpoint}: no checkpoint there (no {STATE_FILE} or {LATEST})")
    if overwrite_output_dir:
        return None
    latest = output_dir / CHECKPOINTS / LATEST
    if latest.is_file():
        return latest.parent / latest.read_text().strip()
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise ValueError(
            f"output_dir={output_dir} is not empty and has no checkpoint to resume: pass --overwrite_output_dir to start afresh"
        )
    return None


def check_resumable(checkpoint: Path, state: TrainerState, layout: dict[str, Any], trainable: dict[str, list[int]]) -> None:
    """``ValueError`` naming the first difference that would keep ``checkpoint`` from continuing exactly."""
    for key, value in layout.items():
        if state.layout.get(key) != value:
            raise ValueError(
                f"checkpoint {checkpoint} was written with {key}={state.layout.get(key)!r}, this run has {key}={value!r}: it cannot continue exactly"
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
    the modules' extra state, which carries the AdaMix routing counters.
    """
    root = output_dir / CHECKPOINTS
    tag = f"step-{state.global_step}"
    engine.save_checkpoint(str(root), tag=tag, exclude_frozen_parameters=True, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        _write_atomic(root / tag / STATE_FILE, json.dumps(dataclasses.asdict(state), indent=2) + "\n")
        _write_atomic(root / LATEST, tag + "\n")
        if save_total_limit is not None:
            steps = sorted(int(m.group(1)) for p in root.iterdir() if (m := _TAG.fullmatch(p.name)))
            for step in steps[:-save_total_limit]:
                shutil.rmtree(root / f"step-{step}", ignore_errors=True)
    dist.barrier()
    return root / tag


def load_checkpoint(engine: DeepSpeedEngine, checkpoint: Path) -> None:
    """Restore weights, routing counters, optimizer and lr schedule from ``checkpoint`` on all ranks."""
    # Not strict: frozen weights are absent by design; check_resumable compared the trainable keys.
    path, _ = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name, load_module_strict=False)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint in {checkpoint}")


def save_model(engine: DeepSpeedEngine, path: Path, merged: bool, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """Save the trained weights on all ranks (rank 0 writes): the adapter and head (``merged``: the experts'
    average) for AdaMix methods, the whole model for full fine-tuning. ZeRO-3 partitions are gathered."""
    model = engine.module
    if getattr(model, "adamix_config", None) is not None:
        save_adapter(model, path, merged=merged)
        return
    with gathered(list(model.parameters())):
        state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    if dist.get_rank() == 0:
        with atomic_directory(path) as scratch:
            model.save_pretrained(scratch, state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(scratch)


def directory_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def _write_atomic(path: Path, text: str) -> None:
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(text)
    os.replace(scratch, path)
