"""Every built-in architecture end to end: inject, train a step, merge, save, strict load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from adamix_ds import (
    AdaMixConfig,
    ExpertStepGuard,
    TorchOptimizerAccess,
    adamix_loss,
    add_adamix,
    build_adamw,
    load_adapter,
    merge_adamix,
    save_adapter,
)
from adamix_ds.layer import AdaMixBottleneck, AdaMixLoRA
from adamix_ds.model import adamix_layers

from tiny_models import tiny_classifier, tiny_gpt2_lm, token_batch

PLACEMENT = {
    ("bert", "bottleneck"): ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"],
    ("roberta", "bottleneck"): ["roberta.encoder.layer.0.output.dense", "roberta.encoder.layer.1.output.dense"],
    ("deberta-v2", "bottleneck"): ["deberta.encoder.layer.0.output.dense", "deberta.encoder.layer.1.output.dense"],
    ("gpt2", "bottleneck"): ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"],
    ("bert", "lora"): [f"bert.encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")],
    ("roberta", "lora"): [f"roberta.encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")],
    ("deberta-v2", "lora"): [f"deberta.encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query_proj", "value_proj")],
    ("gpt2", "lora"): ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"],
}


def adamix_model(model_type: str, adapter_type: str, seed: int = 0, **overrides):
    config = AdaMixConfig(**{"adapter_type": adapter_type, "bottleneck_dim": 4, "num_experts": 3, **overrides})
    return add_adamix(tiny_classifier(model_type, seed=seed), config)


def train_steps(model, steps: int = 3) -> None:
    optimizer = build_adamw(model, lr=1e-2, weight_decay=0.1)
    guard = ExpertStepGuard(model, TorchOptimizerAccess(optimizer))
    model.train()
    for step in range(steps):
        out = adamix_loss(model, token_batch(seed=step), consistency_weight=1.0)
        out.loss.backward()
        guard.step(optimizer.step)
        optimizer.zero_grad()
    model.eval()


def test_placement_and_freezing(model_type, adapter_type):
    model = adamix_model(model_type, adapter_type)
    names = [name for name, _ in adamix_layers(model)]
    assert names == PLACEMENT[(model_type, adapter_type)]
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad and ".base_layer." not in name}
    head = {"gpt2": {"score"}, "deberta-v2": {"pooler", "classifier"}}.get(model_type, {"classifier"})
    backbone = {"bert": "bert", "roberta": "roberta", "deberta-v2": "deberta", "gpt2": "transformer"}[model_type]
    assert trainable == head | {backbone}
    for name, param in model.named_parameters():
        is_expert = any(part in name for part in ("down_", "up_", "lora_A", "lora_B"))
        if "LayerNorm" in name or "ln_" in name or "pooler" in name and model_type == "bert" or ".base_layer." in name:
            assert not param.requires_grad, name
        if is_expert:
            assert param.requires_grad, name


def test_forward_backward_merge_save_load(model_type, adapter_type, tmp_path):
    model = adamix_model(model_type, adapter_type)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    train_steps(model)
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"frozen {name} changed"
    batch = token_batch(seed=99)
    with torch.no_grad():
        eval_logits = model(input_ids=batch["input_ids"]).logits

    save_adapter(model, tmp_path / "experts")
    save_adapter(model, tmp_path / "merged", merged=True)

    reloaded = load_adapter(tiny_classifier(model_type), tmp_path / "experts")
    for (name, param), (_, original) in zip(reloaded.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(param, original), f"{name} not bit-exact after load"
    merged_fresh = load_adapter(tiny_classifier(model_type), tmp_path / "merged")
    assert merged_fresh.adamix_config.num_experts == 1

    merge_adamix(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, eval_logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged_fresh.eval()(input_ids=batch["input_ids"]).logits, eval_logits, rtol=1e-5, atol=1e-6)


def test_gpt2_language_model_trains_with_masked_consistency(adapter_type):
    model = add_adamix(tiny_gpt2_lm(), AdaMixConfig(adapter_type=adapter_type, bottleneck_dim=4, num_experts=4, consistency_weight=100.0))
    ids = torch.randint(1, 128, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100  # only the continuation is a target, as for E2E
    model.train()
    out = adamix_loss(model, {"input_ids": ids, "labels": labels}, consistency_weight=100.0)
    assert out.consistency_loss > 0
    out.loss.backward()
    assert all(layer.forward_count == 2 for _, layer in adamix_layers(model))
    assert not model.lm_head.weight.requires_grad  # tied to the frozen embeddings


def test_loading_into_other_shapes_fails_with_a_clear_error(tmp_path):
    model = adamix_model("bert", "bottleneck")
    save_adapter(model, tmp_path / "a")
    other_experts = adamix_model("bert", "bottleneck", num_experts=2)
    with pytest.raises(ValueError, match=r"num_experts=3 in the file but 2 in the model"):
        load_adapter(other_experts, tmp_path / "a")
    other_dim = add_adamix(tiny_classifier("bert"), AdaMixConfig(bottleneck_dim=8, num_experts=3))
    with pytest.raises(ValueError, match=r"bottleneck_dim=4 in the file but 8 in the model"):
        load_adapter(other_dim, tmp_path / "a")


def test_loading_is_strict_about_keys_and_shapes(tmp_path):
    model = adamix_model("bert", "bottleneck")
    save_adapter(model, tmp_path / "a")
    (tmp_path / "a" / "manifest.json").unlink()  # edited by hand below: the strict key and shape checks still hold
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = "bert.encoder.layer.1.output.dense.down_weight"

    dropped = {k: v for k, v in tensors.items() if k != key}
    save_file(dropped, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=rf"missing keys \['{key}'\]"):
        load_adapter(adamix_model("bert", "bottleneck"), tmp_path / "a")

    save_file(
        {**tensors, "bert.encoder.layer.9.output.dense.down_weight": tensors[key].clone()},
        str(tmp_path / "a" / "adapter_model.safetensors"),
    )
    with pytest.raises(ValueError, match=r"unexpected keys \['bert.encoder.layer.9"):
        load_adapter(adamix_model("bert", "bottleneck"), tmp_path / "a")

    save_file({**tensors, key: tensors[key][:, :2].contiguous()}, str(tmp_path / "a" / "adapter_model.safetensors"))
    untouched = adamix_model("bert", "bottleneck", seed=5)
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    with pytest.raises(ValueError, match=rf"{key}: \(3, 2, 32\) in the file, \(3, 4, 32\) in the model"):
        load_adapter(untouched, tmp_path / "a")
    assert all(torch.equal(before[k], v) for k, v in untouched.state_dict().items())


def test_adapter_from_another_architecture_is_rejected(tmp_path):
    save_adapter(adamix_model("roberta", "bottleneck"), tmp_path / "roberta")
    with pytest.raises(ValueError, match=r"missing keys \['bert\.encoder"):
        load_adapter(tiny_classifier("bert"), tmp_path / "roberta")


def test_save_writes_config_and_nothing_half_written(tmp_path):
    model = adamix_model("gpt2", "lora")
    save_adapter(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md",
        "adamix_config.json",
        "adapter_model.safetensors",
        "manifest.json",
    ]
    assert json.loads((tmp_path / "out" / "adamix_config.json").read_text())["adapter_type"] == "lora"
    merge_adamix(model, fold=True)
    with pytest.raises(ValueError, match="folded"):
        save_adapter(model, tmp_path / "folded")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_fold_leaves_a_plain_backbone_with_the_same_outputs():
    model = adamix_model("bert", "lora")
    train_steps(model)
    batch = token_batch(seed=3)
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"]).logits
        merge_adamix(model, fold=True)
        assert not any(isinstance(m, (AdaMixLoRA, AdaMixBottleneck)) for m in model.modules())
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, expected, rtol=1e-5, atol=1e-6)


def test_unknown_architecture_needs_explicit_targets():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.classifier = torch.nn.Linear(8, 2)

    with pytest.raises(ValueError, match="has no built-in AdaMix placement .* pass target_modules"):
        add_adamix(Tiny(), AdaMixConfig(bottleneck_dim=2))
    model = add_adamix(Tiny(), AdaMixConfig(bottleneck_dim=2, target_modules=["proj"]))
    assert [name for name, _ in adamix_layers(model)] == ["proj"]
    assert model.classifier.weight.requires_grad
    with pytest.raises(ValueError, match=r"target_modules=\['nothing'\] matched no module"):
        add_adamix(Tiny(), AdaMixConfig(bottleneck_dim=2, target_modules=["nothing"]))
    with pytest.raises(ValueError, match="bottleneck_dim=9 is larger than the hidden size 8"):
        add_adamix(Tiny(), AdaMixConfig(bottleneck_dim=9, target_modules=["proj"]))
