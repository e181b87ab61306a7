"""AdaMixConfig validation and round trip; parameter counts of the paper's settings."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from adamix_ds import AdaMixConfig, add_adamix, count_parameters

from tiny_models import tiny_classifier


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("adapter_type", "prefix", "bottleneck, lora"),
        ("activation", "swish", "gelu, gelu_tanh, relu"),
        ("eval_mode", "vote", "merged, random, fixed, ensemble"),
        ("expert_init", "zeros", "independent, shared"),
        ("num_experts", 0, "integer >= 1"),
        ("bottleneck_dim", -3, "integer >= 1"),
        ("seed", -1, "integer >= 0"),
        ("lora_dropout", 1.5, "0 <= lora_dropout < 1"),
        ("consistency_weight", -1.0, ">= 0"),
        ("share_up", "yes", "True or False"),
        ("target_modules", "query", "list of non-empty strings"),
    ],
)
def test_invalid_values_name_the_field_and_what_is_allowed(field, value, allowed):
    with pytest.raises(ValueError) as error:
        AdaMixConfig(**{field: value})
    message = str(error.value)
    assert field in message and (repr(value) in message or str(value) in message)
    assert allowed in message
    assert "\n" not in message


def test_eval_expert_must_name_an_existing_expert():
    with pytest.raises(ValueError, match=r"eval_expert=4 .* allowed 0\.\.3"):
        AdaMixConfig(num_experts=4, eval_expert=4)


def test_config_round_trips_through_json(tmp_path):
    config = AdaMixConfig(adapter_type="lora", bottleneck_dim=4, num_experts=8, lora_alpha=32, target_modules=["c_attn"], seed=7)
    path = config.save(tmp_path)
    assert path.name == "adamix_config.json"
    assert AdaMixConfig.load(tmp_path) == config


def test_unknown_config_key_is_an_error(tmp_path):
    (tmp_path / "adamix_config.json").write_text(json.dumps({"num_experts": 2, "experts": 3}))
    with pytest.raises(ValueError, match=r"unknown AdaMixConfig field\(s\) \['experts'\]"):
        AdaMixConfig.load(tmp_path)


def _meta_model(model_type: str, **sizes):
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(AutoConfig.for_model(model_type, **sizes))


def test_roberta_large_parameter_counts_match_the_paper():
    model = _meta_model("roberta", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    counts = count_parameters(add_adamix(model, AdaMixConfig(bottleneck_dim=16, num_experts=4)))
    assert counts["adapter"] == 1_992_192
    assert counts["adapter_merged"] == 811_392


def test_bert_base_parameter_counts_match_the_paper():
    model = _meta_model("bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    counts = count_parameters(add_adamix(model, AdaMixConfig(bottleneck_dim=48, num_experts=4)))
    assert counts["adapter"] == 2_223_360
    assert counts["adapter_merged"] == 894_528
    # BERT's pretrained pooler stays frozen; only the classifier is head.
    assert counts["head"] == 768 * 2 + 2


def test_counts_partition_every_parameter(model_type, adapter_type):
    model = add_adamix(tiny_classifier(model_type), AdaMixConfig(adapter_type=adapter_type, bottleneck_dim=4, num_experts=3))
    counts = count_parameters(model)
    assert counts["adapter"] + counts["head"] + counts["frozen"] == sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == counts["adapter"] + counts["head"]
