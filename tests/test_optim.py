"""Reference optimizer semantics: an expert not routed to is neither moved nor decayed by a step (``untouched``),
or stepped on its zero gradient as in the paper's runs (``zero_grad``); the optimizer's parameter groups (weight
decay, and a learning-rate scale for the routed experts)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adamix_ds import AdaMixBottleneck, AdaMixConfig, ExpertStepGuard, TorchOptimizerAccess, add_adamix
from adamix_ds.model import adamix_layers
from adamix_ds.optim import adamw_param_groups
from adamix_ds.routing import Projection

from tiny_models import tiny_classifier

EXPERTS, HIDDEN, RANK = 4, 16, 4
LR = 1.0  # a group's learning rate is then its multiple of the run's


def routed_layer() -> AdaMixBottleneck:
    torch.manual_seed(0)
    layer = AdaMixBottleneck(nn.Linear(HIDDEN, HIDDEN), AdaMixConfig(bottleneck_dim=RANK, num_experts=EXPERTS, share_up=False), 0)
    layer.base_layer.requires_grad_(False)
    return layer.train()


def test_one_step_matches_per_parameter_adamw_with_unrouted_experts_left_alone():
    layer = routed_layer()
    names = ["down_weight", "down_bias", "up_weight", "up_bias"]
    # The reference code: one parameter per expert, an unrouted expert has no gradient at all.
    reference = {name: [nn.Parameter(getattr(layer, name)[k].detach().clone()) for k in range(EXPERTS)] for name in names}
    optimizer = torch.optim.AdamW(layer.expert_parameters(), lr=0.1, weight_decay=0.1)
    reference_optimizer = torch.optim.AdamW([p for ps in reference.values() for p in ps], lr=0.1, weight_decay=0.1)
    before = {name: getattr(layer, name).detach().clone() for name in names}

    layer(torch.randn(8, HIDDEN)).pow(2).sum().backward()
    (down,), (up,) = layer.routed[Projection.DOWN], layer.routed[Projection.UP]
    for name in names:
        chosen = down if name.startswith("down") else up
        for k, param in enumerate(reference[name]):
            param.grad = getattr(layer, name).grad[k].clone() if k == chosen else None
    ExpertStepGuard(layer, TorchOptimizerAccess(optimizer)).step(optimizer.step)
    reference_optimizer.step()

    for name in names:
        chosen = down if name.startswith("down") else up
        for k in range(EXPERTS):
            torch.testing.assert_close(getattr(layer, name)[k], reference[name][k].detach(), rtol=0, atol=1e-7)
            if k != chosen:
                assert torch.equal(getattr(layer, name)[k], before[name][k])
                state = optimizer.state[getattr(layer, name)]
                assert torch.count_nonzero(state["exp_avg"][k]) == 0 and torch.count_nonzero(state["exp_avg_sq"][k]) == 0
    assert layer.routed[Projection.DOWN] == set()  # usage is reset for the next step


def test_plain_adamw_without_the_guard_moves_unrouted_experts():
    layer = routed_layer()
    optimizer = torch.optim.AdamW(layer.expert_parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(2):  # the second step has momentum from the first
        before = layer.down_weight.detach().clone()
        layer(torch.randn(8, HIDDEN)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    (down,) = layer.routed[Projection.DOWN]
    unrouted = [k for k in range(EXPERTS) if k != down]
    assert not torch.equal(layer.down_weight[unrouted], before[unrouted])


def test_zero_grad_matches_per_parameter_adamw_whose_unrouted_experts_have_zero_gradients():
    """The paper's runs: once routed, an expert's gradient is zeroed, not dropped, so every later step moves it
    along its momentum and decays it. The first step routes every expert, as the reference needs a gradient."""
    layer = routed_layer()
    names = ["down_weight", "down_bias", "up_weight", "up_bias"]
    reference = {name: [nn.Parameter(getattr(layer, name)[k].detach().clone()) for k in range(EXPERTS)] for name in names}
    optimizer = torch.optim.AdamW(layer.expert_parameters(), lr=0.05, weight_decay=0.1)
    reference_optimizer = torch.optim.AdamW([p for ps in reference.values() for p in ps], lr=0.05, weight_decay=0.1)
    guard = ExpertStepGuard(layer, TorchOptimizerAccess(optimizer), unrouted="zero_grad")
    unrouted_moved = False
    for step in range(6):
        before = layer.down_weight.detach().clone()
        layer(torch.randn(8, HIDDEN)).pow(2).sum().backward()
        while step == 0 and any(len(used) < EXPERTS for used in layer.routed.values()):
            layer(torch.randn(8, HIDDEN)).pow(2).sum().backward()
        used = set(layer.routed[Projection.DOWN])
        for name in names:
            for k, param in enumerate(reference[name]):
                param.grad = getattr(layer, name).grad[k].clone()  # zero for an expert no pass routed to
        guard.step(optimizer.step)
        reference_optimizer.step()
        optimizer.zero_grad()
        unrouted_moved |= any(not torch.equal(layer.down_weight[k], before[k]) for k in range(EXPERTS) if k not in used)
        for name in names:
            for k in range(EXPERTS):
                torch.testing.assert_close(getattr(layer, name)[k], reference[name][k].detach(), rtol=0, atol=1e-6)
        assert layer.routed[Projection.DOWN] == set()
    assert unrouted_moved


def test_the_guard_refuses_an_unknown_semantics():
    layer = routed_layer()
    with pytest.raises(ValueError, match="unrouted='frozen' is invalid: allowed untouched, zero_grad"):
        ExpertStepGuard(layer, TorchOptimizerAccess(torch.optim.AdamW(layer.expert_parameters())), unrouted="frozen")


def test_over_many_steps_each_step_touches_only_its_routed_experts():
    layer = routed_layer()
    optimizer = torch.optim.AdamW(layer.expert_parameters(), lr=0.05, weight_decay=0.1)
    guard = ExpertStepGuard(layer, TorchOptimizerAccess(optimizer))
    touched = set()
    for _ in range(12):
        snapshot = layer.down_weight.detach().clone()
        moments = {k: v.clone() for k, v in optimizer.state[layer.down_weight].items()} if optimizer.state else {}
        for _ in range(2):  # two passes per step, as with the consistency loss
            layer(torch.randn(8, HIDDEN)).pow(2).sum().backward()
        used = set(layer.routed[Projection.DOWN])
        guard.step(optimizer.step)
        optimizer.zero_grad()
        touched |= used
        for k in range(EXPERTS):
            moved = not torch.equal(layer.down_weight[k], snapshot[k])
            assert moved == (k in used)
            if k not in used and moments:
                assert torch.equal(optimizer.state[layer.down_weight]["exp_avg"][k], moments["exp_avg"][k])
    assert touched == set(range(EXPERTS))


def _groups_by_name(model: nn.Module, expert_lr_scale: float) -> list[tuple[float, float, set[str]]]:
    names = {param: name for name, param in model.named_parameters()}
    return [
        (group["weight_decay"], group["lr"] / LR, {names[p] for p in group["params"]})
        for group in adamw_param_groups(model, LR, 0.1, expert_lr_scale)
    ]


def test_param_groups_without_scaling_are_the_recipes_two():
    model = add_adamix(tiny_classifier("bert"), AdaMixConfig(bottleneck_dim=4, num_experts=EXPERTS))
    (decay, scale, weights), (no_decay, other_scale, biases) = _groups_by_name(model, 1.0)
    assert (decay, no_decay, scale, other_scale) == (0.1, 0.0, 1.0, 1.0)
    assert weights | biases == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(name.endswith("bias") for name in biases) and not any(name.endswith("bias") for name in weights)
    # The reference E2E code's grouping: one group, every trainable parameter decayed.
    (everything,) = adamw_param_groups(model, LR, 0.1, decay_biases=True)
    assert (
        everything["weight_decay"] == 0.1
        and everything["lr"] == LR
        and {id(p) for p in everything["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    )


@pytest.mark.parametrize("share_up", [True, False])
def test_expert_lr_scale_puts_exactly_the_routed_experts_in_groups_of_their_own(share_up):
    model = add_adamix(tiny_classifier("bert"), AdaMixConfig(bottleneck_dim=4, num_experts=EXPERTS, share_up=share_up))
    groups = _groups_by_name(model, 2.5)
    scaled = set().union(*(names for _, scale, names in groups if scale == 2.5))
    routed = {"down_weight", "down_bias"} | (set() if share_up else {"up_weight", "up_bias"})
    expected = {f"{layer}.{name}" for layer, _ in adamix_layers(model) for name in routed}
    assert scaled == expected and len(groups) == 4
    assert [(decay, scale) for decay, scale, _ in groups] == [(0.1, 1.0), (0.0, 1.0), (0.1, 2.5), (0.0, 2.5)]
    # The head (and a shared up projection) are trained every step: the run's learning rate.
    unscaled = set().union(*(names for _, scale, names in groups if scale == 1.0))
    assert unscaled == {n for n, p in model.named_parameters() if p.requires_grad} - expected
    assert any("classifier" in name for name in unscaled) and any(name.endswith("up_weight") for name in unscaled) == share_up
