"""Tiny random models of every built-in architecture and random token batches, for tests and rank workers."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

ARCHITECTURES = ("bert", "roberta", "deberta-v2", "gpt2")


def tiny_config(model_type: str, num_labels: int = 2, **overrides):
    """A 2-layer, hidden-32 config of ``model_type``: small enough for a test, same module layout.

    ``overrides`` are further config fields or other sizes (an encoder's, e.g. DeBERTa's relative attention).
    """
    if model_type == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=128, pad_token_id=0, num_labels=num_labels)
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 128}
    return AutoConfig.for_model(model_type, **{**sizes, "max_position_embeddings": 64, "num_labels": num_labels, **overrides})


def tiny_classifier(model_type: str, seed: int = 0, num_labels: int = 2) -> torch.nn.Module:
    """A randomly initialised sequence classifier of ``model_type`` (same weights for the same seed)."""
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(tiny_config(model_type, num_labels)).eval()


# DeBERTa-v2-XXLarge's attention in small: relative positions projected by the attention's own query/key layers.
DEBERTA_RELATIVE = {
    "relative_attention": True,
    "position_buckets": 8,
    "share_att_key": True,
    "pos_att_type": ["p2c", "c2p"],
    "norm_rel_ebd": "layer_norm",
}


def relative_deberta(seed: int = 0) -> torch.nn.Module:
    """A tiny DeBERTa-v2 classifier whose query_proj also projects the relative positions (share_att_key)."""
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(tiny_config("deberta-v2", **DEBERTA_RELATIVE)).eval()


def tiny_gpt2_lm(seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised 2-layer GPT-2 language model."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_config("gpt2")).eval()


def token_batch(batch: int = 4, length: int = 9, seed: int = 1, num_labels: int = 2) -> dict[str, torch.Tensor]:
    """Random token ids (no pad id) with classification labels."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1, 128, (batch, length), generator=generator),
        "labels": torch.randint(0, num_labels, (batch,), generator=generator),
    }
