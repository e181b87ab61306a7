"""Reusable pieces of the DeepSpeed launcher (``launchers/train.py``): arguments, the DeepSpeed config
builder, expert optimizer semantics inside DeepSpeed, checkpoints and evaluation."""

import logging

import torch

from adamix_ds.training.runtime import CpuAcceleratorNotice, stdout_to_stderr

# DeepSpeed's logger writes to the sys.stdout of the moment it is imported: imported here first with stdout sent to
# stderr, its lines stay off the launchers' results on stdout. Where torch sees no GPU, its notice that it chose the
# CPU says nothing and would stand above every launcher's one-line error: dropped.
if not torch.cuda.is_available():
    logging.getLogger("DeepSpeed").addFilter(CpuAcceleratorNotice())
with stdout_to_stderr():
    import deepspeed  # noqa: F401

from adamix_ds.backbones import resolve_model_path
from adamix_ds.distributed import DistEnv, dist_env
from adamix_ds.evaluation import eval_shard, evaluate_logits, gather_shards
from adamix_ds.training.arguments import (
    AdaMixArguments,
    DataArguments,
    ModelArguments,
    RunArguments,
    TrainingArguments,
    adamix_config,
    build_parser,
    parse_args,
    resolve_data_dir,
)
from adamix_ds.training.checkpoint import (
    TrainerState,
    check_resumable,
    directory_bytes,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_model,
    trainable_shapes,
)
from adamix_ds.training.data import ResumableSampler, evaluate_splits, train_loader
from adamix_ds.training.ds_config import build_ds_config, check_cuda_arch_list, jit_builds_fused_adam, read_ds_config, zero_stage
from adamix_ds.training.runtime import (
    configure_threads,
    init_distributed,
    setup_logging,
    shutdown_distributed,
    step_seed,
    usage_errors,
)
from adamix_ds.training.schedule import LR_SCHEDULE, TrainSchedule

__all__ = [
    "LR_SCHEDULE",
    "AdaMixArguments",
    "DataArguments",
    "DistEnv",
    "ModelArguments",
    "ResumableSampler",
    "RunArguments",
    "TrainSchedule",
    "TrainerState",
    "TrainingArguments",
    "adamix_config",
    "build_ds_config",
    "build_parser",
    "check_cuda_arch_list",
    "check_resumable",
    "configure_threads",
    "directory_bytes",
    "dist_env",
    "eval_shard",
    "evaluate_logits",
    "evaluate_splits",
    "gather_shards",
    "find_checkpoint",
    "init_distributed",
    "jit_builds_fused_adam",
    "load_checkpoint",
    "parse_args",
    "read_ds_config",
    "resolve_data_dir",
    "resolve_model_path",
    "save_checkpoint",
    "save_model",
    "setup_logging",
    "shutdown_distributed",
    "step_seed",
    "trainable_shapes",
    "train_loader",
    "usage_errors",
    "zero_stage",
]
