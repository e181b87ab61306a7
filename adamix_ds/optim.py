"""Optimizer semantics for stacked experts: what an optimizer step does to an expert no pass routed to.

In the reference code every expert is its own parameter, and what the step does to an unused one depends
on how its gradient was cleared (``UNROUTED_EXPERTS``):

* ``zero_grad``: the paper's runs (transformers 4.4's ``Trainer`` on PyTorch 1.x, whose ``zero_grad()``
  zeroes gradients instead of dropping them) give every expert that was routed once a zero gradient at
  every later step, so AdamW keeps moving it along its momentum, decays its second moment and its weights.
  Stacked experts get exactly that from a plain optimizer step: their unrouted slices' gradients are zero.
  Before an expert's first routing the reference skipped it (gradient ``None``) where the stacked step
  decays its weights (its Adam update is exactly zero: zero moments), a few steps at the start of a run.
* ``untouched``: with gradients set to ``None`` (PyTorch 2's ``zero_grad()``), AdamW neither moves nor
  decays an unused expert, and its moments stay as they were. ``ExpertStepGuard`` gives stacked experts
  this: it restores the unrouted slices (weights and every per-element optimizer state) around each step.
  One difference remains by construction: the optimizer's step counter (bias correction) is per tensor,
  so an expert that sat out some steps is bias-corrected with the tensor's count, not its own.

With ``untouched`` each expert moves only in the steps that route it, and its second moment averages its
gradients over those steps only; with ``zero_grad`` the second moment averages over every step, zeros
included, so the same gradients move an expert further (about 1/sqrt(routed share of the steps) as far).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol, TypeVar, get_args

import torch
from torch import nn

from adamix_ds.model import adamix_layers
from adamix_ds.routing import Projection

T = TypeVar("T")

UnroutedExperts = Literal["untouched", "zero_grad"]
UNROUTED_EXPERTS: tuple[UnroutedExperts, ...] = get_args(UnroutedExperts)


# This rank's copies of a parameter's values, by kind (``WEIGHTS``: what the forward reads; ``MASTER``: the fp32
# copy an optimizer steps where it keeps one; else a per-element optimizer state, such as AdamW's ``exp_avg``):
# each a flat tensor holding the flattened parameter's elements from an offset on.
LocalCopies = dict[str, tuple[torch.Tensor, int]]
WEIGHTS, MASTER = "weights", "master"


class OptimizerAccess(Protocol):
    """Where this rank keeps a parameter's values: the weights, the master weights and the optimizer's per-element
    state, whole or this rank's partition of them. Local only: no call communicates with another rank."""

    def local_copies(self, param: nn.Parameter) -> LocalCopies:
        """This rank's copies of ``param``'s values (``LocalCopies``); a kind this rank keeps nothing of is absent."""
        ...

    def write_local(self, param: nn.Parameter, kind: str, values: torch.Tensor) -> None:
        """Store ``values`` (the tensor ``local_copies`` gave for ``kind``, changed in place) as this rank's copy."""
        ...


class TorchOptimizerAccess:
    """``OptimizerAccess`` for a plain ``torch.optim`` optimizer that owns the parameters directly."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def local_copies(self, param: nn.Parameter) -> LocalCopies:
        # AdamW's exp_avg / exp_avg_sq (and max_exp_avg_sq), once a step has made them.
        state = self.optimizer.state.get(param, {})
        copies = {
            key: (value.detach().view(-1), 0) for key, value in state.items() if torch.is_tensor(value) and value.shape == param.shape
        }
        return {WEIGHTS: (param.detach().view(-1), 0), **copies}

    def write_local(self, param: nn.Parameter, kind: str, values: torch.Tensor) -> None:
        """Nothing to do: ``local_copies`` are views of the parameter and of the optimizer's state."""


def expert_spans(numel: int, experts: int, chosen: list[int], offset: int, length: int) -> list[tuple[int, int]]:
    """Where the ``chosen`` experts of a ``[experts, ...]`` parameter of ``numel`` elements lie in a local copy of its
    flattened elements ``[offset, offset + length)``: ``(start, end)`` positions within the copy, possibly none."""
    size = numel // experts
    spans = []
    for expert in chosen:
        start, end = max(expert * size, offset), min((expert + 1) * size, offset + length)
        if start < end:
            spans.append((start - offset, end - offset))
    return spans


class ExpertStepGuard:
    """Runs optimizer steps with the chosen semantics for experts unrouted since the previous step.

    Call ``guard.step(optimizer.step)`` (or ``guard.step(engine.step)`` at a gradient-accumulation
    boundary) instead of the bare step. With ``unrouted="untouched"`` the step leaves those experts as they
    were; with ``"zero_grad"`` it acts on their zero gradients like on any other (the module docstring says
    which reference run each matches). Routing is identical on every rank, so every rank restores the same
    experts, each in the copies it keeps: no rank communicates with another.
    """

    def __init__(self, model: nn.Module, access: OptimizerAccess, unrouted: UnroutedExperts = "untouched") -> None:
        if unrouted not in UNROUTED_EXPERTS:
            raise ValueError(f"unrouted={unrouted!r} is invalid: allowed {', '.join(UNROUTED_EXPERTS)}")
        self.model = model
        self.access = access
        self.unrouted = unrouted

    def _unrouted(self) -> list[tuple[nn.Parameter, int, list[int]]]:
        """The parameters to restore around the step, with their expert count and unrouted experts: none unless
        unrouted experts stay untouched."""
        if self.unrouted == "zero_grad":
            return []
        result = []
        for _, layer in adamix_layers(self.model):
            for projection in Projection:
                experts = layer.experts_in(projection)
                unused = [k for k in range(experts) if k not in layer.routed[projection]]
                if unused:
                    result.extend((param, experts, unused) for param in layer.projection_parameters(projection) if param.requires_grad)
        return result

    def _spans(self, param: nn.Parameter, experts: int, unused: list[int], copy: torch.Tensor, offset: int) -> list[tuple[int, int]]:
        numel = getattr(param, "ds_numel", param.numel())  # a ZeRO-3 parameter's own numel is its placeholder's
        return expert_spans(numel, experts, unused, offset, copy.numel())

    def step(self, step_fn: Callable[[], T]) -> T:
        """Run ``step_fn`` (the optimizer step); with ``untouched``, undo its effect on unrouted expert slices."""
        saved = []
        for param, experts, unused in self._unrouted():
            kept = {
                kind: [copy[start:end].clone() for start, end in self._spans(param, experts, unused, copy, offset)]
                for kind, (copy, offset) in self.access.local_copies(param).items()
            }
            saved.append((param, experts, unused, kept))
        result = step_fn()
        with torch.no_grad():
            for param, experts, unused, kept in saved:
                for kind, (copy, offset) in self.access.local_copies(param).items():
                    spans = self._spans(param, experts, unused, copy, offset)
                    if not spans:
                        continue
                    for index, (start, end) in enumerate(spans):
                        # A state created by this very step started from zero, as it would have for an unused expert.
                        copy[start:end] = kept[kind][index] if kind in kept else 0
                    self.access.write_local(param, kind, copy)
        for _, layer in adamix_layers(self.model):
            layer.reset_routed()
        return result


def routed_expert_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The parameters that hold several experts of one projection: each step trains only the routed ones."""
    return {
        param
        for _, layer in adamix_layers(model)
        for projection in Projection
        if layer.experts_in(projection) > 1
        for param in layer.projection_parameters(projection)
    }


def adamw_param_groups(
    model: nn.Module, lr: float, weight_decay: float, expert_lr_scale: float = 1.0, decay_biases: bool = False
) -> list[dict[str, Any]]:
    """The trainable parameters in the recipe's groups: weight decay on weights, none on biases and other 1-D
    parameters (``run_glue.py``'s grouping), or on every parameter with ``decay_biases`` (the reference E2E code's).

    Every group has its peak learning rate ``lr``: ``lr * expert_lr_scale`` for the routed experts
    (``routed_expert_parameters``), which then form groups of their own. A learning-rate schedule scales each
    group's own rate. Also what a DeepSpeed engine takes as ``model_parameters`` for the optimizer of its config.
    """
    experts = routed_expert_parameters(model) if expert_lr_scale != 1 else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}  # (routed expert, undecayed) -> parameters
    for name, param in model.named_parameters():
        if param.requires_grad:
            undecayed = not decay_biases and (name.endswith("bias") or param.dim() < 2)
            groups.setdefault((param in experts, undecayed), []).append(param)
    return [
        {"params": groups[key], "lr": lr * expert_lr_scale if key[0] else lr, "weight_decay": 0.0 if key[1] else weight_decay}
        for key in sorted(groups)  # decayed before undecayed, then the experts' groups: one order on every rank
    ]


def build_adamw(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters with the recipe's grouping: no decay on biases."""
    return torch.optim.AdamW(adamw_param_groups(model, lr, weight_decay), betas=betas, eps=eps)
