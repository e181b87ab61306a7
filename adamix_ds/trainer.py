"""AdaMix in the Hugging Face ``Trainer`` and TRL's ``SFTTrainer``, under ``python``, ``torchrun``, ``deepspeed`` or
``accelerate launch``, with what the launcher does right kept:

* the loss is ``adamix_loss``: the task loss plus the weighted consistency term between two routed passes, through
  a task family's logits and loss when one is given (``family=``: prompt templates and label words, the
  label-smoothed token loss of generation), else through the model's own loss and logits (classification, a
  causal LM's token loss at its labels, as TRL's collators mask them);
* routing is the same on every rank with no communication (every rank runs as many training forwards), across
  gradient accumulation, and a resumed run continues it: the counters travel in the checkpoint;
* the optimizer has the launcher's AdamW parameter groups (``adamw_param_groups``), also when a DeepSpeed
  config builds the optimizer, and each step gives unrouted experts the semantics ``unrouted_experts`` names
  (``ExpertStepGuard``);
* ``save_model`` and every checkpoint write ``adapter/`` (the merged adapter) and ``experts/`` as the launcher
  does (manifest, task record, model card), gathered whole under ZeRO-3 from the fp32 masters, so that
  ``load_for_inference``, ``launchers/predict.py``, ``export.py`` and ``evaluate.py --eval_modes`` take them.

    from adamix_ds import AdaMixConfig, add_adamix
    from adamix_ds.trainer import AdaMixTrainer

    add_adamix(model, AdaMixConfig(num_experts=4, bottleneck_dim=16))
    trainer = AdaMixTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=dev, consistency_weight=1.0)
    trainer.train()
    trainer.save_model()  # OUT/adapter and OUT/experts

``adamix_sft_trainer()`` returns the same for TRL's ``SFTTrainer`` (TRL is an optional extra). Under DeepSpeed the
Trainer's resumable checkpoints are DeepSpeed's own (with the frozen backbone, as the Trainer writes them); the
launcher's leave the backbone out.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from adamix_ds.checkpointing import routing_checkpoint_kwargs
from adamix_ds.consistency import AdaMixLoss, adamix_loss
from adamix_ds.families import TaskFamily
from adamix_ds.io import load_adapter, save_adapter
from adamix_ds.model import get_config
from adamix_ds.optim import UNROUTED_EXPERTS, ExpertStepGuard, TorchOptimizerAccess, UnroutedExperts, adamw_param_groups
from adamix_ds.training.ds_config import AUTO, monitor_paths
from adamix_ds.training.loop import LossWindow

__all__ = ["ADAPTER_DIR", "EXPERTS_DIR", "AdaMixTrainer", "AdaMixTrainerMixin", "adamix_sft_trainer"]

# save_model's folders, named as the launcher names them in its output directory.
ADAPTER_DIR, EXPERTS_DIR = "adapter", "experts"


class AdaMixTrainerMixin:
    """What makes a ``transformers.Trainer`` (or a subclass: TRL's ``SFTTrainer``) train AdaMix; put it first in
    the bases. ``model`` must carry AdaMix (``add_adamix``).

    Keyword arguments beside the Trainer's own: ``consistency_weight`` (default the ``AdaMixConfig``'s; 0: one routed
    pass), ``unrouted_experts`` (``"zero_grad"``, the paper's runs and the launcher's default, or ``"untouched"``:
    ``adamix_ds.optim``), ``expert_lr_scale`` and ``decay_biases`` (``adamw_param_groups``), and ``family``: the task
    family whose logits and loss train and evaluate the model, and whose record (task, template, label words,
    decoding) the saved adapters keep.
    """

    def __init__(
        self,
        *args: Any,
        consistency_weight: float | None = None,
        unrouted_experts: UnroutedExperts = "zero_grad",
        expert_lr_scale: float = 1.0,
        decay_biases: bool = False,
        family: TaskFamily | None = None,
        **kwargs: Any,
    ) -> None:
        if consistency_weight is not None and consistency_weight < 0:
            raise ValueError(f"consistency_weight={consistency_weight} is invalid: allowed a number >= 0")
        if unrouted_experts not in UNROUTED_EXPERTS:
            raise ValueError(f"unrouted_experts={unrouted_experts!r} is invalid: allowed {', '.join(UNROUTED_EXPERTS)}")
        if expert_lr_scale <= 0:
            raise ValueError(f"expert_lr_scale={expert_lr_scale} is invalid: allowed a number > 0")
        _count_ranks_on_cpu_hosts(kwargs["args"] if "args" in kwargs else args[1] if len(args) > 1 else None)
        super().__init__(*args, **kwargs)
        config = get_config(self.model)  # a model without AdaMix fails here, not at the first step
        self.consistency_weight = config.consistency_weight if consistency_weight is None else consistency_weight
        self.unrouted_experts = unrouted_experts
        self.expert_lr_scale = expert_lr_scale
        self.decay_biases = decay_biases
        self.family = family
        _recompute_with_routes(self.model)
        if family is not None:
            self.model.adamix_task = family.record()  # saved with the adapters: how to read inputs later
        # compute_loss returns each micro-batch's mean loss, as the launcher's: the Trainer divides it by the
        # accumulation steps (DeepSpeed's engine does so itself).
        self.loss_is_scaled_for_ga = False
        self._window: LossWindow | None = None  # the losses since the last log line, made on the first batch's device
        self.add_callback(_ExpertStepInstaller(self))
        if self.is_deepspeed_enabled:
            _fill_monitor_paths(self.accelerator.state.deepspeed_plugin.hf_ds_config.config, Path(self.args.output_dir))

    # -- the loss ---------------------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training: the AdaMix loss of ``inputs`` (two routed passes); evaluation: the task loss of one pass under
        the eval mode (the merged experts by default), with the logits the family compares."""
        # The tensors the model's forward takes: a collator's bookkeeping (TRL's completion_mask, folded into labels) stays out.
        batch = {key: value for key, value in inputs.items() if torch.is_tensor(value) and key not in _BOOKKEEPING}
        weight = self.consistency_weight if model.training else 0.0
        out = self._adamix_loss(model, batch, weight)
        if model.training:
            if self._window is None:
                self._window = LossWindow(out.loss.device)
            self._window.add(out)
        return (out.loss, {"logits": out.logits}) if return_outputs else out.loss

    def _adamix_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], weight: float) -> AdaMixLoss:
        if self.family is not None:
            return self.family.train_loss(model, batch, weight)
        return adamix_loss(model, batch, weight)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log line, with the mean task and consistency losses since the last one over every rank
        (``LossWindow``, the launcher's: summed on the device, read once here; every rank logs at the same steps)."""
        if "loss" in logs and self._window is not None:
            means = self._window.close(preempted=False)
            if means.micro_batches:
                logs = {**logs, "task_loss": round(means.task_loss, 4), "consistency_loss": round(means.consistency_loss, 6)}
        super().log(logs, start_time)

    # -- the optimizer ----------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """AdamW with the launcher's parameter groups. Under DeepSpeed with an ``optimizer`` section the engine
        builds it: it then takes these groups as its parameters (the Trainer would pass one flat group)."""
        groups = adamw_param_groups(self.model, self.args.learning_rate, self.args.weight_decay, self.expert_lr_scale, self.decay_biases)
        if self.optimizer is None:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        elif type(self.optimizer).__name__ == "DummyOptim":  # accelerate's stand-in for the DeepSpeed config's
            self.optimizer.params = groups
        return self.optimizer

    # -- saving and loading ------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write ``output_dir/adapter`` (the experts' merge) and ``output_dir/experts``, whole under ZeRO-3, with the
        tokenizer and the training arguments beside them. Every rank calls it (gathers are collective)."""
        output_dir = Path(output_dir or self.args.output_dir)
        model = self.accelerator.unwrap_model(self.model)
        card = {"metrics": self._last_eval_metrics(), "hyperparameters": self._card_hyperparameters()}
        save_adapter(model, output_dir / ADAPTER_DIR, merged=True, **card)
        save_adapter(model, output_dir / EXPERTS_DIR, merged=False, **card)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, output_dir / "training_args.bin")
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # Without DeepSpeed: the checkpoint's experts, routing counters and head, loaded strictly.
        load_adapter(model if model is not None else self.model, Path(resume_from_checkpoint) / EXPERTS_DIR)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled:
            super()._load_best_model()
        else:
            load_adapter(self.model, Path(self.state.best_model_checkpoint) / EXPERTS_DIR)

    def _last_eval_metrics(self) -> dict[str, float] | None:
        evaluations = [entry for entry in self.state.log_history if any(key.startswith("eval_") for key in entry)]
        if not evaluations:
            return None
        return {key: value for key, value in evaluations[-1].items() if key.startswith("eval_") and isinstance(value, (int, float))}

    def _card_hyperparameters(self) -> dict[str, Any]:
        args = self.args
        return {
            "trainer": type(self).__name__,
            "learning_rate": args.learning_rate,
            "train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
            "total_steps": self.state.max_steps,
            "lr_scheduler_type": str(args.lr_scheduler_type),
            "weight_decay": args.weight_decay,
            "consistency_weight": self.consistency_weight,
            "unrouted_experts": self.unrouted_experts,
            "world_size": args.world_size,
            "seed": args.seed,
        }


def _recompute_with_routes(model: nn.Module) -> None:
    """Make the Trainer's activation checkpointing (``--gradient_checkpointing``, on by default in TRL) recompute each
    block with the experts its forward drew: it calls ``model.activation_checkpointing_enable`` with the user's
    ``activation_checkpointing_kwargs``, to which this adds ``routing_checkpoint_kwargs``."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None or getattr(enable, "_adamix_routes", False):
        return

    def enable_with_routes(activation_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        return enable(activation_checkpointing_kwargs={**(activation_checkpointing_kwargs or {}), **routing_checkpoint_kwargs()}, **kwargs)

    enable_with_routes._adamix_routes = True
    model.activation_checkpointing_enable = enable_with_routes


def _count_ranks_on_cpu_hosts(training_args: Any) -> None:
    """Make accelerate count every rank of a DeepSpeed job on a host without an accelerator device (CPU ranks).

    accelerate 1.16 finds no distributed backend there, so its process state says one process although DeepSpeed
    started the process group with all of them: every rank would save, load every batch, and the Trainer would
    give DeepSpeed a global batch of one rank ("train_batch_size 4 != 4 * 1 * 2"). The state is shared by every
    accelerate object of the process; corrected here, before the Trainer reads it. GPU hosts never disagree.
    """
    import torch.distributed as dist
    from accelerate import PartialState

    if not dist.is_initialized():
        return
    state = PartialState()
    world_size = dist.get_world_size()
    if state.num_processes == world_size:
        return
    state.num_processes, state.process_index = world_size, dist.get_rank()
    state.local_process_index = int(os.environ.get("LOCAL_RANK", 0))
    ds_config = getattr(getattr(training_args, "hf_deepspeed_config", None), "config", None)
    if ds_config is not None:  # the Trainer filled "auto" for one rank in TrainingArguments
        per_rank = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
        if ds_config.get("train_batch_size") == per_rank:
            ds_config["train_batch_size"] = per_rank * world_size


def _fill_monitor_paths(ds_config: dict[str, Any], output_dir: Path) -> None:
    """Give the monitors that ``ds_configs/`` leave on ``"auto"`` the launcher's values (``monitor_paths``): the Trainer
    fills only the values it knows, and accelerate refuses a config with any ``"auto"`` left."""
    values = dict(zip(("output_path", "job_name"), monitor_paths(output_dir, output_dir.name), strict=True))
    for monitor in ("tensorboard", "csv_monitor", "wandb", "comet"):
        section = ds_config.get(monitor)
        if isinstance(section, dict):
            section.update({key: value for key, value in values.items() if section.get(key) == AUTO})


# Collated tensors that are not model inputs: TRL's masks, already applied to the labels.
_BOOKKEEPING = frozenset({"completion_mask", "assistant_masks"})


class _ExpertStepInstaller(TrainerCallback):
    """Puts ``ExpertStepGuard`` around the optimizer step once the Trainer has prepared it: around the DeepSpeed
    engine's step at accumulation boundaries (accelerate steps the engine inside ``backward``), else around
    the prepared optimizer's step (the Trainer calls it at each boundary)."""

    def __init__(self, trainer: AdaMixTrainerMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        if trainer.is_deepspeed_enabled:
            from adamix_ds.optim_deepspeed import DeepSpeedOptimizerAccess

            engine = trainer.model_wrapped
            guard = ExpertStepGuard(engine.module, DeepSpeedOptimizerAccess(engine), trainer.unrouted_experts)
            _wrap_step(engine, guard, engine.is_gradient_accumulation_boundary)
        else:
            optimizer = trainer.optimizer
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer around torch's
            guard = ExpertStepGuard(trainer.model, TorchOptimizerAccess(inner), trainer.unrouted_experts)
            _wrap_step(optimizer, guard, lambda: True)


def _wrap_step(owner: Any, guard: ExpertStepGuard, at_boundary: Callable[[], bool]) -> None:
    """Replace ``owner.step`` with the guarded step at accumulation boundaries (once: a second ``train()`` keeps it)."""
    if getattr(owner, "_adamix_guarded", False):
        return
    step = owner.step

    @functools.wraps(step)  # keeps the marks of an lr scheduler's wrapper, which checks them
    def guarded_step(*args: Any, **kwargs: Any) -> Any:
        if at_boundary():
            return guard.step(lambda: step(*args, **kwargs))
        return step(*args, **kwargs)

    owner.step = guarded_step
    owner._adamix_guarded = True


class AdaMixTrainer(AdaMixTrainerMixin, Trainer):
    """``transformers.Trainer`` that trains AdaMix: see ``AdaMixTrainerMixin``."""


def adamix_sft_trainer() -> type:
    """TRL's ``SFTTrainer`` with ``AdaMixTrainerMixin`` (``pip install adamix-ds[trl]``): causal-LM fine-tuning on
    TRL's datasets and collators, with the consistency loss at the completion tokens."""
    try:
        from trl import SFTTrainer
    except ImportError:
        raise ImportError("adamix_sft_trainer needs TRL: pip install 'adamix-ds[trl]'") from None
    return type("AdaMixSFTTrainer", (AdaMixTrainerMixin, SFTTrainer), {"__doc__": "TRL's SFTTrainer that trains AdaMix."})
