"""Merges beyond the uniform average: a greedy soup on experts with known scores, Fisher weights from known
gradients, the best held-out expert, merged adapters that hold the chosen merge, the held-out split, and a held-out
loss for every family."""

from __future__ import annotations

import itertools

import pytest
import torch

from adamix_ds import AdaMixConfig, add_adamix, load_adapter, save_adapter
from adamix_ds.data import get_task_spec
from adamix_ds.distributed import DistEnv
from adamix_ds.evaluation import evaluate_loss
from adamix_ds.families import Decoding, build_family
from adamix_ds.merging import (
    expert_route,
    expert_scores,
    fisher_coefficients,
    fisher_diagonals,
    greedy_soup,
    same_merge,
    set_merge,
    soup_coefficients,
)
from adamix_ds.model import adamix_layers, get_config, set_eval_mode
from adamix_ds.training.eval_modes import evaluate_modes
from adamix_ds.training.merges import compute_merges, hold_out

from conftest import SHARED_DATA
from tiny_models import tiny_classifier, token_batch

EXPERTS = 4
ONE_PROCESS = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1)


def _model(**overrides):
    model = add_adamix(tiny_classifier("bert"), AdaMixConfig(bottleneck_dim=4, num_experts=EXPERTS, **overrides)).eval()
    with torch.no_grad():
        for _, layer in adamix_layers(model):
            for param in layer.expert_parameters():
                param.normal_()  # biases and the zero-initialised parts too: every expert distinct
    return model


def _soup_members(model) -> frozenset[int]:
    """The experts the merged mode currently averages (from the first layer's down coefficients)."""
    coefficients = next(layer for _, layer in adamix_layers(model)).merge_coefficients
    if coefficients is None:
        return frozenset(range(EXPERTS))
    return frozenset(int(k) for k in torch.nonzero(coefficients[0].flatten()).flatten())


def _tiny_e2e_family(folder):
    """The E2E generation family on a tiny random GPT-2 saved in ``folder`` (its ``load_model`` path)."""
    from test_generation import tiny_gpt2
    from test_prompts import gpt2_tokenizer

    tiny_gpt2().save_pretrained(folder)
    return build_family(get_task_spec("e2e_nlg"), gpt2_tokenizer(), 64, str(folder), decoding=Decoding(max_new_tokens=8))


def test_greedy_soup_adds_experts_in_score_order_while_the_soup_does_not_get_worse():
    model = _model()
    single = [0.1, 0.5, 0.3, 0.2]  # expert 1 best, then 2, 3, 0
    soups = {frozenset({1, 2}): 0.6, frozenset({1, 2, 3}): 0.55, frozenset({1, 2, 0}): 0.6}  # 3 hurts; 0 ties: kept

    def score() -> float:
        layer = next(layer for _, layer in adamix_layers(model))
        if layer.eval_mode == "fixed":
            return single[layer.eval_route[0]]
        return soups[_soup_members(model)]

    soup = greedy_soup(model, score)
    assert (soup.order, soup.chosen, soup.score, soup.expert_scores) == ([1, 2, 3, 0], [1, 2, 0], 0.6, single)
    routings = []  # with each expert's score already known, the soup scores only the 3 candidate soups

    def counted() -> float:
        routings.append(next(layer for _, layer in adamix_layers(model)).eval_mode)
        return score()

    known = greedy_soup(model, counted, scores=single)
    assert routings == ["merged"] * 3 and (known.order, known.chosen, known.score) == (soup.order, soup.chosen, soup.score)
    assert get_config(model).eval_mode == "merged" and _soup_members(model) == frozenset(range(EXPERTS))  # restored
    set_merge(model, soup.coefficients)
    for _, layer in adamix_layers(model):
        down_weight, down_bias, up_weight, up_bias = layer.merged_weights()
        torch.testing.assert_close(down_weight[0], layer.down_weight[[0, 1, 2]].mean(dim=0))
        torch.testing.assert_close(down_bias[0], layer.down_bias[[0, 1, 2]].mean(dim=0))
        assert torch.equal(up_weight[0], layer.up_weight[0]) and torch.equal(up_bias[0], layer.up_bias[0])  # shared: as it is


def test_a_soup_of_one_expert_is_that_expert():
    model = _model()
    batch = token_batch()
    del batch["labels"]
    set_merge(model, soup_coefficients(model, [2]))
    merged = model(**batch).logits
    set_merge(model, None)
    set_eval_mode(model, "fixed", eval_route=expert_route(model, 2))
    torch.testing.assert_close(merged, model(**batch).logits)


def test_fisher_weights_each_element_by_its_experts_fisher_and_leave_shared_projections_alone():
    # Hand-made Fisher values for one layer's down weight ([M=2, 1, 2]) and a shared up projection.
    fisher = {"layer": (torch.tensor([[[1.0, 0.0]], [[3.0, 0.0]]]), None)}
    (down, up) = fisher_coefficients(fisher)["layer"]
    assert up is None
    torch.testing.assert_close(down, torch.tensor([[[0.25, 0.5]], [[0.75, 0.5]]]))  # zero Fisher: uniform


def test_fisher_diagonals_are_the_squared_gradients_under_each_experts_fixed_routing():
    model = _model()
    batches = [token_batch(seed=s) for s in (1, 2)]

    def loss(module, batch):
        return module(**batch).loss

    fisher = fisher_diagonals(model, batches, loss)
    assert get_config(model).eval_mode == "merged" and not model.training  # restored
    name, layer = next(iter(adamix_layers(model)))
    expected = torch.zeros_like(layer.down_weight)
    for expert, batch in itertools.product(range(EXPERTS), batches):  # by hand: one expert routed, .grad read
        set_eval_mode(model, "fixed", eval_route=(expert, 0))
        model.zero_grad()
        loss(model, batch).backward()
        expected[expert] += layer.down_weight.grad[expert] ** 2
    set_eval_mode(model, "merged")
    down_weight, down_bias, up_weight, up_bias = fisher[name]
    torch.testing.assert_close(down_weight, expected)
    assert up_weight is None and up_bias is None and down_bias.shape == layer.down_bias.shape
    # The merged projection: sum_k F_k W_k / sum_k F_k, element by element.
    set_merge(model, fisher_coefficients(fisher))
    merged = layer.merged_weights()[0][0]
    torch.testing.assert_close(merged, (expected * layer.down_weight).sum(0) / expected.sum(0))


def test_a_saved_merged_adapter_holds_the_chosen_merge(tmp_path):
    model = _model(share_up=False)
    set_merge(model, soup_coefficients(model, [0, 3]))
    save_adapter(model, tmp_path / "soup", merged=True)
    loaded = load_adapter(
        add_adamix(tiny_classifier("bert"), AdaMixConfig(bottleneck_dim=4, num_experts=1, share_up=False)), tmp_path / "soup"
    )
    for (_, layer), (_, saved) in zip(adamix_layers(model), adamix_layers(loaded), strict=True):
        torch.testing.assert_close(saved.down_weight[0], layer.down_weight[[0, 3]].mean(0))
        torch.testing.assert_close(saved.up_bias[0], layer.up_bias[[0, 3]].mean(0))  # unshared up: merged too


def test_the_held_out_split_is_the_last_training_rows_and_disjoint_from_training_and_scoring():
    from test_prompts import minilm_tokenizer

    family = build_family(get_task_spec("sst2"), minilm_tokenizer(), 32, "unused")
    data = family.load_data(SHARED_DATA / "glue" / "SST-2", max_train_samples=50)
    kept, holdout = hold_out(data, 10)
    assert (len(kept.train), len(holdout)) == (40, 10)
    rows = {name: {tuple(ids) for ids in split["input_ids"]} for name, split in (("train", kept.train), ("holdout", holdout))}
    rows["dev"] = {tuple(ids) for ids in data.eval["validation"]["input_ids"]}
    assert not rows["holdout"] & rows["train"] and not rows["holdout"] & rows["dev"]
    assert holdout["input_ids"] == data.train.select(range(40, 50))["input_ids"]
    with pytest.raises(ValueError, match="holdout_samples=50 is invalid: allowed 1..49"):
        hold_out(data, 50)


def test_held_out_loss_of_a_generation_family_is_the_mean_token_loss_per_example(tmp_path):
    family = _tiny_e2e_family(tmp_path)
    data = family.load_data(SHARED_DATA / "e2e", max_train_samples=5, max_eval_samples=2)
    model = add_adamix(family.load_model(str(tmp_path)), AdaMixConfig(adapter_type="lora", bottleneck_dim=4, num_experts=2)).eval()
    collate = family.collator()
    with torch.no_grad():
        by_hand = [
            float(family.loss(model(**{k: v for k, v in b.items() if k != "labels"}).logits, b["labels"]))
            for b in (collate([row]) for row in data.train)
        ]
    assert evaluate_loss(model, data.train, family, 2, ONE_PROCESS) == pytest.approx(sum(by_hand) / 5, rel=1e-5)


def test_best_expert_is_the_one_with_the_lowest_held_out_loss_alone(tmp_path):
    family = _tiny_e2e_family(tmp_path)
    data, holdout = hold_out(family.load_data(SHARED_DATA / "e2e", max_train_samples=12, max_eval_samples=2), 4)
    model = add_adamix(family.load_model(str(tmp_path)), AdaMixConfig(adapter_type="lora", bottleneck_dim=4, num_experts=3)).eval()
    with torch.no_grad():
        for _, layer in adamix_layers(model):
            for param in layer.expert_parameters():
                param.normal_(std=0.5)  # B too: the experts differ in what they compute
    losses = []
    for expert in range(3):  # by hand: each expert routed alone, its mean held-out loss
        set_eval_mode(model, "fixed", eval_route=expert_route(model, expert))
        losses.append(evaluate_loss(model, holdout, family, 2, ONE_PROCESS))
    set_eval_mode(model, "merged")
    assert expert_scores(model, lambda: -evaluate_loss(model, holdout, family, 2, ONE_PROCESS)) == pytest.approx([-x for x in losses])
    best = losses.index(min(losses))

    merges = compute_merges(["best_expert", "greedy_soup"], model, family, data.train, holdout, 2, ONE_PROCESS, fisher_batches=1)
    coefficients, record = merges["best_expert"]
    assert record["chosen"] == [best] and record["score"] == pytest.approx(-losses[best])
    assert merges["greedy_soup"][1]["expert_scores"] == record["expert_scores"] and merges["greedy_soup"][1]["chosen"][0] == best
    assert record["selection_split"] == "holdout: the last 4 training examples, removed before training"
    assert get_config(model).eval_mode == "merged"  # restored
    set_merge(model, coefficients)
    assert evaluate_loss(model, holdout, family, 2, ONE_PROCESS) == pytest.approx(losses[best], rel=1e-5)
    with pytest.raises(ValueError, match="best_expert needs a held-out split"):
        compute_merges(["best_expert"], model, family, data.train, None, 2, ONE_PROCESS, fisher_batches=1)


def test_two_modes_that_chose_the_same_merge_are_evaluated_once(monkeypatch):
    import adamix_ds.training.eval_modes as eval_modes

    model = _model()
    one, two = soup_coefficients(model, [1]), soup_coefficients(model, [0, 2])
    assert same_merge(one, soup_coefficients(model, [1])) and not same_merge(one, two) and not same_merge(one, None)
    batch = token_batch()
    del batch["labels"]
    scored = []

    def scores(engine, *args) -> dict[str, float]:  # stands in for a decode: what the model computes, counted
        scored.append(1)
        with torch.no_grad():
            return {"eval_output": float(engine(**batch).logits.sum())}

    monkeypatch.setattr(eval_modes, "evaluate_splits", scores)
    merges = {"best_expert": (one, {"chosen": [1]}), "greedy_soup": (one, {"chosen": [1]}), "fisher": (two, {})}
    results = evaluate_modes(model, None, None, 2, ONE_PROCESS, ("best_expert", "greedy_soup", "fisher"), merges=merges)
    assert len(scored) == 2 and results["greedy_soup"] == results["best_expert"] != results["fisher"]
    set_eval_mode(model, "fixed", eval_route=expert_route(model, 1))  # what the one-expert merge computes
    assert results["best_expert"]["eval_output"] == pytest.approx(scores(model)["eval_output"], rel=1e-5)
