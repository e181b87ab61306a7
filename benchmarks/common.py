"""What the benchmark scripts share: the command line, backbones, the single-adapter references, output.

The single adapter and single LoRA here are deliberately written from scratch (``nn.Linear`` modules, no
``adamix_ds.layer`` code): they are the baselines AdaMix is measured against, so they must not share
its implementation. They sit in the same slots as AdaMix (``add_adamix``'s placement, freezing and task
heads are reused, then every AdaMix layer is swapped for a plain one).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import inspect
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, HfArgumentParser, PretrainedConfig

from adamix_ds import AdaMixConfig, add_adamix
from adamix_ds.data import read_glue_folder
from adamix_ds.distributed import dist_env
from adamix_ds.layer import AdaMixLayer, AdaMixLoRA, base_features
from adamix_ds.plan import PUBLISHED_CONFIGS
from adamix_ds.training.runtime import usage_errors

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO_ROOT / "benchmarks"
RESULTS_DIR = BENCH_DIR / "results"
DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "glue"

# The published configs (bert-base-uncased, roberta-large, microsoft/deberta-v2-xxlarge, gpt2-medium) the planner
# knows. Encoders get a 2-class head (GLUE); GPT-2 is the causal LM of the paper's E2E experiments.
BACKBONES = PUBLISHED_CONFIGS


# -- command line ---------------------------------------------------------------------------------
def _docstring_args(fn: Callable) -> dict[str, str]:
    """``{name: help}`` from the ``Args:`` section of ``fn``'s Google-style docstring."""
    doc = inspect.getdoc(fn) or ""
    section = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    helps: dict[str, str] = {}
    name = None
    for line in section.splitlines():
        match = re.match(r"^    (\w+): (.*)$", line)
        if match:
            name = match.group(1)
            helps[name] = match.group(2)
        elif name and line.startswith("        "):
            helps[name] += " " + line.strip()
        elif line.strip() and not line.startswith(" "):
            break
    return helps


def arguments_dataclass(fn: Callable[..., Any]) -> type:
    """A dataclass of ``fn``'s parameters (types, defaults, help from the docstring): what ``HfArgumentParser`` turns
    into flags, as the launchers' argument dataclasses are."""
    hints = typing.get_type_hints(fn)
    helps = _docstring_args(fn)
    fields = []
    for name, param in inspect.signature(fn).parameters.items():
        default, metadata = param.default, {"help": helps.get(name, "")}
        if isinstance(default, list):  # a dataclass field may not hold a mutable default
            value = dataclasses.field(default_factory=lambda d=default: list(d), metadata=metadata)
        else:
            value = dataclasses.field(default=default, metadata=metadata)
        fields.append((name, hints[name], value))
    return dataclasses.make_dataclass(f"{fn.__name__}_arguments", fields)


def cli(fn: Callable[..., dict[str, Any]], argv: list[str] | None = None, check: Callable[[dict[str, Any]], object] | None = None) -> int:
    """Run ``fn`` with flags made from its signature (``--name``, typed, defaults and help from the docstring), parsed
    by ``HfArgumentParser`` like every launcher's.

    ``check(arguments)`` validates the inputs first: a ``ValueError`` or ``OSError`` there is bad input, reported
    as the launcher reports it (one line, exit 2). ``fn`` returns its results; a non-empty
    ``results["failures"]`` is printed and makes the exit status 1.
    """
    parser = HfArgumentParser(arguments_dataclass(fn), description=(inspect.getdoc(fn) or "").split("\n\n")[0])
    (parsed,) = parser.parse_args_into_dataclasses(argv)
    arguments = dataclasses.asdict(parsed)
    if check is not None:
        with usage_errors(dist_env(), prog=Path(sys.argv[0]).name):
            check(arguments)
    results = fn(**arguments)
    for failure in results.get("failures", []):
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if results.get("failures") else 0


# -- environment and output -----------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Machine, library versions and date: the header every results table is read against."""
    import deepspeed
    import psutil
    import transformers

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        info["peft"] = None
    return info


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_rounds(
    names: list[str], run: Callable[[str, int], None], rounds: int, steps: int = 1, warmup: int = 0, device: str = "cpu"
) -> dict[str, list[float]]:
    """Seconds per call of ``run(name, i)`` for each name, one value per round. Every name runs ``warmup`` calls
    first; then each round runs every name for ``steps`` calls, in an order rotated by one each round, so that
    machine noise hits all names alike."""
    for name in names:
        for i in range(warmup):
            run(name, i)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            _synchronize(device)
            start = time.perf_counter()
            for i in range(steps):
                run(name, round_index * steps + i)
            _synchronize(device)
            times[name].append((time.perf_counter() - start) / steps)
    return times


def median_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of ``name``'s time / ``reference``'s time in the same round."""
    return statistics.median(a / b for a, b in zip(times[name], times[reference], strict=True))


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; the first column left-aligned, the rest right-aligned."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, results: dict[str, Any], markdown: str, out_dir: Path = RESULTS_DIR) -> None:
    """Write ``<name>.json`` (the numbers) and ``<name>.md`` (the section ``run_all.py`` puts in RESULTS.md)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    (out_dir / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(markdown)


# -- models ---------------------------------------------------------------------------------------
def backbone_config(name: str, num_labels: int = 2) -> PretrainedConfig:
    """The published config of backbone ``name`` (see ``BACKBONES``), eager attention."""
    if name not in BACKBONES:
        raise ValueError(f"backbone={name!r} is unknown: allowed {', '.join(BACKBONES)}")
    values = dict(BACKBONES[name])
    config = AutoConfig.for_model(values.pop("model_type"), num_labels=num_labels, **values)
    config.pad_token_id = meta_pad_token_id(config.model_type)
    return config


def meta_pad_token_id(model_type: str) -> int | None:
    """The pad id a ``model_type`` model counted on ``token_inputs`` batches needs.

    One only where the model derives its position ids from it (RoBERTa: 1, as published; the batches' ids
    are 0). Elsewhere none: transformers would look for padding in the ids, a data-dependent check that meta
    tensors cannot answer. Every benchmark batch is full, and the pad id changes no FLOP.
    """
    return 1 if model_type == "roberta" else None


def build_backbone(name: str, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Backbone ``name`` with its task head, eager attention, on ``device`` without initialising weights.

    On ``"meta"`` nothing is allocated. On a real device the weights and buffers are allocated and
    zeroed: FLOP counters read shapes, not values, and zeros cannot produce NaNs or slow denormals.
    """
    config = backbone_config(name)
    auto = AutoModelForCausalLM if config.model_type == "gpt2" else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(config, attn_implementation="eager", dtype=dtype)
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.zero_()
    return model


def structural_copy(model: nn.Module) -> nn.Module:
    """A new module tree over the same parameter and buffer tensors: inject adapters without copying weights."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def token_inputs(batch_size: int, seq_len: int, device: str | torch.device) -> dict[str, torch.Tensor]:
    """A full batch of token ids, nothing else: each model derives its position ids and an all-ones mask.

    Given position ids or a mask, transformers (5.25) checks them for packed sequences or padding:
    data-dependent questions that meta tensors cannot answer.
    """
    return {"input_ids": torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)}


def training_labels(config: PretrainedConfig, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token labels for a causal LM, one class per sequence for a classifier."""
    ids = inputs["input_ids"]
    return ids if config.model_type == "gpt2" else ids[:, 0]


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class SingleAdapter(nn.Module):
    """One bottleneck adapter on a layer's output: ``h + up(act(down(h)))``, the paper's baseline."""

    def __init__(self, base_layer: nn.Module, rank: int, activation: str) -> None:
        super().__init__()
        _, hidden = base_features(base_layer)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.base_layer = base_layer
        self.down = nn.Linear(hidden, rank, **factory)
        self.up = nn.Linear(rank, hidden, **factory)
        self.activation = ACTIVATIONS[activation]
        for linear in (self.down, self.up):
            nn.init.normal_(linear.weight, 0.0, 0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        hidden = self.base_layer(x, *args, **kwargs)
        return hidden + self.up(self.activation(self.down(hidden)))


class SingleLoRA(nn.Module):
    """One LoRA on some output ranges of a layer: ``base(x) + B A dropout(x) * alpha / r`` (microsoft/LoRA)."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float, out_slices: list[tuple[int, int]]) -> None:
        super().__init__()
        in_features, _ = base_features(base_layer)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.base_layer = base_layer
        self.out_slices = out_slices
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.lora_A = nn.Linear(in_features, rank * len(out_slices), bias=False, **factory)
        self.lora_B = nn.ModuleList(nn.Linear(rank, length, bias=False, **factory) for _, length in out_slices)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        for linear in self.lora_B:
            nn.init.zeros_(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        low_rank = self.lora_A(self.dropout(x)) * self.scaling
        if self.out_slices == [(0, out.shape[-1])]:
            return out + self.lora_B[0](low_rank)
        pieces, cursor = [], 0
        for (start, length), blocks, up in zip(self.out_slices, low_rank.chunk(len(self.out_slices), dim=-1), self.lora_B, strict=True):
            pieces += [out[..., cursor:start], out[..., start : start + length] + up(blocks)]
            cursor = start + length
        pieces.append(out[..., cursor:])
        return torch.cat(pieces, dim=-1)


def single_adapter_model(model: nn.Module, config: AdaMixConfig) -> nn.Module:
    """``model`` with one plain adapter (or LoRA) of ``config``'s size in each AdaMix slot, in place.

    ``add_adamix`` places, freezes and unfreezes the head exactly as for AdaMix; its layers are then
    replaced by ``SingleAdapter`` / ``SingleLoRA`` around the same frozen base layers.
    """
    add_adamix(model, AdaMixConfig.from_dict({**config.to_dict(), "num_experts": 1, "eval_expert": 0}))
    for name, module in list(model.named_modules()):
        if not isinstance(module, AdaMixLayer):
            continue
        if isinstance(module, AdaMixLoRA):
            plain = SingleLoRA(module.base_layer, config.bottleneck_dim, config.lora_alpha, config.lora_dropout, module.out_slices)
        else:
            plain = SingleAdapter(module.base_layer, config.bottleneck_dim, config.activation)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, plain)
    del model.adamix_config  # no longer an AdaMix model: nothing may treat it as one
    return model


# -- data -----------------------------------------------------------------------------------------
def sst2_sentences(data_dir: Path, limit: int) -> tuple[list[str], list[int]]:
    """The first ``limit`` SST-2 training sentences and labels from a GLUE folder: ``glue/`` or ``glue/SST-2``,
    the same convention as the launcher's ``--data_dir``."""
    train, _ = read_glue_folder("sst2", data_dir)
    rows = train.select(range(min(limit, len(train))))
    return list(rows["sentence"]), [int(label) for label in rows["labels"]]
