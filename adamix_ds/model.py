"""Injection of AdaMix into Hugging Face models, merging and parameter accounting."""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from adamix_ds.config import AdaMixConfig
from adamix_ds.layer import AdaMixBottleneck, AdaMixLayer, AdaMixLoRA, PerPassPositionBias, base_features, begin_pass, end_pass
from adamix_ds.routing import Projection

# Built-in placements, by ``config.model_type``: the FFN output for bottleneck adapters (the spec's
# single slot per layer, never the attention output), attention query and value for LoRA.
BOTTLENECK_TARGETS: dict[str, list[str]] = {
    "bert": [r"layer\.\d+\.output\.dense"],
    "roberta": [r"layer\.\d+\.output\.dense"],
    "deberta-v2": [r"layer\.\d+\.output\.dense"],
    "gpt2": [r"h\.\d+\.mlp\.c_proj"],
    # Llama family (Llama, Mistral, Qwen2, SmolLM): the MLP's output projection, before the residual add.
    **dict.fromkeys(("llama", "mistral", "qwen2"), [r"layers\.\d+\.mlp\.down_proj"]),
}
LORA_TARGETS: dict[str, list[str]] = {
    "bert": [r"attention\.self\.query", r"attention\.self\.value"],
    "roberta": [r"attention\.self\.query", r"attention\.self\.value"],
    "deberta-v2": [r"attention\.self\.query_proj", r"attention\.self\.value_proj"],
    "gpt2": [r"h\.\d+\.attn\.c_attn"],
    **dict.fromkeys(("llama", "mistral", "qwen2"), [r"self_attn\.q_proj", r"self_attn\.v_proj"]),
}
# Task heads trained and saved with the adapter. BERT's pooler is pretrained and stays frozen;
# DeBERTa's pooler is freshly initialised by the classification model, so it belongs to the head.
HEAD_MODULES: dict[str, list[str]] = {
    "bert": ["classifier"],
    "roberta": ["classifier"],
    "deberta-v2": ["pooler", "classifier"],
    "gpt2": ["score"],
    **dict.fromkeys(("llama", "mistral", "qwen2"), ["score"]),
}
GENERIC_HEADS = ["classifier", "score", "qa_outputs"]
# ``AdaMixConfig.task_type`` of a model: transformers' class for it, by model type.
TASK_TYPE_CLASSES = {"SEQ_CLS": MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, "CAUSAL_LM": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES}


def adamix_layers(model: nn.Module) -> Iterator[tuple[str, AdaMixLayer]]:
    """``(name, layer)`` for every AdaMix layer of ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, AdaMixLayer):
            yield name, module


def get_config(model: nn.Module) -> AdaMixConfig:
    """The ``AdaMixConfig`` that ``add_adamix`` attached to ``model``."""
    config = getattr(model, "adamix_config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no AdaMix layers: call add_adamix(model, config) first")
    return config


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def loading_record(model: nn.Module) -> AdaMixConfig:
    """``get_config(model)`` with what loading the adapter back needs, taken from ``model`` as PEFT takes it: the
    backbone (``model.name_or_path``) where the config names none, the model's ``task_type`` (``TASK_TYPE_CLASSES``)
    and a sequence classifier's ``label_names`` (``config.id2label`` in id order)."""
    config = get_config(model)
    model_type = _model_type(model)
    task_type = next((t for t, classes in TASK_TYPE_CLASSES.items() if classes.get(model_type) == type(model).__name__), None)
    id2label = getattr(model.config, "id2label", None) if task_type == "SEQ_CLS" else None
    return AdaMixConfig.from_dict(
        {
            **config.to_dict(),
            "base_model_name_or_path": config.base_model_name_or_path or getattr(model, "name_or_path", None) or None,
            "task_type": task_type,
            "label_names": None if id2label is None else [str(id2label[i]) for i in range(len(id2label))],
        }
    )


def _fused_qkv_slices(model_type: str | None, name: str, out_features: int) -> list[tuple[int, int]] | None:
    """GPT-2's ``c_attn`` computes [q, k, v] in one matmul; LoRA adapts the q and v thirds only."""
    if model_type == "gpt2" and name.endswith("c_attn"):
        third = out_features // 3
        return [(0, third), (2 * third, third)]
    return None


def _matches(name: str, patterns: list[str]) -> bool:
    return any(re.search(rf"(^|\.){pattern}$", name) for pattern in patterns)


def add_adamix(model: nn.Module, config: AdaMixConfig) -> nn.Module:
    """Inject AdaMix into ``model`` in place and return it.

    The backbone (LayerNorms and pooler included) is frozen; adapter experts and the task head
    (``config.modules_to_save`` or the architecture's head) are trainable. The config is attached as
    ``model.adamix_config``.
    """
    if getattr(model, "adamix_config", None) is not None:
        raise ValueError("model already has AdaMix layers: add_adamix may be called once per model")
    model_type = _model_type(model)
    builtin = BOTTLENECK_TARGETS if config.adapter_type == "bottleneck" else LORA_TARGETS
    targets = config.target_modules if config.target_modules is not None else builtin.get(model_type)
    if targets is None:
        raise ValueError(
            f"model_type={model_type!r} has no built-in AdaMix placement (built-in: {', '.join(builtin)}): pass target_modules"
        )
    for param in model.parameters():
        param.requires_grad_(False)

    names = [name for name, module in model.named_modules() if name and _matches(name, targets)]
    if not names:
        raise ValueError(f"target_modules={targets} matched no module of {type(model).__name__}")
    for layer_id, name in enumerate(names):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child_name)
        if config.adapter_type == "bottleneck":
            wrapped = AdaMixBottleneck(base, config, layer_id)
        else:
            slices = _fused_qkv_slices(model_type, name, base_features(base)[1])
            wrapped = AdaMixLoRA(base, config, layer_id, out_slices=slices)
        setattr(parent, child_name, wrapped)
    _route_positions_with_content(model)

    heads = config.modules_to_save
    if heads is None:  # the built-in head names that this model has (a causal LM has none: its head is tied)
        heads = [h for h in HEAD_MODULES.get(model_type, GENERIC_HEADS) if hasattr(model, h)]
    for head in heads:
        for _, param in _head_entry(model, head):
            param.requires_grad_(True)
    model.adamix_head_modules = list(heads)
    model.adamix_config = config
    return model


def _route_positions_with_content(model: nn.Module) -> None:
    """DeBERTa-v2 with ``share_att_key`` projects its relative positions with the attention's own query/key
    layers: a second call of an AdaMix layer in the same pass. Each attention call becomes one pass scope (the
    position projection reuses the content projection's experts), and the position bias is computed per
    stacked pass."""
    for module in model.modules():
        shares = getattr(module, "share_att_key", False) and getattr(module, "relative_attention", False)
        if shares and any(isinstance(getattr(module, name, None), AdaMixLayer) for name in ("query_proj", "key_proj")):
            module.register_forward_pre_hook(begin_pass)
            module.register_forward_hook(end_pass, always_call=True)
            module.disentangled_attention_bias = PerPassPositionBias(module)


def merge_adamix(model: nn.Module, fold: bool = False) -> nn.Module:
    """Collapse every mixture to one adapter (the experts' average) in place and return ``model``.

    ``fold=True`` (LoRA variant only) adds the merged delta into the frozen weight and removes the
    adapter layers: the model is then a plain backbone with zero inference overhead.
    """
    config = get_config(model)
    if fold and config.adapter_type != "lora":
        raise ValueError(f"fold=True needs adapter_type='lora', got adapter_type={config.adapter_type!r}")
    for name, layer in list(adamix_layers(model)):
        if fold:
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, layer.folded_base_layer())
        else:
            layer.merge_()
    model.adamix_config = AdaMixConfig.from_dict({**config.to_dict(), "num_experts": 1, "eval_expert": 0})
    if fold:
        model.adamix_folded = True
    return model


def set_eval_mode(model: nn.Module, eval_mode: str, eval_expert: int = 0, eval_route: tuple[int, int] | None = None) -> None:
    """Switch how every AdaMix layer routes at inference (see ``AdaMixConfig.eval_mode``).

    ``eval_route`` picks a ``(down, up)`` pair for ``"fixed"`` (two different experts when neither
    projection is shared); ``None`` uses ``eval_expert`` for both.
    """
    config = AdaMixConfig.from_dict({**get_config(model).to_dict(), "eval_mode": eval_mode, "eval_expert": eval_expert})
    layers = [layer for _, layer in adamix_layers(model)]
    if eval_route is not None:
        counts = tuple(layers[0].experts_in(p) for p in Projection) if layers else (1, 1)
        if eval_mode != "fixed" or not all(0 <= e < n for e, n in zip(eval_route, counts, strict=True)):
            raise ValueError(f"eval_route={eval_route} is invalid: allowed with eval_mode='fixed', a (down, up) pair below {counts}")
    for layer in layers:
        layer.eval_mode, layer.eval_expert, layer.eval_route = config.eval_mode, config.eval_expert, eval_route
    model.adamix_config = config


def _head_entry(model: nn.Module, head: str) -> list[tuple[str, nn.Parameter]]:
    """The parameters a ``modules_to_save`` entry names: a module's, or one parameter (an LM head's output bias)."""
    try:
        return [(f"{head}.{name}", param) for name, param in model.get_submodule(head).named_parameters()]
    except AttributeError:
        pass
    try:
        return [(head, model.get_parameter(head))]
    except AttributeError:
        raise ValueError(f"modules_to_save entry {head!r} is not a module or parameter of {type(model).__name__}") from None


def head_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the task-head modules (or single parameters) saved with the adapter."""
    for head in getattr(model, "adamix_head_modules", []):
        yield from _head_entry(model, head)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: ``adapter`` (all experts), ``adapter_merged`` (after ``merge_adamix``),
    ``head`` (task head) and ``frozen`` (everything else). Works on the meta device."""
    adapter_ids: set[int] = set()
    adapter = adapter_merged = 0
    for _, layer in adamix_layers(model):
        for param in layer.expert_parameters():
            adapter_ids.add(id(param))
            adapter += param.numel()
            adapter_merged += param[0].numel()
    head_ids = {id(p) for _, p in head_parameters(model)}
    head = sum(p.numel() for _, p in head_parameters(model))
    frozen = sum(p.numel() for p in model.parameters() if id(p) not in adapter_ids | head_ids)
    return {"adapter": adapter, "adapter_merged": adapter_merged, "head": head, "frozen": frozen}
