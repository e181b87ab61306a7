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


class OptimizerAccess(Protocol):
    """How to read and write a parameter's master weights and per-element optimizer state."""

    def get_param(self, param: nn.Parameter) -> torch.Tensor: ...

    def set_param(self, param: nn.Parameter, value: torch.Tensor) -> None: ...

    def state_keys(self, param: nn.Parameter) -> list[str]: ...

    def get_state(self, param: nn.Parameter, key: str) -> torch.Tensor | None: ...

    def set_state(self, param: nn.Parameter, key: str, value: torch.Tensor) -> None: ...


class TorchOptimizerAccess:
    """``OptimizerAccess`` for a plain ``torch.optim`` optimizer that owns the parameters directly."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def get_param(self, param: nn.Parameter) -> torch.Tensor:
        return param.detach().clone()

    def set_param(self, param: nn.Parameter, value: torch.Tensor) -> None:
        with torch.no_grad():
            param.copy_(value)

    def state_keys(self, param: nn.Parameter) -> list[str]:
        # AdamW's exp_avg / exp_avg_sq (and max_exp_avg_sq); after the first step the state exists.
        return [k for k, v in self.optimizer.state.get(param, {}).items() if torch.is_tensor(v) and v.shape == param.shape]

    def get_state(self, param: nn.Parameter, key: str) -> torch.Tensor | None:
        value = self.optimizer.state.get(param, {}).get(key)
        return None if value is None else value.detach().clone()

    def set_state(self, param: nn.Parameter, key: str, value: torch.Tensor) -> None:
        self.optimizer.state[param][key].copy_(value)


class ExpertStepGuard:
    """Runs optimizer steps with the chosen semantics for experts unrouted since the previous step.

    Call ``guard.step(optimizer.step)`` (or ``guard.step(engine.step)`` at a gradient-accumulation
    boundary) instead of the bare step. With ``unrouted="untouched"`` the step leaves those experts as they
    were; with ``"zero_grad"`` it acts on their zero gradients like on any other (the module docstring says
    which reference run each matches). Routing is identical on every rank, so every rank restores the same
    slices.
    """

    def __init__(self, model: nn.Module, access: OptimizerAccess, unrouted: UnroutedExperts = "untouched") -> None:
        if unrouted not in UNROUTED_EXPERTS:
            raise ValueError(f"unrouted={unrouted!r} is invalid: allowed {', '.join(UNROUTED_EXPERTS)}")
        self.model = model
        self.access = access
        self.unrouted = unrouted

    def _unrouted(self) -> list[tuple[nn.Parameter, list[int]]]:
        """The expert slices to restore around the step: none unless unrouted experts stay untouched."""
        if self.unrouted == "zero_grad":
            return []
        result = []
        for _, layer in adamix_layers(self.model):
            for projection in Projection:
                unused = [k for k in range(layer.experts_in(projection)) if k not in layer.routed[projection]]
                if unused:
                    result.extend((param, unused) for param in layer.projection_parameters(projection) if param.requires_grad)
        return result

    def step(self, step_fn: Callable[[], T]) -> T:
        """Run ``step_fn`` (the optimizer step); with ``untouched``, undo its effect on unrouted expert slices."""
        saved: list[tuple[nn.Parameter, list[int], torch.Tensor, dict[str, torch.Tensor | None]]] = []
        for param, unused in self._unrouted():
            states = {key: self.access.get_state(param, key) for key in self.access.state_keys(param)}
            saved.append(
                (param, unused, self.access.get_param(param)[unused], {k: v if v is None else v[unused] for k, v in states.items()})
            )
        result = step_fn()
        for param, unused, weights, states in saved:
            full = self.access.get_param(param)
            full[unused] = weights.to(full.dtype)
            self.access.set_param(param, full)
            for key in self.access.state_keys(param):
                value = self.access.get_state(param, key)
                # A state created by this very step started from zero, as it would have for an unused expert.
                value[unused] = 0 if states.get(key) is None else states[key].to(value.dtype)
                self.access.set_state(param, key, value)
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
