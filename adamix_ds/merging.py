"""Merges of the experts beyond the paper's uniform average (a "model soup", which it cites with Fisher merging).

A merge gives every routed projection (one with more than one expert) weights over its experts that sum to one;
``set_merge`` hands them to the layers, whose ``merged_weights`` (the ``merged`` eval mode, ``save_adapter(merged=
True)``, ``merge_adamix``) then use them instead of the uniform average. Expert ``k`` of a model is index ``k`` of
every routed projection (down ``k`` with the shared up in the paper's setting).

* ``uniform``: the paper's average (Wortsman et al. 2022's uniform soup).
* ``greedy_soup``: experts sorted by their own score on held-out data, each added to the uniform average of the
  chosen ones only if the soup's score does not drop (Wortsman et al. 2022).
* ``best_expert``: the one expert with the best score on held-out data (the soup's first ingredient), alone: the
  single-expert baseline where scoring every expert on the reported split costs too much (E2E's beam search).
* ``fisher``: per element, ``sum_k F_k W_k / sum_k F_k`` with ``F_k`` expert ``k``'s diagonal Fisher, the squared
  gradients of the log-likelihood under its fixed routing (Matena & Raffel 2021); where every ``F_k`` is zero the
  average stays uniform.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adamix_ds.model import adamix_layers, get_config, set_eval_mode
from adamix_ds.routing import Projection

# Per AdaMix layer (by module name): weights per expert parameter, in ``expert_parameters`` order (None: uniform).
Coefficients = dict[str, tuple[torch.Tensor | None, ...] | None]


def num_experts(model: nn.Module) -> int:
    """``M``: the experts of the model's routed projections (1 when every projection is shared)."""
    layer = next(layer for _, layer in adamix_layers(model))
    return max(layer.experts_in(p) for p in Projection)


def expert_route(model: nn.Module, expert: int) -> tuple[int, int]:
    """The ``(down, up)`` route of expert ``expert``: that index in each routed projection, 0 in a shared one."""
    layer = next(layer for _, layer in adamix_layers(model))
    return tuple(expert if layer.experts_in(p) > 1 else 0 for p in Projection)


def set_merge(model: nn.Module, coefficients: Coefficients | None) -> None:
    """Merge the experts of every layer with ``coefficients`` from now on (``None``: the uniform average)."""
    for name, layer in adamix_layers(model):
        layer.set_merge_coefficients(None if coefficients is None else coefficients[name])


def same_merge(first: Coefficients | None, second: Coefficients | None) -> bool:
    """Whether two merges weight every expert parameter alike (a model merged either way computes the same)."""
    if first is None or second is None:
        return first is second
    if first.keys() != second.keys():
        return False
    for name, entries in first.items():
        others = second[name]
        if entries is None or others is None:
            if entries is not others:
                return False
            continue
        if len(entries) != len(others):
            return False
        for mine, theirs in zip(entries, others, strict=True):
            if (mine is None) != (theirs is None) or (mine is not None and not torch.equal(mine, theirs)):
                return False
    return True


def _routed(layer: nn.Module) -> list[bool]:
    """Per expert parameter of ``layer``: whether it belongs to a routed projection."""
    routed = {id(p) for projection in Projection if layer.experts_in(projection) > 1 for p in layer.projection_parameters(projection)}
    return [id(p) in routed for p in layer.expert_parameters()]


def soup_coefficients(model: nn.Module, experts: Sequence[int]) -> Coefficients:
    """The uniform average of the experts ``experts`` (a "soup" of them), as coefficients."""
    if not experts:
        raise ValueError("a soup needs at least one expert")
    coefficients: Coefficients = {}
    for name, layer in adamix_layers(model):
        entries = []
        for param, routed in zip(layer.expert_parameters(), _routed(layer), strict=True):
            if not routed:
                entries.append(None)
                continue
            shape = getattr(param, "ds_shape", param.shape)
            # On the parameter's device, in fp32: merge_tensors multiplies them with the parameter there.
            weights = [1.0 / len(experts) if k in experts else 0.0 for k in range(shape[0])]
            entries.append(torch.tensor(weights, device=param.device).view(shape[0], *[1] * (len(shape) - 1)))
        coefficients[name] = tuple(entries)
    return coefficients


@dataclass
class GreedySoup:
    """What ``greedy_soup`` chose: each expert's own score, the order tried, the experts kept, the soup's score."""

    expert_scores: list[float]
    order: list[int]
    chosen: list[int]
    score: float
    coefficients: Coefficients

    def summary(self) -> dict[str, Any]:
        """The choice as plain JSON (without the coefficients)."""
        return {"expert_scores": self.expert_scores, "order": self.order, "chosen": self.chosen, "score": self.score}


def expert_scores(model: nn.Module, score: Callable[[], float]) -> list[float]:
    """Each expert's own ``score()`` (higher is better) under its fixed routing, expert ``k`` at index ``k``. The
    model's eval mode is restored afterwards."""
    config = get_config(model)
    try:
        scores = []
        for expert in range(num_experts(model)):
            set_eval_mode(model, "fixed", eval_route=expert_route(model, expert))
            scores.append(float(score()))
    finally:
        set_eval_mode(model, config.eval_mode, config.eval_expert)
    return scores


def greedy_soup(model: nn.Module, score: Callable[[], float], scores: Sequence[float] | None = None) -> GreedySoup:
    """Wortsman et al.'s greedy soup over the experts of ``model``: ``score()`` evaluates the model as it is set
    (higher is better) on held-out data that must be neither trained on nor reported; ``scores``, each expert's
    own ``expert_scores(model, score)`` where already known. The model's eval mode and merge are restored
    afterwards."""
    config = get_config(model)
    previous = {name: layer.merge_coefficients for name, layer in adamix_layers(model)}
    scores = expert_scores(model, score) if scores is None else [float(s) for s in scores]
    order = sorted(range(len(scores)), key=lambda k: -scores[k])  # stable: ties keep the lower index first
    chosen, best = [order[0]], scores[order[0]]  # a soup of one expert is that expert
    try:
        set_eval_mode(model, "merged")
        for expert in order[1:]:
            set_merge(model, soup_coefficients(model, [*chosen, expert]))
            candidate = float(score())
            if candidate >= best:
                chosen, best = [*chosen, expert], candidate
    finally:
        set_eval_mode(model, config.eval_mode, config.eval_expert)
        set_merge(model, previous)
    return GreedySoup(scores, order, chosen, best, soup_coefficients(model, chosen))


def fisher_diagonals(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], loss: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]
) -> dict[str, tuple[torch.Tensor | None, ...]]:
    """Each expert's diagonal Fisher: the squared gradients of ``loss`` (a negative log-likelihood) under the
    expert's fixed routing, summed over ``batches``, for every parameter of a routed projection (None for the
    others), stacked like the parameter (``[M, ...]``). The model runs in eval mode (no dropout); its eval mode
    is restored afterwards. Needs whole parameters (not ZeRO-3 partitions)."""
    config = get_config(model)
    was_training = model.training
    batches = list(batches)
    layers = list(adamix_layers(model))
    targets = [
        (name, index, param)
        for name, layer in layers
        for index, (param, routed) in enumerate(zip(layer.expert_parameters(), _routed(layer), strict=True))
        if routed
    ]
    if any(hasattr(param, "ds_id") for _, _, param in targets):
        raise ValueError(
            "fisher merging needs whole parameters: ZeRO-3 partitions them (use ZeRO 0-2, or launchers/evaluate.py on the experts)"
        )
    fisher = {(name, index): torch.zeros_like(param, dtype=torch.float32) for name, index, param in targets}
    model.eval()
    try:
        for expert in range(num_experts(model)):
            set_eval_mode(model, "fixed", eval_route=expert_route(model, expert))
            for batch in batches:
                grads = torch.autograd.grad(loss(model, batch), [param for _, _, param in targets], allow_unused=True)
                for (name, index, _), grad in zip(targets, grads, strict=True):
                    if grad is not None:
                        fisher[name, index][expert] += grad[expert].float() ** 2
    finally:
        set_eval_mode(model, config.eval_mode, config.eval_expert)
        model.train(was_training)
    return {name: tuple(fisher.get((name, index)) for index in range(len(layer.expert_parameters()))) for name, layer in layers}


def fisher_coefficients(fisher: Mapping[str, tuple[torch.Tensor | None, ...]]) -> Coefficients:
    """Coefficients ``F_k / sum_k F_k`` per element from ``fisher_diagonals``; uniform where the sum is zero."""
    coefficients: Coefficients = {}
    for name, entries in fisher.items():
        merged = []
        for values in entries:
            if values is None:
                merged.append(None)
                continue
            total = values.sum(dim=0, keepdim=True)
            uniform = torch.full_like(values, 1.0 / values.shape[0])
            merged.append(torch.where(total > 0, values / total.clamp_min(torch.finfo(values.dtype).tiny), uniform))
        coefficients[name] = tuple(merged)
    return coefficients
