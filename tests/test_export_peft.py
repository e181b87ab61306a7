"""``export_peft``: the merged LoRA variant loads in PEFT itself and gives the same logits."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from adamix_ds import AdaMixConfig, add_adamix, export_peft, merge_adamix
from adamix_ds.model import adamix_layers

from tiny_models import tiny_classifier, token_batch


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_peft_loads_the_export_and_reproduces_our_merged_logits(model_type, tmp_path):
    tiny_classifier(model_type).save_pretrained(tmp_path / "base")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    add_adamix(model, AdaMixConfig(adapter_type="lora", bottleneck_dim=4, num_experts=3, lora_alpha=16))
    torch.manual_seed(1)
    with torch.no_grad():  # trained-looking experts: B non-zero, A experts apart, a trained head
        for _, layer in adamix_layers(model):
            layer.lora_B.normal_(0, 0.1)
            layer.lora_A.add_(torch.randn_like(layer.lora_A) * 0.1)
        for param in model.get_submodule(model.adamix_head_modules[0]).parameters():
            param.add_(torch.randn_like(param))
    model.eval()
    ids = token_batch(seed=4)["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=ids).logits

    export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tmp_path / "base"), tmp_path / "peft").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    merge_adamix(model, fold=True)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-5)


def test_export_needs_the_lora_variant(tmp_path):
    model = add_adamix(tiny_classifier("bert"), AdaMixConfig(bottleneck_dim=4))
    with pytest.raises(ValueError, match="export_peft needs adapter_type='lora', got adapter_type='bottleneck'"):
        export_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
