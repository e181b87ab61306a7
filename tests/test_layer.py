"""The mixture layers: routed, merged, ensemble and single-adapter equivalences, init, caching, routing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adamix_ds import AdaMixBottleneck, AdaMixConfig, AdaMixLoRA, add_adamix, choose_expert, set_eval_mode
from adamix_ds.model import adamix_layers
from adamix_ds.routing import Projection, Stream

from tiny_models import tiny_classifier

HIDDEN, RANK, EXPERTS = 24, 6, 4


def bottleneck(**overrides) -> AdaMixBottleneck:
    torch.manual_seed(0)
    config = AdaMixConfig(bottleneck_dim=RANK, num_experts=EXPERTS, **overrides)
    layer = AdaMixBottleneck(nn.Linear(2 * HIDDEN, HIDDEN), config, layer_id=3)
    with torch.no_grad():  # non-zero biases so that they are checked too
        layer.down_bias.normal_()
        layer.up_bias.normal_()
    return layer


def lora(out_slices=None, **overrides) -> AdaMixLoRA:
    torch.manual_seed(0)
    config = AdaMixConfig(adapter_type="lora", bottleneck_dim=RANK, num_experts=EXPERTS, lora_dropout=0.0, **overrides)
    layer = AdaMixLoRA(nn.Linear(HIDDEN, 3 * HIDDEN), config, layer_id=1, out_slices=out_slices)
    with torch.no_grad():  # B starts at zero; give it values so the delta is visible
        layer.lora_B.normal_()
    return layer


def plain_adapter(layer: AdaMixBottleneck, down: int, up: int) -> nn.Module:
    """An ordinary single adapter (no experts) holding copies of the chosen experts."""
    rank, hidden = layer.down_weight.shape[1:]
    down_proj, up_proj = nn.Linear(hidden, rank), nn.Linear(rank, hidden)
    with torch.no_grad():
        down_proj.weight.copy_(layer.down_weight[down])
        down_proj.bias.copy_(layer.down_bias[down])
        up_proj.weight.copy_(layer.up_weight[up])
        up_proj.bias.copy_(layer.up_bias[up])
    return nn.Sequential(down_proj, nn.GELU(), up_proj)


def test_routed_training_forward_equals_plain_adapter_of_the_chosen_experts():
    layer = bottleneck(share_up=False).train()
    x = torch.randn(3, 5, 2 * HIDDEN)
    for _ in range(6):
        count = layer.forward_count
        down = choose_expert(0, Stream.TRAIN, count, 3, Projection.DOWN, EXPERTS)
        up = choose_expert(0, Stream.TRAIN, count, 3, Projection.UP, EXPERTS)
        h = layer.base_layer(x)
        expected = h + plain_adapter(layer, down, up)(h)
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
        assert layer.forward_count == count + 1


def test_single_expert_equals_plain_adapter_in_every_mode():
    torch.manual_seed(0)
    layer = AdaMixBottleneck(nn.Linear(2 * HIDDEN, HIDDEN), AdaMixConfig(bottleneck_dim=RANK, num_experts=1), layer_id=0)
    x = torch.randn(2, 4, 2 * HIDDEN)
    h = layer.base_layer(x)
    expected = h + plain_adapter(layer, 0, 0)(h)
    torch.testing.assert_close(layer.train()(x), expected)
    for mode in ("merged", "random", "fixed", "ensemble"):
        layer.eval_mode = mode
        torch.testing.assert_close(layer.eval()(x), expected)


def test_merged_model_equals_merged_eval_mode():
    layer = bottleneck(share_up=False).eval()
    x = torch.randn(2, 7, 2 * HIDDEN)
    with torch.no_grad():
        before = layer(x)
        layer.merge_()
        after = layer(x)
    assert layer.down_weight.shape[0] == 1 and layer.up_weight.shape[0] == 1
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_merging_averages_weights_not_outputs():
    layer = bottleneck().eval()
    x = torch.randn(2, 7, 2 * HIDDEN)
    h = layer.base_layer(x)
    mean_down = nn.Linear(HIDDEN, RANK)
    with torch.no_grad():
        mean_down.weight.copy_(layer.down_weight.mean(0))
        mean_down.bias.copy_(layer.down_bias.mean(0))
        expected = h + F.linear(F.gelu(mean_down(h)), layer.up_weight[0], layer.up_bias[0])
        torch.testing.assert_close(layer(x), expected)


def test_ensemble_equals_mean_of_expert_outputs():
    layer = bottleneck(eval_mode="ensemble", share_up=False).eval()
    x = torch.randn(2, 3, 2 * HIDDEN)
    h = layer.base_layer(x)
    with torch.no_grad():
        expected = torch.stack([h + plain_adapter(layer, k, k)(h) for k in range(EXPERTS)]).mean(0)
        torch.testing.assert_close(layer(x), expected)


def test_fixed_mode_uses_the_named_expert_and_the_shared_up_projection():
    layer = bottleneck(eval_mode="fixed", eval_expert=2).eval()
    x = torch.randn(2, 3, 2 * HIDDEN)
    h = layer.base_layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), h + plain_adapter(layer, 2, 0)(h))


def test_fixed_route_picks_a_down_up_pair_when_neither_projection_is_shared():
    model = tiny_classifier("bert")
    add_adamix(model, AdaMixConfig(bottleneck_dim=RANK, num_experts=EXPERTS, share_up=False))
    model.eval()
    set_eval_mode(model, "fixed", eval_route=(1, 3))
    layer = next(layer for _, layer in adamix_layers(model))
    assert layer.fixed_route() == (1, 3)
    x = torch.randn(2, 3, layer.base_layer.in_features)
    h = layer.base_layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), h + plain_adapter(layer, 1, 3)(h))
    set_eval_mode(model, "fixed", eval_expert=2)
    assert layer.fixed_route() == (2, 2)
    for route, mode in (((0, EXPERTS), "fixed"), ((0, 0), "merged")):
        with pytest.raises(ValueError, match=r"eval_route=\(0, \d\) is invalid"):
            set_eval_mode(model, mode, eval_route=route)


def test_random_eval_mode_draws_from_its_own_stream():
    layer = bottleneck(eval_mode="random", share_up=False).eval()
    x = torch.randn(1, 2, 2 * HIDDEN)
    h = layer.base_layer(x)
    with torch.no_grad():
        for count in range(4):
            down = choose_expert(0, Stream.EVAL, count, 3, Projection.DOWN, EXPERTS)
            up = choose_expert(0, Stream.EVAL, count, 3, Projection.UP, EXPERTS)
            torch.testing.assert_close(layer(x), h + plain_adapter(layer, down, up)(h))
    assert layer.forward_count == 0 and layer.eval_forward_count == 4


def test_merged_cache_is_reused_and_invalidated_when_weights_change():
    layer = bottleneck().eval()
    x = torch.randn(2, 3, 2 * HIDDEN)
    with torch.no_grad():
        first = layer(x)
        cached = layer._merged_cache[1]
        layer(x)
        assert layer._merged_cache[1] is cached  # computed once
        layer.down_weight.add_(0.5)  # an in-place update, as an optimizer makes
        changed = layer(x)
    assert not torch.allclose(first, changed)
    h = layer.base_layer(x)
    with torch.no_grad():
        expected = h + F.linear(
            F.gelu(F.linear(h, layer.down_weight.mean(0), layer.down_bias.mean(0))), layer.up_weight[0], layer.up_bias[0]
        )
    torch.testing.assert_close(changed, expected)


def test_merged_mode_with_autograd_reaches_every_expert():
    layer = bottleneck().eval()
    layer(torch.randn(2, 3, 2 * HIDDEN)).sum().backward()
    assert (layer.down_weight.grad.flatten(1).abs().sum(1) > 0).all()


def test_unchosen_experts_get_exactly_zero_gradient():
    layer = bottleneck(share_up=False).train()
    layer(torch.randn(4, 2 * HIDDEN)).sum().backward()
    (down,), (up,) = layer.routed[Projection.DOWN], layer.routed[Projection.UP]
    for param, chosen in ((layer.down_weight, down), (layer.down_bias, down), (layer.up_weight, up), (layer.up_bias, up)):
        for k in range(EXPERTS):
            assert (param.grad[k].abs().sum() > 0) == (k == chosen)


def test_independent_init_draws_each_expert_separately():
    layer = bottleneck(share_up=False)
    weights = layer.down_weight.detach()
    assert not torch.equal(weights[0], weights[1])
    assert abs(weights.std().item() - 0.02) < 0.003 and abs(weights.mean().item()) < 0.003
    fresh = AdaMixBottleneck(nn.Linear(HIDDEN, HIDDEN), AdaMixConfig(bottleneck_dim=RANK, num_experts=EXPERTS), 0)
    assert torch.count_nonzero(fresh.down_bias) == 0 and torch.count_nonzero(fresh.up_bias) == 0


def test_shared_init_starts_every_expert_from_one_draw():
    layer = bottleneck(expert_init="shared")
    for k in range(1, EXPERTS):
        torch.testing.assert_close(layer.down_weight[k], layer.down_weight[0], rtol=0, atol=0)


def test_lora_init_is_one_kaiming_draw_copied_to_every_expert_and_zero_b():
    # The reference's AdamixMergedLinear deep-copies one A into every expert: the experts differ only through routing.
    torch.manual_seed(0)
    layer = AdaMixLoRA(nn.Linear(HIDDEN, HIDDEN), AdaMixConfig(adapter_type="lora", bottleneck_dim=RANK, num_experts=EXPERTS), 0)
    bound = 1 / math.sqrt(HIDDEN)  # kaiming_uniform(a=sqrt(5)) on fan_in = HIDDEN
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    for k in range(1, EXPERTS):
        assert torch.equal(layer.lora_A[k], layer.lora_A[0])
    assert torch.count_nonzero(layer.lora_B) == 0 and layer.lora_B.shape[0] == 1


def test_each_adapter_type_defaults_to_the_reference_init_and_takes_the_other_by_name():
    assert AdaMixConfig().expert_init == "independent" and AdaMixConfig(adapter_type="lora").expert_init == "shared"
    model = add_adamix(tiny_classifier("bert"), AdaMixConfig(bottleneck_dim=RANK, num_experts=EXPERTS, share_up=False))
    for _, layer in adamix_layers(model):
        for param in (layer.down_weight, layer.up_weight):
            assert all(not torch.equal(param[i], param[j]) for i in range(EXPERTS) for j in range(i))
            assert abs(param.std().item() - 0.02) < 0.004
    lora_model = add_adamix(tiny_classifier("bert"), AdaMixConfig(adapter_type="lora", bottleneck_dim=RANK, num_experts=EXPERTS))
    for _, layer in adamix_layers(lora_model):
        assert all(torch.equal(layer.lora_A[k], layer.lora_A[0]) for k in range(EXPERTS)) and torch.count_nonzero(layer.lora_B) == 0
    torch.manual_seed(0)
    independent = AdaMixLoRA(
        nn.Linear(HIDDEN, HIDDEN), AdaMixConfig(adapter_type="lora", bottleneck_dim=RANK, num_experts=EXPERTS, expert_init="independent"), 0
    )
    assert not torch.equal(independent.lora_A[0], independent.lora_A[1])


def test_lora_routed_forward_and_fused_slices():
    layer = lora(out_slices=[(0, HIDDEN), (2 * HIDDEN, HIDDEN)]).train()
    x = torch.randn(2, 5, HIDDEN)
    down = choose_expert(0, Stream.TRAIN, 0, 1, Projection.DOWN, EXPERTS)
    out = layer(x)
    base = layer.base_layer(x)
    a, b = layer.lora_A[down], layer.lora_B[0]
    scaling = 32 / RANK
    torch.testing.assert_close(out[..., :HIDDEN], base[..., :HIDDEN] + x @ a[:RANK].T @ b[:HIDDEN].T * scaling)
    torch.testing.assert_close(out[..., HIDDEN : 2 * HIDDEN], base[..., HIDDEN : 2 * HIDDEN], rtol=0, atol=0)  # key untouched
    torch.testing.assert_close(out[..., 2 * HIDDEN :], base[..., 2 * HIDDEN :] + x @ a[RANK:].T @ b[HIDDEN:].T * scaling)


def test_lora_fold_equals_merged_eval():
    layer = lora(out_slices=[(0, HIDDEN), (2 * HIDDEN, HIDDEN)]).eval()
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        merged = layer(x)
        folded = layer.folded_base_layer()(x)
    torch.testing.assert_close(folded, merged, rtol=1e-5, atol=1e-5)


def test_routing_is_a_pure_function_of_its_key():
    draws = [choose_expert(5, Stream.TRAIN, step, 2, Projection.DOWN, 8) for step in range(400)]
    assert draws == [choose_expert(5, Stream.TRAIN, step, 2, Projection.DOWN, 8) for step in range(400)]
    assert draws != [choose_expert(6, Stream.TRAIN, step, 2, Projection.DOWN, 8) for step in range(400)]
    ups = [choose_expert(5, Stream.TRAIN, step, 2, Projection.UP, 8) for step in range(400)]
    assert sum(d == u for d, u in zip(draws, ups, strict=True)) < 100  # independent: ~1/8 agree by chance
    counts = torch.bincount(torch.tensor(draws), minlength=8)
    assert counts.min() > 25  # uniform: 50 expected per expert


def test_every_pass_draws_afresh_and_the_counter_is_saved():
    layer = bottleneck(share_up=False).train()
    x = torch.randn(1, 2 * HIDDEN)
    for _ in range(5):
        layer(x)
    assert layer.forward_count == 5
    state = layer.state_dict()
    assert state["_extra_state"].tolist() == [5, 0]
    restored = bottleneck(share_up=False)
    restored.load_state_dict(state)
    assert restored.forward_count == 5
