"""Frozen-aware memory planner: per-GPU bytes of an AdaMix run under DeepSpeed ZeRO 0-3, before renting GPUs.

    python -m adamix_ds.plan --model microsoft/deberta-v2-xxlarge --gpus 8 --bf16 --gradient_checkpointing \\
        --per_device_train_batch_size 8 --max_seq_length 256 --gpu_memory_gb 80 [--zero all] [--json]

The model (a known name or a ``config.json``) is built on the meta device: nothing is downloaded or allocated.
The launcher's own flags (``--method --adapter_type --num_experts --bottleneck_dim --share_up ...
--per_device_train_batch_size --max_seq_length --gradient_checkpointing --bf16 --fp16``) mean what they mean
for ``launchers/train.py``, with the same defaults. DeepSpeed's estimators assume every parameter is trained;
here only the adapters and the head carry gradients and optimizer state. Per rank, with N data-parallel
ranks, Ψ all parameters, Ψt trained ones, w bytes per 16-bit (or fp32) weight:

| stage | parameters | gradients | optimizer state (fp32 master + 2 moments) |
|---|---|---|---|
| 0 | wΨ | wΨt | 12Ψt |
| 1 | wΨ | wΨt | 12Ψt/N |
| 2 | wΨ | wΨt/N | 12Ψt/N |
| 3 | wΨ/N + wΨp (N > 1) | wΨt/N | 12Ψt/N |

Ψp: parameters of at most ``stage3_param_persistence_threshold`` elements, which ZeRO-3 keeps whole on every
rank besides their partition. Stage 1 counts the full gradients ZeRO-1 holds until they are reduced. In fp32
the master copy is the weight itself at stage 0 (8Ψt of moments) and a separate copy at stages 1-3 (12Ψt).
ZeRO-3 also gathers each layer's full weights while it runs: the largest layer's wΨ is added as working memory.
Offloading moves the optimizer state (and the fp32 gradients it steps with) and, at ZeRO-3, the parameter
partitions to CPU memory (reported separately).

Activations are what autograd keeps for the backward, tallied tensor by tensor on the meta device through
``torch.autograd.graph.saved_tensors_hooks`` (each storage once, parameters excluded: frozen-aware by
construction, since autograd saves nothing for a weight gradient that is never computed), over the stacked
consistency passes the launcher runs, plus the backward's working memory: while the op with the block's
largest saved tensor is differentiated, the gradients of its output and its input (2 x that tensor), and the
gradient of the hidden states flowing between blocks. With gradient checkpointing only each block's inputs
and what is saved outside the blocks stay; the backward recomputes one block at a time, holding its saved
tensors, the working memory above, the recomputed block output and the gradients at the block's output and
input (3 hidden-state tensors in all). These are tensor bytes, what torch's allocator reports at the step's
peak (``torch.cuda.max_memory_allocated`` on a GPU): checked against the peak of real MiniLM steps on CPU, as
torch's CPU allocator reports it to the profiler (``tests/test_plan.py``). The allocator's own overhead (a GPU's
caching allocator reserves more than it hands out; the CUDA context) is not counted. The task head and loss
(O(batch x hidden); for an LM head, batch x sequence x vocabulary) are not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from adamix_ds.backbones import resolve_model_path
from adamix_ds.config import AdaMixConfig
from adamix_ds.consistency import stacked_passes
from adamix_ds.model import add_adamix

# Published configs, written out so that nothing is downloaded (bert-base-uncased, roberta-large,
# microsoft/deberta-v2-xxlarge, gpt2-medium).
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "bert-base": dict(
        model_type="bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=30522
    ),
    "roberta-large": dict(
        model_type="roberta",
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        vocab_size=50265,
        max_position_embeddings=514,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
    ),
    "deberta-v2-xxlarge": dict(
        model_type="deberta-v2",
        hidden_size=1536,
        num_hidden_layers=48,
        num_attention_heads=24,
        intermediate_size=6144,
        vocab_size=128100,
        max_position_embeddings=512,
        relative_attention=True,
        position_buckets=256,
        max_relative_positions=-1,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        conv_kernel_size=3,
        conv_act="gelu",
        position_biased_input=False,
        type_vocab_size=0,
        layer_norm_eps=1e-7,
    ),
    "gpt2-medium": dict(model_type="gpt2", n_embd=1024, n_layer=24, n_head=16, n_positions=1024, vocab_size=50257),
}
# Hub ids of the published configs.
ALIASES = {
    "bert-base-uncased": "bert-base",
    "google-bert/bert-base-uncased": "bert-base",
    "FacebookAI/roberta-large": "roberta-large",
    "microsoft/deberta-v2-xxlarge": "deberta-v2-xxlarge",
    "openai-community/gpt2-medium": "gpt2-medium",
}
STAGES = (0, 1, 2, 3)
# DeepSpeed's default stage3_param_persistence_threshold.
PERSISTENCE_THRESHOLD = 100_000
WEIGHT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GIB = 2**30


@dataclass(frozen=True)
class ParameterCounts:
    """What the model-state estimate needs to know about a model."""

    total: int
    trainable: int
    persistent: int
    largest_layer: int

    @classmethod
    def of(cls, model: nn.Module, persistence_threshold: int = PERSISTENCE_THRESHOLD) -> ParameterCounts:
        """Counts of ``model`` (works on the meta device; shared parameters counted once)."""
        unique = {id(p): p for p in model.parameters()}.values()
        largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
        return cls(
            total=sum(p.numel() for p in unique),
            trainable=sum(p.numel() for p in unique if p.requires_grad),
            persistent=sum(p.numel() for p in unique if p.numel() <= persistence_threshold),
            largest_layer=largest,
        )


def model_state_bytes(
    counts: ParameterCounts,
    stage: int,
    world_size: int,
    precision: str = "bf16",
    offload_optimizer: bool = False,
    offload_param: bool = False,
) -> dict[str, float]:
    """Frozen-aware model-state bytes per rank (see the module docstring): GPU ``parameters``, ``gradients``,
    ``optimizer_state`` and their ``total``, the ZeRO-3 ``gathered`` working memory (not in ``total``) and ``cpu``
    (what offloading puts in host memory). Offloading applies where DeepSpeed has it: the optimizer at stages 1-3,
    the parameters at stage 3."""
    n, w = world_size, WEIGHT_BYTES[precision]
    optimizer_bytes = 8 if precision == "fp32" and stage == 0 else 12
    parameters = w * counts.total / n + (w * counts.persistent if n > 1 else 0) if stage == 3 else w * counts.total
    gradients = w * counts.trainable / (n if stage >= 2 else 1)
    optimizer_state = optimizer_bytes * counts.trainable / (n if stage >= 1 else 1)
    gathered = w * counts.largest_layer if stage == 3 and n > 1 else 0.0
    cpu = 0.0
    if offload_optimizer and stage >= 1:
        # DeepSpeedCPUAdam steps fp32 gradients on the host: 4 bytes per trained parameter beside the state.
        cpu += optimizer_state + 4 * counts.trainable / n
        optimizer_state = 0.0
    if offload_param and stage == 3:
        cpu += w * counts.total / n
        parameters = w * counts.persistent
    return {
        "parameters": parameters,
        "gradients": gradients,
        "optimizer_state": optimizer_state,
        "total": parameters + gradients + optimizer_state,
        "gathered": gathered,
        "cpu": cpu,
    }


# -- models -----------------------------------------------------------------------------------------
def load_config(model: str, num_labels: int = 2) -> PretrainedConfig:
    """The config of ``model``: a published name or Hub id (``PUBLISHED_CONFIGS``, ``ALIASES``), the launcher's
    default MiniLM, a ``config.json`` or a folder with one. Nothing is downloaded; ``ValueError`` otherwise."""
    name = ALIASES.get(model, model)
    if name in PUBLISHED_CONFIGS:
        values = dict(PUBLISHED_CONFIGS[name])
        return AutoConfig.for_model(values.pop("model_type"), num_labels=num_labels, **values)
    path = Path(resolve_model_path(model))
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        known = ", ".join([*PUBLISHED_CONFIGS, *ALIASES])
        raise ValueError(f"model={model!r} is unknown: allowed a config.json, a folder with one, or {known}")
    return AutoConfig.from_pretrained(str(path), num_labels=num_labels)


def build_meta_model(config: PretrainedConfig, adamix: AdaMixConfig | None, precision: str = "fp32") -> nn.Module:
    """The launcher's model (a sequence classifier, AdaMix injected unless ``adamix`` is None) on the meta device."""
    config = config.__class__.from_dict(config.to_dict())
    # No pad id: transformers would otherwise look for padding in the ids, which meta tensors cannot answer.
    config.pad_token_id = None
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config, dtype=DTYPES[precision])
    return model if adamix is None else add_adamix(model, adamix)


# -- activations ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ActivationBytes:
    """Bytes autograd keeps between the forward and the backward of one micro-batch (all stacked passes)."""

    saved: int
    largest_block: int
    block_inputs: int
    outside_blocks: int
    largest_tensor: int
    hidden_states: int

    @property
    def backward_working(self) -> int:
        """The gradients the backward holds besides what is saved: the output and input gradients of the op with
        the largest saved tensor, and the gradient of the hidden states between blocks."""
        return 2 * self.largest_tensor + self.hidden_states

    @property
    def without_checkpointing(self) -> int:
        """Everything saved, plus the backward's working memory."""
        return self.saved + self.backward_working

    @property
    def with_checkpointing(self) -> int:
        """Block inputs and what is saved outside the blocks, plus one block recomputed: its saved tensors, the
        working memory, and its recomputed output and the gradients at its output and input."""
        return self.outside_blocks + self.block_inputs + self.largest_block + self.backward_working + 2 * self.hidden_states


@contextlib.contextmanager
def _tally(model: nn.Module) -> Iterator[dict[str, Any]]:
    """Count, per Transformer block, the bytes of every storage autograd saves inside the block, the largest of
    them, and the blocks' inputs (the hidden states: the largest input)."""
    own = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    seen: set[int] = set()
    tally: dict[str, Any] = {"blocks": [], "inputs": 0, "outside": 0, "largest": 0, "hidden": 0}
    current: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in own and storage._cdata not in seen:
            seen.add(storage._cdata)
            if current:
                tally["blocks"][current[-1]] += storage.nbytes()
                tally["largest"] = max(tally["largest"], storage.nbytes())
            else:
                tally["outside"] += storage.nbytes()
        return tensor

    def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
        current.append(len(tally["blocks"]))
        tally["blocks"].append(0)
        inputs = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in [*args, *kwargs.values()] if torch.is_tensor(t)}
        tally["inputs"] += sum(inputs.values())
        tally["hidden"] = max(tally["hidden"], *inputs.values(), 0)

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        current.pop()

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    handles = [h for b in blocks for h in (b.register_forward_pre_hook(enter, with_kwargs=True), b.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield tally
    finally:
        for handle in handles:
            handle.remove()


def estimate_activations(model: nn.Module, batch_size: int, seq_len: int, passes: int = 1) -> ActivationBytes:
    """Activation bytes of one training micro-batch of ``batch_size`` x ``seq_len`` tokens through ``model`` (on the
    meta device), with ``passes`` routed passes stacked along the batch as ``adamix_loss`` runs them."""
    was_training = model.training
    model.train()
    ids = torch.ones(passes * batch_size, seq_len, dtype=torch.long, device="meta")
    try:
        with _tally(model) as tally, stacked_passes(model, passes):
            model.base_model(input_ids=ids)
    finally:
        model.train(was_training)
    blocks = tally["blocks"]
    return ActivationBytes(
        saved=tally["outside"] + sum(blocks),
        largest_block=max(blocks, default=0),
        block_inputs=tally["inputs"],
        outside_blocks=tally["outside"],
        largest_tensor=tally["largest"],
        hidden_states=tally["hidden"],
    )


# -- the plan ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanSettings:
    """One run's shape, as the launcher would run it."""

    precision: str
    batch_size: int
    seq_len: int
    passes: int
    gradient_checkpointing: bool
    offload_optimizer: bool
    offload_param: bool
    persistence_threshold: int


def plan_row(counts: ParameterCounts, activations: ActivationBytes, settings: PlanSettings, stage: int, gpus: int, **offload: bool) -> dict:
    """Per-GPU bytes of one (stage, GPU count, offload): ``params``, ``grads``, ``optimizer``, ``activations``,
    ``gathered`` (ZeRO-3), ``total`` and host ``cpu`` bytes."""
    offload = {"offload_optimizer": settings.offload_optimizer, "offload_param": settings.offload_param, **offload}
    states = model_state_bytes(counts, stage, gpus, settings.precision, **offload)
    act = activations.with_checkpointing if settings.gradient_checkpointing else activations.without_checkpointing
    return {
        "stage": stage,
        "gpus": gpus,
        "offload_optimizer": offload["offload_optimizer"] and stage >= 1,
        "offload_param": offload["offload_param"] and stage == 3,
        "params": states["parameters"],
        "grads": states["gradients"],
        "optimizer": states["optimizer_state"],
        "activations": act,
        "gathered": states["gathered"],
        "total": states["total"] + act + states["gathered"],
        "cpu": states["cpu"],
    }


def gpu_counts(total: int) -> list[int]:
    """Powers of two below ``total``, then ``total``."""
    return sorted({2**k for k in range(int(math.log2(total)) + 1)} | {total})


def cheapest(rows: list[dict], gpu_memory: float) -> dict | None:
    """The fitting row with the fewest GPUs, then without offload, then at the lowest stage (least communication)."""
    fitting = [r for r in rows if r["total"] <= gpu_memory]
    return min(fitting, key=lambda r: (r["gpus"], r["offload_param"], r["offload_optimizer"], r["stage"]), default=None)


def make_plan(model: nn.Module, settings: PlanSettings, stages: list[int], gpus: int, gpu_memory_gb: float | None = None) -> dict[str, Any]:
    """Every number the planner reports for ``model`` (meta, AdaMix injected) on ``gpus`` GPUs in all."""
    counts = ParameterCounts.of(model, settings.persistence_threshold)
    activations = estimate_activations(model, settings.batch_size, settings.seq_len, settings.passes)
    rows = [plan_row(counts, activations, settings, stage, gpus) for stage in stages]
    table = [plan_row(counts, activations, settings, stage, n) for n in gpu_counts(gpus) for stage in stages]
    result: dict[str, Any] = {
        "counts": asdict(counts),
        "settings": asdict(settings),
        "activations": {
            "without_checkpointing": activations.without_checkpointing,
            "with_checkpointing": activations.with_checkpointing,
            "saved": activations.saved,
            "largest_block": activations.largest_block,
        },
        "stages": rows,
        "table": table,
    }
    if gpu_memory_gb is not None:
        memory = gpu_memory_gb * GIB
        for row in rows + table:
            row["fits"] = row["total"] <= memory
        # Offloading is searched too when the user did not choose it: it trades host memory for GPU memory.
        variants = (
            [{}]
            if settings.offload_optimizer or settings.offload_param
            else [{}, {"offload_optimizer": True}, {"offload_optimizer": True, "offload_param": True}]
        )
        candidates = [plan_row(counts, activations, settings, s, n, **v) for n in gpu_counts(gpus) for s in stages for v in variants]
        result["gpu_memory_gb"] = gpu_memory_gb
        result["cheapest"] = cheapest(candidates, memory)
    return result


# -- command line -----------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise ValueError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="plan",
        description="Per-GPU memory of an AdaMix run under DeepSpeed ZeRO 0-3 (frozen-aware). Any other flag is the "
        "launcher's (launchers/train.py --help): --method --adapter_type --num_experts --bottleneck_dim --share_up "
        "--share_down --consistency_weight --per_device_train_batch_size --max_seq_length --gradient_checkpointing --bf16 --fp16.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="A published name or Hub id (bert-base, roberta-large, deberta-v2-xxlarge, gpt2-medium), or a config.json.",
    )
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per node.")
    parser.add_argument("--nodes", type=int, default=1, help="Nodes.")
    parser.add_argument("--zero", default="all", help="ZeRO stage 0, 1, 2, 3 or all.")
    parser.add_argument("--offload_optimizer", action="store_true", help="Optimizer state on CPU (ZeRO 1-3).")
    parser.add_argument("--offload_param", action="store_true", help="Parameter partitions on CPU (ZeRO-3).")
    parser.add_argument(
        "--gpu_memory_gb", type=float, default=None, help="GPU memory in GiB: says what fits and the cheapest fitting configuration."
    )
    parser.add_argument(
        "--persistence_threshold",
        type=int,
        default=PERSISTENCE_THRESHOLD,
        help="ZeRO-3 stage3_param_persistence_threshold (ds_configs/zero3*.json: 0).",
    )
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of tables.")
    return parser


def parse(argv: list[str]) -> tuple[argparse.Namespace, nn.Module, PlanSettings, list[int]]:
    """Planner flags, the launcher's flags, the meta model and the stages; ``ValueError`` names the first bad value."""
    from adamix_ds.data import get_task_spec
    from adamix_ds.training.arguments import adamix_config, parse_args

    args, rest = _parser().parse_known_args(argv)
    for name in ("gpus", "nodes"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}={getattr(args, name)} is invalid: allowed an integer >= 1")
    if args.gpu_memory_gb is not None and not args.gpu_memory_gb > 0:
        raise ValueError(f"gpu_memory_gb={args.gpu_memory_gb} is invalid: allowed a positive number")
    if args.persistence_threshold < 0:
        raise ValueError(f"persistence_threshold={args.persistence_threshold} is invalid: allowed an integer >= 0")
    if args.zero not in {*map(str, STAGES), "all"}:
        raise ValueError(f"zero={args.zero!r} is invalid: allowed 0, 1, 2, 3 or all")
    stages = list(STAGES) if args.zero == "all" else [int(args.zero)]
    if args.offload_param and 3 not in stages:
        raise ValueError(f"offload_param needs ZeRO-3, got --zero {args.zero}")
    run = parse_args(["--model_name_or_path", args.model, *rest])
    training = run.training
    precision = "bf16" if training.bf16 else "fp16" if training.fp16 else "fp32"
    adamix = adamix_config(run)
    model = build_meta_model(load_config(args.model, get_task_spec(run.data.task_name).num_labels), adamix, precision)
    passes = 2 if adamix is not None and adamix.consistency_weight > 0 and run.adamix.method == "adamix" else 1
    settings = PlanSettings(
        precision=precision,
        batch_size=training.per_device_train_batch_size,
        seq_len=run.data.max_seq_length,
        passes=passes,
        gradient_checkpointing=training.gradient_checkpointing,
        offload_optimizer=args.offload_optimizer,
        offload_param=args.offload_param,
        persistence_threshold=args.persistence_threshold,
    )
    return args, model, settings, stages


def _gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def _where(row: dict) -> str:
    offload = [name for name, on in (("optimizer", row["offload_optimizer"]), ("params", row["offload_param"])) if on]
    return f"ZeRO-{row['stage']} on {row['gpus']} GPU(s)" + (f", {' + '.join(offload)} offloaded to CPU" if offload else "")


def format_plan(model_name: str, result: dict[str, Any]) -> str:
    """The plan as text tables (GiB per GPU)."""
    counts, settings, act = result["counts"], result["settings"], result["activations"]
    columns = ["stage", "GPUs", "params", "grads", "optimizer", "activations", "gathered", "total", "CPU"]
    if "gpu_memory_gb" in result:
        columns.append("fits")

    def table(rows: list[dict]) -> list[str]:
        lines = [" | ".join(f"{c:>11}" for c in columns)]
        for row in rows:
            cells = [
                row["stage"],
                row["gpus"],
                *(_gib(row[k]) for k in ("params", "grads", "optimizer", "activations", "gathered", "total", "cpu")),
            ]
            if "fits" in row:
                cells.append("yes" if row["fits"] else "no")
            lines.append(" | ".join(f"{c!s:>11}" for c in cells))
        return lines

    lines = [
        f"{model_name}: {counts['total']:,} parameters, {counts['trainable']:,} trained (adapters + head), "
        f"{counts['persistent']:,} ZeRO-3-persistent (threshold {settings['persistence_threshold']:,}), largest layer {counts['largest_layer']:,}",
        f"{settings['precision']}, micro-batch {settings['batch_size']} x {settings['seq_len']} tokens, {settings['passes']} stacked pass(es); "
        f"activations {_gib(act['without_checkpointing'])} GiB without, {_gib(act['with_checkpointing'])} GiB with gradient checkpointing "
        f"({'on' if settings['gradient_checkpointing'] else 'off'}; tensors autograd saves, tallied on the meta device, + the backward's working memory)",
        "",
        f"GiB per GPU on {result['stages'][0]['gpus']} GPU(s):",
        *table(result["stages"]),
        "",
        "GiB per GPU by GPU count:",
        *table(result["table"]),
    ]
    if "gpu_memory_gb" in result:
        best = result["cheapest"]
        lines += [
            "",
            f"cheapest fitting {result['gpu_memory_gb']:g} GiB: {_where(best)}, {_gib(best['total'])} GiB per GPU"
            if best is not None
            else f"nothing fits {result['gpu_memory_gb']:g} GiB per GPU: lower --per_device_train_batch_size or --max_seq_length, or add GPUs",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m adamix_ds.plan``: bad input is one line ``plan: error: ...`` and exit code 2."""
    import json
    import os

    # The planner never runs DeepSpeed; naming the accelerator keeps DeepSpeed's auto-detect warning (printed when
    # the launcher's argument module imports it) out of the one-line error.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from adamix_ds.distributed import dist_env
    from adamix_ds.training.runtime import usage_errors

    with usage_errors(dist_env(), prog="plan"):
        args, model, settings, stages = parse(list(sys.argv[1:] if argv is None else argv))
    result = make_plan(model, settings, stages, args.gpus * args.nodes, args.gpu_memory_gb)
    result["model"] = args.model
    print(json.dumps(result, indent=2) if args.json else format_plan(args.model, result))


if __name__ == "__main__":
    main()
