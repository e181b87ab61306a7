"""Adapter files: save, strict load, and exports of the merged LoRA variant (a PEFT adapter, a plain transformers model)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from adamix_ds.config import AdaMixConfig, read_json_object
from adamix_ds.hub import CARD_NAME, adapter_card
from adamix_ds.layer import AdaMixLoRA, base_features
from adamix_ds.manifest import has_manifest, verify_manifest, write_manifest
from adamix_ds.model import adamix_layers, add_adamix, get_config, head_parameters, loading_record, merge_adamix

WEIGHTS_NAME = "adapter_model.safetensors"
# How the adapter's task reads its inputs (a prompt family's template and label words), so that evaluating
# the adapter later reproduces them; written when the model carries ``adamix_task``.
TASK_NAME = "task.json"
EXTRA_STATE = "_extra_state"
# Config fields that decide tensor shapes: a mismatch is reported by name before any key is compared.
SHAPE_FIELDS = ("adapter_type", "bottleneck_dim", "num_experts", "share_up", "share_down")


def _is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Full tensors inside the block, also for ZeRO-3 partitioned parameters (a no-op otherwise)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield
    else:
        yield


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    scratch.chmod(0o777 & ~umask)  # mkdtemp makes it owner-only; the result is an ordinary directory
    try:
        yield scratch
        if path.exists():
            shutil.rmtree(path)
        os.replace(scratch, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a scratch file renamed over it: readers see the old file or the
    whole new one, never part of it; a failed write leaves no scratch file behind."""
    path = Path(path)
    scratch = path.with_name(f".{path.name}.tmp")
    try:
        scratch.write_text(text, encoding="utf-8")
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)  # left only when the write failed


def _adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    params = {f"{name}.{pname}": param for name, layer in adamix_layers(model) for pname, param in layer.named_parameters(recurse=False)}
    params.update(head_parameters(model))
    return params


def _has_master(param: nn.Parameter) -> bool:
    """Whether a DeepSpeed optimizer keeps an fp32 master copy of ``param`` (ZeRO 1-3, and bf16 at stage 0)."""
    return hasattr(param, "_hp_mapping") or (hasattr(param, "_z3_optimizer") and param.requires_grad)


def full_precision(param: nn.Parameter) -> torch.Tensor:
    """The whole fp32 value of ``param``: DeepSpeed's fp32 master copy where its optimizer keeps one (``_has_master``),
    else the parameter itself (gathered by the caller under ZeRO-3). Under ``--bf16`` the module holds a bf16 copy
    that the step rounds; the masters are what training arrived at. Collective under ZeRO: every rank calls it, in
    one order."""
    if _has_master(param):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param).float()
    return param.detach().to(torch.float32, copy=True)  # a copy: a ZeRO-3 parameter's gathered storage is released


def adapter_state_dict(model: nn.Module, merged: bool = False) -> dict[str, torch.Tensor]:
    """CPU tensors of the experts (or their merge with ``merged``: ``AdaMixLayer.merged_weights``), the routing
    counters and the head. Weights are float32, from the fp32 masters where an optimizer keeps them
    (``full_precision``), and merged in fp32.

    Call it on every rank under ZeRO: partitioned parameters and masters are gathered collectively.
    """
    params = _adapter_parameters(model)
    # Only what has no master is gathered: the masters are gathered by full_precision itself.
    with gathered([param for param in params.values() if not _has_master(param)]):
        tensors = {key: full_precision(param) for key, param in params.items()}
    if merged:  # each layer's merge (uniform, or the coefficients adamix_ds.merging.set_merge gave it)
        for name, layer in adamix_layers(model):
            keys = {id(param): f"{name}.{pname}" for pname, param in layer.named_parameters(recurse=False)}
            experts = [keys[id(p)] for p in layer.expert_parameters()]
            tensors.update(zip(experts, layer.merge_tensors([tensors[key] for key in experts]), strict=True))
    tensors = {key: value.cpu().contiguous() for key, value in tensors.items()}
    for name, layer in adamix_layers(model):
        tensors[f"{name}.{EXTRA_STATE}"] = layer.get_extra_state()
    return tensors


def save_adapter(
    model: nn.Module,
    path: str | Path,
    merged: bool = False,
    metrics: Mapping[str, Any] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
) -> None:
    """Write ``adamix_config.json``, ``adapter_model.safetensors`` (experts and task head), ``task.json``
    when the model carries a task record (``model.adamix_task``: its task, a prompt's template and label words),
    their ``manifest.json`` (sizes and sha256), and the model card ``README.md`` (``adamix_ds.hub.adapter_card``,
    with the run's ``metrics`` and training ``hyperparameters`` when given) to ``path``.

    ``adamix_config.json`` records what loading the folder back needs (``loading_record``): the backbone, the model's
    task type and a classifier's label names, so that ``load_for_inference`` loads an adapter saved by this function
    alone. ``merged=True`` writes the merged adapter (expert averages, ``num_experts=1``) without changing the
    model; a model already merged by ``merge_adamix`` is saved as it is. Only rank 0 writes; the
    directory appears whole or not at all.
    """
    if getattr(model, "adamix_folded", False):
        raise ValueError("the adapter was folded into the backbone weights (merge_adamix(fold=True)): nothing left to save")
    config = loading_record(model)
    tensors = adapter_state_dict(model, merged=merged)
    if merged:
        config = AdaMixConfig.from_dict({**config.to_dict(), "num_experts": 1, "eval_expert": 0})
    if not _is_main_process():
        return
    with atomic_directory(path) as scratch:
        config.save(scratch)
        task = getattr(model, "adamix_task", None)
        if task is not None:
            (scratch / TASK_NAME).write_text(json.dumps(task, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(scratch / WEIGHTS_NAME), metadata={"format": "pt"})
        write_manifest(scratch)
        # After the manifest: the card is for people to edit (a licence), which must not fail the folder's check.
        adapter_card(config, task, str(path), metrics, hyperparameters).save(scratch / CARD_NAME)


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter saved by ``save_adapter`` into ``model`` and return it.

    A folder with ``manifest.json`` is verified against it first (a truncated, changed or missing file
    is a ``ValueError`` naming it); one without (written by hand or by an older version) is read as it
    is. Loading is strict: a damaged file, a config that decides other shapes, or a missing, unexpected
    or mis-shaped tensor, is a ``ValueError`` that names it; nothing is loaded then. Only JSON and
    safetensors are read: nothing is unpickled. The adapter's task record (``read_task_record``) becomes
    ``model.adamix_task``, so that saving the model again keeps it.
    """
    path = Path(path)
    if has_manifest(path):
        verify_manifest(path)
    saved = AdaMixConfig.load(path)
    task = read_task_record(path)
    weights_file = path / WEIGHTS_NAME
    if not weights_file.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}")
    try:  # before the model is touched: a damaged file leaves it as it was
        tensors = load_file(str(weights_file))
    except SafetensorError as error:  # truncated, empty, or not a safetensors file
        raise ValueError(f"{weights_file} is not a readable safetensors file: {error}") from None
    if getattr(model, "adamix_config", None) is None:
        add_adamix(model, saved)
    current = get_config(model)
    conflicts = [
        f"{f}={getattr(saved, f)!r} in the file but {getattr(current, f)!r} in the model"
        for f in SHAPE_FIELDS
        if getattr(saved, f) != getattr(current, f)
    ]
    if conflicts:
        raise ValueError(f"adapter at {path} does not fit this model: {'; '.join(conflicts)}")

    params = _adapter_parameters(model)
    layers = dict(adamix_layers(model))
    extra_states = {f"{name}.{EXTRA_STATE}": layer.get_extra_state() for name, layer in layers.items()}
    expected = set(params) | set(extra_states)
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"adapter at {path} does not match the model: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    with gathered(list(params.values()), modifier_rank=0):
        wrong = [
            f"{k}: {tuple(tensors[k].shape)} in the file, {tuple(p.shape)} in the model"
            for k, p in {**params, **extra_states}.items()
            if tensors[k].shape != p.shape
        ]
        if wrong:
            raise ValueError(f"adapter at {path} has mis-shaped tensors: {'; '.join(wrong[:5])}")
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(tensors[key])
    for name, layer in layers.items():
        layer.set_extra_state(tensors[f"{name}.{EXTRA_STATE}"])
    if task is not None:
        model.adamix_task = task
    return model


def read_task_record(path: str | Path) -> dict[str, Any] | None:
    """The task record (``task.json``) of the adapter folder ``path``, ``None`` when it has none (a
    classification adapter); ``ValueError`` naming the file when it is not a JSON object."""
    file = Path(path) / TASK_NAME
    if not file.is_file():
        return None
    return read_json_object(file, "task record")


def export_transformers(model: nn.Module, path: str | Path, tokenizer: Any = None) -> None:
    """Fold the merged AdaMix-LoRA of ``model`` into its frozen weights (in place: the adapter modules are
    removed) and write it with ``save_pretrained``, with ``tokenizer`` when given: a plain checkpoint that
    ``AutoModelFor*.from_pretrained`` loads without adamix-ds, with the merged model's outputs. Only rank 0
    writes; the directory appears whole or not at all. A bottleneck adapter cannot be folded (its activation
    sits between its two projections): ``ValueError`` naming the format that holds it."""
    config = get_config(model)
    if config.adapter_type != "lora":
        raise ValueError(
            f"format 'transformers' needs adapter_type='lora', got adapter_type={config.adapter_type!r}: a bottleneck adapter cannot "
            "be folded into the backbone (an activation sits between its projections); allowed for it: format 'adamix'"
        )
    if not getattr(model, "adamix_folded", False):
        merge_adamix(model, fold=True)
    if not _is_main_process():
        return
    with atomic_directory(path) as scratch:
        model.save_pretrained(scratch)
        if tokenizer is not None:
            tokenizer.save_pretrained(scratch)


def _is_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def export_peft(model: nn.Module, path: str | Path) -> None:
    """Write the merged LoRA variant as a PEFT LoRA adapter (``PeftModel.from_pretrained`` loads it).

    Each AdaMix LoRA layer becomes one PEFT LoRA layer with the experts' average as ``lora_A``; a fused
    layer with several adapted output ranges (GPT-2 ``c_attn``: q and v) becomes one rank ``S * r`` LoRA
    with a block-structured ``lora_B``, and ``lora_alpha`` is scaled by ``S`` to keep ``alpha / r``.
    """
    from peft import LoraConfig

    config = loading_record(model)
    if config.adapter_type != "lora":
        raise ValueError(f"export_peft needs adapter_type='lora', got adapter_type={config.adapter_type!r}")
    if getattr(model, "adamix_folded", False):
        raise ValueError("the adapter was folded into the backbone weights (merge_adamix(fold=True)): nothing left to export")
    single = [head for head in getattr(model, "adamix_head_modules", []) if not _is_module(model, head)]
    if single:  # an MLM head's output bias, trained by prompt-based runs with --train_lm_head transform
        raise ValueError(
            f"export_peft: the trained head includes the single parameter {single[0]!r}, which PEFT's modules_to_save cannot "
            "hold (it saves whole modules): train with --train_lm_head none to export"
        )
    merged = adapter_state_dict(model, merged=True)
    tensors: dict[str, torch.Tensor] = {}
    slice_counts, fan_in_fan_out = set(), set()
    for name, layer in adamix_layers(model):
        assert isinstance(layer, AdaMixLoRA)
        lora_a, lora_b = merged[f"{name}.lora_A"][0], merged[f"{name}.lora_B"][0]
        full_b = lora_b.new_zeros(base_features(layer.base_layer)[1], lora_a.shape[0])
        for start, length, block, rows in layer._slice_blocks(lora_b):
            full_b[start : start + length, block] = rows
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = full_b.contiguous()
        slice_counts.add(len(layer.out_slices))
        fan_in_fan_out.add(isinstance(layer.base_layer, Conv1D))
    if len(slice_counts) > 1 or len(fan_in_fan_out) > 1:
        raise ValueError("export_peft needs every adapted layer to have the same number of output ranges and layer type")
    slices = slice_counts.pop()
    for key, _ in head_parameters(model):
        tensors[f"base_model.model.{key}"] = merged[key]
    peft_config = LoraConfig(
        r=config.bottleneck_dim * slices,
        lora_alpha=config.lora_alpha * slices,
        lora_dropout=config.lora_dropout,
        target_modules=[name for name, _ in adamix_layers(model)],
        fan_in_fan_out=fan_in_fan_out.pop(),
        modules_to_save=list(getattr(model, "adamix_head_modules", [])) or None,
        base_model_name_or_path=config.base_model_name_or_path,
        bias="none",
    )
    if not _is_main_process():
        return
    with atomic_directory(path) as scratch:
        peft_config.save_pretrained(str(scratch))
        save_file(tensors, str(scratch / WEIGHTS_NAME), metadata={"format": "pt"})
