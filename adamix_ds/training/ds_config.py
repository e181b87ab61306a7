"""The one place where command-line flags become DeepSpeed config values.

A config file decides *how* to train (ZeRO stage, offload, bucket sizes, TensorBoard on or off); the
flags decide the values that depend on the run. ``RUN_VALUES`` lists every such key. In the file each
of them is either ``"auto"`` (or absent): filled from the flags, or a value: it must agree with the
flags, otherwise ``build_ds_config`` raises ``ValueError``. A file value never silently overrides a flag,
nor a flag a file value.

| config key                                  | from                                             |
|---------------------------------------------|--------------------------------------------------|
| train_micro_batch_size_per_gpu              | --per_device_train_batch_size                    |
| gradient_accumulation_steps                 | --gradient_accumulation_steps                    |
| train_batch_size                            | micro batch x accumulation x number of ranks     |
| gradient_clipping                           | --max_grad_norm                                  |
| optimizer.params.lr / betas / eps / weight_decay | --learning_rate, --adam_beta1/2, --adam_epsilon, --weight_decay |
| bf16.enabled, fp16.enabled                  | --bf16, --fp16                                   |
| tensorboard.output_path / job_name          | output_dir/runs / the run's name                 |

A config has no ``scheduler`` section: the learning-rate schedule is the reference's (transformers' linear
warmup and decay, ``TrainSchedule.lr_scheduler``), which the launcher hands to DeepSpeed as its client scheduler;
each optimizer group's peak rate is in the group (``adamix_ds.optim.adamw_param_groups``). DeepSpeed's own
``WarmupDecayLR`` runs one step behind it, and needs at least one warmup step at rate 0.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

from adamix_ds.config import read_json_object
from adamix_ds.training.arguments import TrainingArguments

AUTO = "auto"
ADAM_OPTIMIZERS = ("Adam", "AdamW")
# DeepSpeed 0.19 JIT-builds its fused optimizers on CUDA for the architectures in TORCH_CUDA_ARCH_LIST and parses
# each entry as MAJOR.MINOR[+PTX]: a variant suffix, which CUDA images set ("9.0a"), fails inside
# deepspeed.initialize after the model has loaded (ValueError: invalid literal for int(): '0a';
# deepspeedai/DeepSpeed#8619).
_DEEPSPEED_ARCH_ENTRY = re.compile(r"\d+\.\d+(\+PTX)?")


def monitor_paths(output_dir: str | Path, job_name: str) -> tuple[str, str]:
    """A monitor's ``output_path`` and ``job_name`` for the run ``job_name`` writing to ``output_dir``: ``output_dir/runs``
    and the name. DeepSpeed drops every config value equal to "auto" (its placeholder for Hugging Face): a run named
    auto would log to runs/DeepSpeedJobName. "auto/" names the same folder, runs/auto."""
    return str(Path(output_dir) / "runs"), f"{job_name}/" if job_name == AUTO else job_name


def run_values(args: TrainingArguments, world_size: int, job_name: str) -> dict[str, Any]:
    """The values the flags give to ``RUN_VALUES``' keys, by dotted config path."""
    output_path, monitor_job = monitor_paths(args.output_dir, job_name)
    return {
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size,
        "gradient_clipping": args.max_grad_norm,
        "optimizer.params.lr": args.learning_rate,
        "optimizer.params.betas": [args.adam_beta1, args.adam_beta2],
        "optimizer.params.eps": args.adam_epsilon,
        "optimizer.params.weight_decay": args.weight_decay,
        "bf16.enabled": args.bf16,
        "fp16.enabled": args.fp16,
        "tensorboard.output_path": output_path,
        "tensorboard.job_name": monitor_job,
    }


# The flag behind each key, for error messages.
FLAGS = {
    "train_micro_batch_size_per_gpu": "--per_device_train_batch_size",
    "gradient_accumulation_steps": "--gradient_accumulation_steps",
    "gradient_clipping": "--max_grad_norm",
    "optimizer.params.lr": "--learning_rate",
    "optimizer.params.betas": "--adam_beta1/--adam_beta2",
    "optimizer.params.eps": "--adam_epsilon",
    "optimizer.params.weight_decay": "--weight_decay",
    "bf16.enabled": "--bf16",
    "fp16.enabled": "--fp16",
    "tensorboard.output_path": "--output_dir",
}


def check_cuda_arch_list(value: str | None) -> None:
    """``ValueError`` naming ``TORCH_CUDA_ARCH_LIST`` (``value``) when DeepSpeed's JIT builder cannot parse it."""
    entries = (value or "").replace(" ", ";").split(";")
    unparsable = [entry for entry in entries if entry and not _DEEPSPEED_ARCH_ENTRY.fullmatch(entry)]
    if unparsable:
        raise ValueError(
            f"TORCH_CUDA_ARCH_LIST={value!r}: DeepSpeed cannot build its fused optimizer for {', '.join(unparsable)}: "
            "allowed entries are MAJOR.MINOR with an optional +PTX, separated by ';' or spaces "
            "(e.g. TORCH_CUDA_ARCH_LIST=9.0 on an H100 or H200), or leave it unset to build for the GPUs present"
        )


def jit_builds_fused_adam(config: dict[str, Any]) -> bool:
    """Whether DeepSpeed JIT-builds its CUDA ``FusedAdam`` for ``config`` at ``deepspeed.initialize`` on a GPU: an Adam
    optimizer that is neither torch's (``"torch_adam": true``, as the shipped configs) nor offloaded to the CPU
    (DeepSpeedCPUAdam, built by the host's compiler)."""
    optimizer = config.get("optimizer", {})
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return optimizer.get("type") in ADAM_OPTIMIZERS and not optimizer.get("params", {}).get("torch_adam") and offload == "none"


def read_ds_config(path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path``; ``FileNotFoundError`` or ``ValueError`` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {path}")
    return read_json_object(path, "DeepSpeed config")


def build_ds_config(path: str | Path, args: TrainingArguments, world_size: int, job_name: str) -> dict[str, Any]:
    """The config of ``path`` with every run value filled from the flags (see the module docstring).

    Raises ``ValueError`` for a malformed file, a scheduler section, a contradiction between file and flags, a
    batch size that does not divide, or a value DeepSpeed rejects.
    """
    config = copy.deepcopy(read_ds_config(path))
    config.setdefault("optimizer", {"type": "AdamW"})
    if not isinstance(config["optimizer"], dict):
        raise ValueError(f"{path}: optimizer must be a JSON object, got {config['optimizer']!r}")
    if config["optimizer"].get("type") not in ADAM_OPTIMIZERS:
        raise ValueError(
            f"{path}: optimizer type {config['optimizer'].get('type')!r} is not supported: allowed {', '.join(ADAM_OPTIMIZERS)}"
        )
    if "scheduler" in config:
        raise ValueError(
            f"{path}: a scheduler section is not allowed: the schedule is the reference's linear warmup and decay, "
            "set by --warmup_ratio/--warmup_steps and --max_steps/--num_train_epochs; remove the section"
        )
    _check_train_batch_size(path, config.get("train_batch_size", AUTO), args, world_size)

    values = run_values(args, world_size, job_name)
    # Placeholders are read from the file before filling: a value the flags wrote is never taken for one.
    unfilled = sorted(set(_auto_keys(config)) - set(values))
    for key, value in values.items():
        *parents, leaf = key.split(".")
        section = config
        for parent in parents:
            section = section.setdefault(parent, {})
            if not isinstance(section, dict):
                raise ValueError(f"{path}: {parent} must be a JSON object, got {section!r}")
        current = section.get(leaf, AUTO)
        if current == AUTO:
            section[leaf] = value
        elif not _agree(current, value):
            raise ValueError(
                f"{path}: {key}={json.dumps(current)} contradicts {FLAGS.get(key, 'the flags')} (which give {json.dumps(value)}); "
                f'write "auto" in the file to take the flag'
            )
    if unfilled:
        raise ValueError(
            f'{path}: {unfilled[0]}="auto" has no flag to fill it (the keys the flags fill are listed in adamix_ds/training/ds_config.py)'
        )
    _validate_with_deepspeed(path, config)
    return config


def zero_stage(config: dict[str, Any]) -> int:
    """The ZeRO stage of a built config (0 when there is no zero_optimization section)."""
    return int(config.get("zero_optimization", {}).get("stage", 0))


def _check_train_batch_size(path: str | Path, value: Any, args: TrainingArguments, world_size: int) -> None:
    if value == AUTO:
        return
    per_step = args.per_device_train_batch_size * world_size
    if not isinstance(value, int) or value < 1:
        raise ValueError(f'{path}: train_batch_size={json.dumps(value)} is invalid: allowed "auto" or a positive integer')
    if value % per_step:
        raise ValueError(
            f"{path}: train_batch_size={value} does not divide into micro-batches of per_device_train_batch_size="
            f"{args.per_device_train_batch_size} on {world_size} rank(s) ({per_step} per micro-step)"
        )
    if value // per_step != args.gradient_accumulation_steps:
        raise ValueError(
            f"{path}: train_batch_size={value} means gradient_accumulation_steps={value // per_step} on {world_size} rank(s), "
            f"but --gradient_accumulation_steps={args.gradient_accumulation_steps}"
        )


def _agree(file_value: Any, flag_value: Any) -> bool:
    if isinstance(flag_value, list):
        return isinstance(file_value, list) and len(file_value) == len(flag_value) and all(map(_agree, file_value, flag_value))
    if isinstance(flag_value, bool) or isinstance(file_value, bool):
        return file_value is flag_value
    if isinstance(flag_value, (int, float)) and isinstance(file_value, (int, float)):
        return math.isclose(file_value, flag_value, rel_tol=1e-9, abs_tol=0.0)
    return file_value == flag_value


def _auto_keys(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, dict):
        return [key for name, item in value.items() for key in _auto_keys(item, f"{prefix}{name}.")]
    return [prefix.rstrip(".")] if value == AUTO else []


def _validate_with_deepspeed(path: str | Path, config: dict[str, Any]) -> None:
    """Let DeepSpeed's own schema reject unknown or ill-typed keys before anything starts."""
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeedConfig checks train_batch_size against the world size it sees, which is 1 before
    # torch.distributed starts; the batch arithmetic was checked above.
    probe = {key: value for key, value in config.items() if key != "train_batch_size"}
    try:
        DeepSpeedConfig(probe)
    except (ValueError, AssertionError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip() and "errors.pydantic.dev" not in line]
        raise ValueError(f"{path}: DeepSpeed rejects the config: {' '.join(lines)}") from None
