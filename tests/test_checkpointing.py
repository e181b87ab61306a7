"""Activation checkpointing: the recompute in the backward uses the experts the forward drew."""

from __future__ import annotations

import copy

import pytest
import torch
from test_consistency import relative_deberta
from torch.utils.checkpoint import checkpoint

from adamix_ds import AdaMixConfig, adamix_loss, add_adamix, enable_activation_checkpointing, routing_context_fn
from adamix_ds.model import adamix_layers

from test_architectures import adamix_model
from tiny_models import token_batch


def loss_and_grads(model, consistency_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(7)  # dropout: checkpoint restores this state for the recompute
    loss = adamix_loss(model, token_batch(batch=4, length=12, seed=3), consistency_weight).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("consistency_weight", [0.0, 1.0])
def test_checkpointed_step_equals_the_plain_step(model_type, adapter_type, consistency_weight):
    plain = adamix_model(model_type, adapter_type).train()
    checkpointed = copy.deepcopy(plain)
    enable_activation_checkpointing(checkpointed)
    for _ in range(2):  # the second step routes from advanced counters
        expected_loss, expected = loss_and_grads(plain, consistency_weight)
        loss, grads = loss_and_grads(checkpointed, consistency_weight)
        torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-6)
        assert grads.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
        for (_, a), (_, b) in zip(adamix_layers(plain), adamix_layers(checkpointed), strict=True):
            assert (a.forward_count, a.routed) == (b.forward_count, b.routed)
        plain.zero_grad(set_to_none=True)
        checkpointed.zero_grad(set_to_none=True)


def test_checkpointed_relative_positions_reuse_the_forward_experts():
    """DeBERTa-v2's relative positions go through the AdaMix query_proj a second time per pass; the recompute
    must route both calls as the forward did."""
    config = AdaMixConfig(adapter_type="lora", bottleneck_dim=4, num_experts=4, share_up=False)
    plain = add_adamix(relative_deberta(), config).train()
    checkpointed = copy.deepcopy(plain)
    enable_activation_checkpointing(checkpointed)
    for _ in range(2):
        expected_loss, expected = loss_and_grads(plain, 1.0)
        loss, grads = loss_and_grads(checkpointed, 1.0)
        torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-6)
        for name in expected:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
        plain.zero_grad(set_to_none=True)
        checkpointed.zero_grad(set_to_none=True)
    assert [layer.forward_count for _, layer in adamix_layers(checkpointed)] == [4] * 4


def test_the_checkpoint_actually_recomputes():
    model = adamix_model("bert", "bottleneck").train()
    enable_activation_checkpointing(model)
    layer = next(adamix_layers(model))[1]
    calls = []
    layer.register_forward_hook(lambda module, args, output: calls.append(torch.is_grad_enabled()))
    adamix_loss(model, token_batch(), 0.0).loss.backward()
    assert len(calls) == 2  # the forward, then the recompute inside the backward
    assert layer.forward_count == 1  # which drew nothing new


@pytest.mark.parametrize("how", ["transformers default", "reentrant"])
def test_checkpointing_without_the_route_replay_is_an_error(how):
    model = adamix_model("bert", "bottleneck").train()
    if how == "reentrant":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:
        model.activation_checkpointing_enable()
    loss = adamix_loss(model, token_batch(), 0.0).loss
    with pytest.raises(RuntimeError, match="enable_activation_checkpointing"):
        loss.backward()


def test_routing_context_fn_with_torch_checkpoint_and_a_retained_graph():
    model = adamix_model("bert", "bottleneck").train()
    layer = next(adamix_layers(model))[1]
    x = torch.randn(2, 5, 64, requires_grad=True)
    out = checkpoint(layer, x, use_reentrant=False, context_fn=routing_context_fn).sum()
    out.backward(retain_graph=True)
    out.backward()  # a second backward recomputes again, with the same routes
    expected = x.grad.clone()
    x.grad = None
    # The same forward counter without checkpointing gives the same gradient.
    layer.forward_count -= 1
    plain = layer(x).sum()
    plain.backward(retain_graph=True)
    plain.backward()
    torch.testing.assert_close(x.grad, expected)
    assert layer.forward_count == 1
