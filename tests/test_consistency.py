"""The symmetric-KL consistency loss and the two-pass training helper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adamix_ds import AdaMixConfig, adamix_loss, add_adamix, consistency_loss
from adamix_ds.model import adamix_layers, head_parameters

from tiny_models import relative_deberta, tiny_classifier, token_batch


def manual_symmetric_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    p_a, p_b = a.softmax(-1), b.softmax(-1)
    kl_ba = (p_b * (p_b.log() - p_a.log())).sum(-1).mean()
    kl_ab = (p_a * (p_a.log() - p_b.log())).sum(-1).mean()
    return 0.5 * (kl_ab + kl_ba)


def test_value_is_the_symmetric_batchmean_kl():
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    torch.testing.assert_close(consistency_loss(a, b), manual_symmetric_kl(a, b))
    torch.testing.assert_close(consistency_loss(a, b), consistency_loss(b, a))
    assert consistency_loss(a, a.clone()).item() == 0.0


def test_targets_are_stop_gradient():
    a = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(4, 3, requires_grad=True)
    consistency_loss(a, b).backward()
    # d/da of 0.5*KL(sg(p_b)||p_a) is 0.5*(p_a - p_b)/N; KL(sg(p_a)||p_b) contributes nothing to a.
    expected = 0.5 * (a.softmax(-1) - b.softmax(-1)).detach() / a.shape[0]
    torch.testing.assert_close(a.grad, expected)
    torch.testing.assert_close(b.grad, -expected)


def test_half_precision_inputs_are_computed_in_fp32():
    a, b = torch.randn(4, 7), torch.randn(4, 7)
    loss = consistency_loss(a.half(), b.half())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, manual_symmetric_kl(a.half().float(), b.half().float()))


def test_mask_keeps_only_target_tokens():
    a, b = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(consistency_loss(a, b, mask), manual_symmetric_kl(a[mask], b[mask]))


def test_helper_runs_two_independently_routed_passes():
    model = add_adamix(tiny_classifier("bert"), AdaMixConfig(bottleneck_dim=4, num_experts=4)).train()
    batch = token_batch()
    out = adamix_loss(model, batch, consistency_weight=2.0)
    assert all(layer.forward_count == 2 for _, layer in adamix_layers(model))
    assert out.consistency_loss > 0
    torch.testing.assert_close(out.loss.detach(), out.task_loss + 2.0 * out.consistency_loss)
    torch.testing.assert_close(out.task_loss, F.cross_entropy(out.logits, batch["labels"]).detach())


def test_helper_makes_one_pass_when_the_term_cannot_matter():
    model = add_adamix(tiny_classifier("bert", num_labels=1), AdaMixConfig(bottleneck_dim=4, num_experts=4)).train()
    batch = {"input_ids": token_batch()["input_ids"], "labels": torch.rand(4)}
    out = adamix_loss(model, batch, consistency_weight=1.0)  # regression: one logit, constant softmax
    assert out.consistency_loss.item() == 0.0
    assert all(layer.forward_count == 1 for _, layer in adamix_layers(model))
    adamix_loss(model, token_batch(), consistency_weight=0.0)
    assert all(layer.forward_count == 2 for _, layer in adamix_layers(model))


def test_stacked_passes_equal_two_sequential_passes(model_type, adapter_type):
    config = AdaMixConfig(adapter_type=adapter_type, bottleneck_dim=4, num_experts=4, share_up=False)
    backbone = relative_deberta() if (model_type, adapter_type) == ("deberta-v2", "lora") else tiny_classifier(model_type)
    model = add_adamix(backbone, config).train()
    for module in model.modules():  # no dropout: the two ways must then agree to rounding
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad():
        for _, layer in adamix_layers(model):
            for param in layer.expert_parameters():
                param.normal_(0, 0.5)  # experts far apart (LoRA's B too), so a routing difference shows
        for _, param in head_parameters(model):
            param.normal_(0, 1.0)
    batch = token_batch()
    stacked = adamix_loss(model, batch, consistency_weight=1.0)
    stacked.loss.backward()
    stacked_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for _, layer in adamix_layers(model):
        layer.forward_count = 0
    first = model(**batch)
    second = model(input_ids=batch["input_ids"])
    expected = first.loss + consistency_loss(first.logits, second.logits)
    expected.backward()
    assert stacked.consistency_loss > 1e-4
    torch.testing.assert_close(stacked.logits, first.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stacked.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stacked.task_loss, first.loss.detach(), rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(stacked_grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("passes", [1, 2])
def test_relative_positions_use_the_experts_of_their_pass(passes):
    model = add_adamix(relative_deberta(), AdaMixConfig(adapter_type="lora", bottleneck_dim=4, num_experts=4, share_up=False)).train()
    layer = model.deberta.encoder.layer[0].attention.self.query_proj
    calls = []
    adapt, adapt_stacked = layer.adapt, layer.adapt_stacked
    layer.adapt = lambda x, base_out, weights, down, up: calls.append((x.shape[0], [(down, up)])) or adapt(x, base_out, weights, down, up)
    layer.adapt_stacked = lambda x, base_out, weights, routes: (
        calls.append((x.shape[0], routes)) or adapt_stacked(x, base_out, weights, routes)
    )
    adamix_loss(model, token_batch(), consistency_weight=1.0 if passes == 2 else 0.0)
    assert layer.forward_count == passes  # one draw per pass, not one per call
    content, *positions = calls
    assert content[0] == 4 * passes and len(content[1]) == passes
    # The relative-position table (one row) is projected once per pass, with that pass's experts.
    assert positions == [(1, [route]) for route in content[1]]
