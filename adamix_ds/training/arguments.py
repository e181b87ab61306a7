"""The launcher's command line: five typed argument groups with ``run_glue.py``'s and ``generate``'s names.

``parse_args`` turns ``argv`` into ``RunArguments`` (model, data, adamix, generation, training); ``--help``
lists the groups. Every value is checked here or by the object it configures, and a bad one is a ``ValueError``
whose one-line message names it (the launcher turns it into exit code 2).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

from transformers import HfArgumentParser

from adamix_ds.backbones import DEFAULT_MODEL
from adamix_ds.config import AdaMixConfig
from adamix_ds.data import CUSTOM_TASK, GenerationTaskSpec, get_task_spec
from adamix_ds.families import Decoding
from adamix_ds.optim import UnroutedExperts
from adamix_ds.prompts import parse_label_words, prompt_setup
from adamix_ds.training.eval_modes import parse_eval_modes
from adamix_ds.training.merges import HELD_OUT_MERGES

DEFAULT_TASK = "sst2"
# The demo run (no --model_name_or_path and no --task_name): MiniLM on a slice of SST-2, sized to finish
# in a few minutes on 2 CPU cores. Flags given on the command line still win.
DEMO_PRESET: dict[str, Any] = {
    "max_train_samples": 6000,
    "max_seq_length": 64,
    "num_train_epochs": 1.0,
    "per_device_train_batch_size": 16,
    "learning_rate": 3e-3,
}
REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@dataclass
class ModelArguments:
    """Which pretrained model to adapt."""

    _argument_group_name = "model"

    model_name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "Hub id or local folder of the backbone (a sequence-classification model is built on it)."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's own."})
    adapter_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Start from a saved AdaMix adapter (output_dir/experts or output_dir/adapter of an earlier run)."},
    )
    backbone_dropout: float | None = field(
        default=None,
        metadata={
            "help": "Set every dropout probability in the backbone's config (GPT-2's attn/resid/embd_pdrop, BERT's hidden and "
            "attention dropout, ...) to this value; 0 turns the backbone's dropout off, as in the reference GPT-2 (the adapters' "
            "own LoRA dropout stays). Default: the checkpoint's own."
        },
    )


@dataclass
class DataArguments:
    """Which task, from where, and how much of it."""

    _argument_group_name = "data"

    task_name: str = field(
        default=DEFAULT_TASK,
        metadata={
            "help": "GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), few-shot task (subj, mpqa, sst5, mr, cr, trec, "
            "snli) or generation task (e2e_nlg: a causal LM writes the text of a meaning representation)."
        },
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "A GLUE folder (glue/ or glue/SST-2), an LM-BFF k-shot folder (k-shot/SST-2/16-13: its train/dev, "
            "GLUE dev as test) or a LiST split (list/SST-2/30-1: its train, the task's test file as test); {seed} in it "
            "becomes --seed (list/SST-2/30-{seed}: LiST trains split s with seed s). e2e_nlg: a folder of E2E files "
            "(trainset.csv, devset.csv, testset_w_refs.csv, or the LoRA code's train/valid/test.txt; without a training "
            "file it trains on dev and evaluates on test). "
            "Default: the task's copy in ../shared/data beside the repository if there is one, else the Hub."
        },
    )
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated; batches are padded to their longest."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training examples."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep the first N examples of every evaluation split (e2e_nlg: decode the first N MRs)."}
    )
    holdout_samples: int | None = field(
        default=None,
        metadata={
            "help": "Remove the last N training examples before training and keep them as a held-out split, what the "
            "greedy_soup and best_expert merges (--merge, --eval_modes) select on (never the split that is reported)."
        },
    )
    prompt: bool = field(
        default=False,
        metadata={
            "help": "Prompt-based fine-tuning (LM-BFF/LiST): the pretrained LM head predicts a label word at the template's mask; "
            "no new classifier. Needs a masked LM (*ForMaskedLM) or a causal LM."
        },
    )
    template: str | None = field(
        default=None,
        metadata={
            "help": "With --prompt: the template, LM-BFF's syntax ('*cls**sent_0*_It_was*mask*.*sep+*') or a readable one "
            "('{sentence} It was {mask}.'). Default: the task's built-in LM-BFF template."
        },
    )
    label_words: str | None = field(
        default=None,
        metadata={
            "help": 'With --prompt: JSON label -> word (\'{"0": "terrible", "1": "great"}\'; STS-B: its poles 0 and 1), each '
            "one token with a leading space. Default: the task's built-in LM-BFF label words."
        },
    )


@dataclass
class AdaMixArguments:
    """The parameter-efficient method and its shape."""

    _argument_group_name = "adamix"

    method: Literal["adamix", "adapter", "lora", "full"] = field(
        default="adamix",
        metadata={"help": "adamix: mixture of adapters; adapter: one bottleneck adapter; lora: one LoRA; full: fine-tune everything."},
    )
    adapter_type: Literal["bottleneck", "lora"] | None = field(
        default=None,
        metadata={
            "help": "What --method adamix mixes: bottleneck adapters on the FFN output (default) or LoRA on query/value (AdaMix-LoRA)."
        },
    )
    num_experts: int | None = field(default=None, metadata={"help": "Experts per projection (default 4 for adamix; 1 for adapter/lora)."})
    lora_alpha: float = field(
        default=32.0, metadata={"help": "LoRA scaling numerator: the update is scaled by lora_alpha / bottleneck_dim."}
    )
    bottleneck_dim: int = field(default=16, metadata={"help": "Adapter bottleneck size (LoRA rank for --method lora)."})
    share_up: bool = field(default=True, metadata={"help": "One shared up projection for all experts (the paper's setting)."})
    share_down: bool = field(default=False, metadata={"help": "One shared down projection for all experts."})
    expert_init: Literal["independent", "shared"] | None = field(
        default=None,
        metadata={
            "help": "independent: every expert drawn separately; shared: all experts start from one draw and differ only "
            "through routing. Default: the reference code's choice for the adapter type (bottleneck independent, LoRA shared)."
        },
    )
    consistency_weight: float | None = field(
        default=None, metadata={"help": "Weight of the two-pass consistency loss (default 1 for adamix; 0 otherwise)."}
    )
    expert_lr_scale: float = field(
        default=1.0,
        metadata={
            "help": "Learning-rate multiplier of the routed experts (projections with more than one expert): each is routed in "
            "about 1/num_experts of the passes, so it takes fewer steps than a single adapter. 1 is the paper."
        },
    )
    unrouted_experts: UnroutedExperts = field(
        default="zero_grad",
        metadata={
            "help": "What an optimizer step does to an expert no pass routed to since the previous step. zero_grad: AdamW acts on "
            "its zero gradient (momentum, decay), as in the paper's runs, whose PyTorch 1.x zero_grad() left zero gradients; "
            "untouched: nothing (each expert its own parameter with no gradient). No effect without routed experts."
        },
    )
    eval_mode: Literal["merged", "random", "fixed", "ensemble"] = field(
        default="merged", metadata={"help": "Routing at evaluation: merged (averaged experts, the paper), random, fixed or ensemble."}
    )
    eval_expert: int = field(default=0, metadata={"help": "The expert of every projection that --eval_mode fixed uses."})
    eval_modes: str | None = field(
        default=None,
        metadata={
            "help": "At the end, also evaluate every routing of the final experts: 'all' or a list of merged,ensemble,fixed,random "
            "(each single expert; --random_draws random routings) and the merges greedy_soup,fisher,best_expert (see --merge), "
            "written to output_dir/eval_modes.json."
        },
    )
    random_draws: int = field(default=10, metadata={"help": "Random-routing evaluations for --eval_modes random."})
    merge: Literal["uniform", "greedy_soup", "fisher", "best_expert"] = field(
        default="uniform",
        metadata={
            "help": "How output_dir/adapter merges the experts: uniform (their average, the paper), greedy_soup (experts sorted "
            "by their held-out loss, each kept only if the soup's does not rise; needs --holdout_samples), fisher (each "
            "element weighted by the experts' diagonal Fisher over --fisher_batches training batches; ZeRO 0-2) or best_expert "
            "(the one expert with the lowest held-out loss; needs --holdout_samples)."
        },
    )
    fisher_batches: int = field(
        default=8, metadata={"help": "Training batches (of --per_device_eval_batch_size) that estimate the Fisher merge."}
    )
    target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated regular expressions of the modules to adapt (matched at the end of module names), for a "
            "model without a built-in placement. Default: the built-in placement of the model type."
        },
    )
    train_lm_head: Literal["transform", "none", "all"] = field(
        default="transform",
        metadata={
            "help": "With --prompt, what of the pretrained LM head trains: transform (an MLM head's dense, LayerNorm and bias; "
            "nothing of a causal LM's), none, or all (also the vocabulary matrix, usually tied to the input embeddings)."
        },
    )


@dataclass
class GenerationArguments:
    """How a generation task decodes at evaluation (``generate``'s names; defaults: the paper's E2E settings)."""

    _argument_group_name = "generation"

    num_beams: int = field(default=10, metadata={"help": "Beam size."})
    length_penalty: float = field(default=0.8, metadata={"help": "Beam scores are sum log p / generated_length ** length_penalty."})
    no_repeat_ngram_size: int = field(default=4, metadata={"help": "No n-gram of this size twice among the generated tokens (0: off)."})
    max_new_tokens: int = field(default=64, metadata={"help": "At most this many generated tokens; EOS ends a hypothesis earlier."})

    def decoding(self) -> Decoding:
        """These settings as ``adamix_ds.families.Decoding`` (``ValueError`` names a bad one)."""
        return Decoding(**dataclasses.asdict(self))


@dataclass
class TrainingArguments:
    """How to train, evaluate and save (``transformers.TrainingArguments`` names where they overlap)."""

    _argument_group_name = "training"

    output_dir: str | None = field(
        default=None, metadata={"help": "Where checkpoints, adapters and metrics go (default outputs/<task>_<method>)."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start afresh in a non-empty output_dir instead of resuming."})
    deepspeed: str | None = field(
        default=None, metadata={"help": "DeepSpeed config JSON (default ds_configs/zero2.json of this repository)."}
    )
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision (the config's bf16.enabled)."})
    fp16: bool = field(default=False, metadata={"help": "float16 mixed precision with loss scaling (the config's fp16.enabled)."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute each Transformer block's activations in the backward (with the forward's experts) to save memory."},
    )
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Micro-batch per rank."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch per rank."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=4e-4, metadata={"help": "Peak learning rate (AdaMix recipe; about 2e-5 suits --method full)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on weights (on biases too with --decay_biases)."})
    decay_biases: bool = field(
        default=False,
        metadata={
            "help": "Apply --weight_decay to biases and other 1-D parameters too, as the reference E2E code does (its AdamW "
            "decays every trainable parameter); off: weights only, run_glue.py's grouping."
        },
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables it)."})
    label_smoothing_factor: float = field(
        default=0.0, metadata={"help": "Label smoothing of the task's cross-entropy (the paper's E2E recipe: 0.1)."}
    )
    num_train_epochs: float = field(
        default=3.0, metadata={"help": "Epochs to train (ignored when --max_steps > 0); 0 evaluates the untrained model (zero-shot)."}
    )
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps to train; overrides --num_train_epochs when > 0."})
    warmup_ratio: float = field(default=0.06, metadata={"help": "Linear warmup over this fraction of the steps."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps; overrides --warmup_ratio when > 0."})
    logging_steps: int = field(
        default=10,
        metadata={
            "help": "Log loss, learning rate and throughput every N steps: the one read of the device per N steps, where "
            "the ranks also agree to stop on Slurm's time-limit signal."
        },
    )
    eval_strategy: Literal["no", "steps", "epoch"] | None = field(
        default=None, metadata={"help": "When to evaluate (default: steps if --eval_steps is given, else epoch). Always at the end."}
    )
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every N optimizer steps."})
    metric_for_best_model: str | None = field(
        default=None, metadata={"help": "Metric that picks the best evaluation (default: the task's main metric)."}
    )
    save_steps: int | None = field(
        default=None, metadata={"help": "Write a resumable checkpoint every N steps (default: at every evaluation)."}
    )
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint folder (output_dir/checkpoints/step-N) or checkpoints/ (its latest) to continue from."},
    )
    elastic_resume: bool = field(
        default=False,
        metadata={
            "help": "Continue a checkpoint written on another number of ranks, ZeRO stage or batch split (DeepSpeed's "
            "universal checkpoint); without it a layout change is refused, as it cannot continue exactly."
        },
    )
    seed: int = field(default=42, metadata={"help": "Seeds initialisation, data order, dropout and routing."})
    push_to_hub: bool = field(
        default=False,
        metadata={"help": "At the end, upload the merged adapter folder (output_dir/adapter, with its model card) to the Hub."},
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "With --push_to_hub: the Hub repo (user/name) to upload to (default: output_dir's name)."}
    )
    local_rank: int = field(default=-1, metadata={"help": "Set by the deepspeed launcher; the environment's LOCAL_RANK is used."})


@dataclass
class RunArguments:
    """All argument groups of one run."""

    model: ModelArguments
    data: DataArguments
    adamix: AdaMixArguments
    generation: GenerationArguments
    training: TrainingArguments
    demo: bool = False

    @property
    def output_dir(self) -> Path:
        return Path(self.training.output_dir)


class _Parser(HfArgumentParser):
    """``HfArgumentParser`` whose errors are ``ValueError``s, reported like every other bad input (one line,
    rank 0 only), instead of argparse's usage text printed by every rank."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(f"{message} (see --help)")


def build_parser() -> HfArgumentParser:
    """The parser of the five argument groups."""
    return _Parser(
        (ModelArguments, DataArguments, AdaMixArguments, GenerationArguments, TrainingArguments),
        prog="train.py",
        description="Train, evaluate, merge and save AdaMix (or a baseline method) on a GLUE, few-shot or generation task with DeepSpeed.",
        allow_abbrev=False,
    )


def parse_args(argv: list[str] | None = None) -> RunArguments:
    """Parse ``argv`` (default ``sys.argv[1:]``), apply the demo preset and the method defaults, validate.

    Raises ``ValueError`` naming the first bad value.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    model, data, adamix, generation, training, unknown = build_parser().parse_args_into_dataclasses(
        args=argv, look_for_args_file=False, return_remaining_strings=True
    )
    if unknown:
        raise ValueError(f"unrecognized arguments: {' '.join(unknown)} (see --help)")
    given = {arg.split("=", 1)[0].lstrip("-").replace("-", "_") for arg in argv if arg.startswith("--")}
    demo = not {"model_name_or_path", "task_name"} & given
    if demo:
        for group in (model, data, adamix, training):
            for name, value in DEMO_PRESET.items():
                if hasattr(group, name) and name not in given:
                    setattr(group, name, value)
    run = RunArguments(model, data, adamix, generation, training, demo=demo)
    _apply_defaults(run)
    validate(run)
    return run


def _apply_defaults(run: RunArguments) -> None:
    """Defaults that depend on other flags."""
    adamix, training = run.adamix, run.training
    single = adamix.method in ("adapter", "lora")
    for name, value in (("num_experts", adamix.num_experts), ("consistency_weight", adamix.consistency_weight)):
        # A single adapter has one expert and nothing to be consistent with: a flag saying otherwise is a
        # contradiction, not something to override silently.
        if single and value is not None and value != (1 if name == "num_experts" else 0):
            raise ValueError(f"{name}={value} contradicts --method {adamix.method} (a single adapter); use --method adamix")
    implied = {"adapter": "bottleneck", "lora": "lora"}.get(adamix.method)
    if implied is not None and adamix.adapter_type not in (None, implied):
        raise ValueError(
            f"adapter_type={adamix.adapter_type} contradicts --method {adamix.method}; use --method adamix --adapter_type {adamix.adapter_type}"
        )
    adamix.adapter_type = implied or adamix.adapter_type or "bottleneck"
    if adamix.num_experts is None:
        adamix.num_experts = 1 if single else 4
    if adamix.consistency_weight is None:  # the task's weight: 1 for classification, 100 for generation (the paper's)
        adamix.consistency_weight = 0.0 if adamix.method != "adamix" else get_task_spec(run.data.task_name).consistency_weight
    if training.output_dir is None:
        training.output_dir = str(Path("outputs") / f"{run.data.task_name.lower()}_{adamix.method}")
    if training.deepspeed is None:
        training.deepspeed = str(REPO_ROOT / "ds_configs" / "zero2.json")
    if training.eval_strategy is None:
        training.eval_strategy = "steps" if training.eval_steps is not None else "epoch"
    if run.data.data_dir is not None:  # LiST's split s is trained with seed s: one sweep axis covers both
        run.data.data_dir = run.data.data_dir.replace("{seed}", str(training.seed))


def validate(run: RunArguments) -> None:
    """Check the values no other object checks; ``ValueError`` names the first bad one."""
    spec = get_task_spec(run.data.task_name)
    data, training = run.data, run.training
    positive = {
        "max_seq_length": data.max_seq_length,
        "max_train_samples": data.max_train_samples,
        "max_eval_samples": data.max_eval_samples,
        "per_device_train_batch_size": training.per_device_train_batch_size,
        "per_device_eval_batch_size": training.per_device_eval_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "logging_steps": training.logging_steps,
        "eval_steps": training.eval_steps,
        "save_steps": training.save_steps,
        "save_total_limit": training.save_total_limit,
    }
    for name, value in positive.items():
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} is invalid: allowed an integer >= 1")
    for name in ("learning_rate", "adam_epsilon"):
        if not getattr(training, name) > 0:
            raise ValueError(f"{name}={getattr(training, name)} is invalid: allowed a positive number")
    for name in ("weight_decay", "max_grad_norm", "warmup_steps"):
        if getattr(training, name) < 0:
            raise ValueError(f"{name}={getattr(training, name)} is invalid: allowed a number >= 0")
    if run.model.backbone_dropout is not None and not 0 <= run.model.backbone_dropout < 1:
        raise ValueError(f"backbone_dropout={run.model.backbone_dropout} is invalid: allowed 0 <= backbone_dropout < 1")
    for name in ("adam_beta1", "adam_beta2", "warmup_ratio"):
        if not 0 <= getattr(training, name) < 1:
            raise ValueError(f"{name}={getattr(training, name)} is invalid: allowed 0 <= {name} < 1")
    if training.max_steps <= 0 and not training.num_train_epochs >= 0:
        raise ValueError(f"num_train_epochs={training.num_train_epochs} is invalid with max_steps={training.max_steps}: allowed >= 0")
    if training.bf16 and training.fp16:
        raise ValueError("bf16 and fp16 are both set: allowed one of them")
    if training.eval_strategy == "steps" and training.eval_steps is None:
        raise ValueError("eval_strategy='steps' needs --eval_steps")
    if training.metric_for_best_model is not None:
        metric = training.metric_for_best_model.removeprefix("eval_")
        if metric not in spec.metric_names:
            raise ValueError(
                f"metric_for_best_model={training.metric_for_best_model!r} is not a {spec.name} metric: allowed {', '.join(spec.metric_names)}"
            )
    if not run.adamix.expert_lr_scale > 0:
        raise ValueError(f"expert_lr_scale={run.adamix.expert_lr_scale} is invalid: allowed a positive number")
    if run.adamix.expert_lr_scale != 1 and (run.adamix.method != "adamix" or run.adamix.num_experts == 1):
        raise ValueError(
            f"expert_lr_scale={run.adamix.expert_lr_scale} needs routed experts: --method {run.adamix.method} with "
            f"num_experts={run.adamix.num_experts} has none; allowed 1, or use --method adamix with num_experts > 1"
        )
    if training.hub_model_id is not None and not training.push_to_hub:
        raise ValueError(f"hub_model_id={training.hub_model_id} needs --push_to_hub")
    if run.adamix.random_draws < 1:
        raise ValueError(f"random_draws={run.adamix.random_draws} is invalid: allowed an integer >= 1")
    check_merges(run.adamix.merge, run.adamix.eval_modes, run.adamix.fisher_batches, data.holdout_samples)
    if run.adamix.merge != "uniform" and (run.adamix.method != "adamix" or run.adamix.num_experts == 1):
        raise ValueError(f"merge={run.adamix.merge} needs experts to merge: --method adamix with num_experts > 1")
    if run.adamix.eval_modes is not None:
        if run.adamix.method == "full":
            raise ValueError(f"eval_modes={run.adamix.eval_modes!r} needs an adapter method: --method full has no experts to route")
        parse_eval_modes(run.adamix.eval_modes)
    if run.adamix.method != "full":
        adamix_config(run)  # AdaMixConfig validates num_experts, bottleneck_dim, ...
    generates = isinstance(spec, GenerationTaskSpec)
    if generates and data.prompt:
        raise ValueError(f"prompt=True is for classification tasks: {spec.name} is a generation task (its text is the target)")
    if not generates and run.generation != GenerationArguments():
        changed = next(k for k, v in dataclasses.asdict(run.generation).items() if v != getattr(GenerationArguments(), k))
        raise ValueError(f"{changed}={getattr(run.generation, changed)} needs a generation task (e2e_nlg), not {spec.name}")
    run.generation.decoding()
    check_prompt(run.data)


def check_merges(merge: str, eval_modes: str | None, fisher_batches: int, holdout_samples: int | None) -> None:
    """Check the merge flags against each other; ``ValueError`` names the first bad one."""
    if fisher_batches < 1:
        raise ValueError(f"fisher_batches={fisher_batches} is invalid: allowed an integer >= 1")
    if holdout_samples is not None and holdout_samples < 1:
        raise ValueError(f"holdout_samples={holdout_samples} is invalid: allowed an integer >= 1")
    named = {merge, *(parse_eval_modes(eval_modes) if eval_modes is not None else ())}
    selecting = [mode for mode in HELD_OUT_MERGES if mode in named]
    if selecting and holdout_samples is None:
        raise ValueError(f"{selecting[0]} selects on held-out training examples: add --holdout_samples N")


def check_prompt(data: DataArguments) -> dict[str, str] | None:
    """Check the prompt flags (the template and label words; the label words' tokens are checked once the
    tokenizer is loaded) and return the parsed ``--label_words``; ``ValueError`` names the bad one."""
    if not data.prompt:
        given = [name for name in ("template", "label_words") if getattr(data, name) is not None]
        if given:
            raise ValueError(f"{given[0]}={getattr(data, given[0])!r} needs --prompt (prompt-based fine-tuning)")
        return None
    label_words = parse_label_words(data.label_words) if data.label_words is not None else None
    prompt_setup(get_task_spec(data.task_name), data.template, label_words)
    return label_words


def family_options(
    data: DataArguments, generation: GenerationArguments, train_lm_head: str = "transform", label_smoothing: float = 0.0
) -> dict[str, Any]:
    """``adamix_ds.families.build_family``'s keyword arguments from the data and generation flags (and
    ``--train_lm_head``, ``--label_smoothing_factor``)."""
    return {
        "prompt": data.prompt,
        "template": data.template,
        "label_words": check_prompt(data),
        "train_lm_head": train_lm_head,
        "decoding": generation.decoding(),
        "label_smoothing": label_smoothing,
    }


def adamix_config(run: RunArguments, modules_to_save: list[str] | None = None) -> AdaMixConfig | None:
    """The ``AdaMixConfig`` of ``--method``, or ``None`` for full fine-tuning; ``modules_to_save`` is what
    trains besides the adapters (the task family's choice; ``None``: the architecture's head)."""
    adamix = run.adamix
    if adamix.method == "full":
        return None
    return AdaMixConfig(
        adapter_type=adamix.adapter_type,
        bottleneck_dim=adamix.bottleneck_dim,
        lora_alpha=adamix.lora_alpha,
        num_experts=adamix.num_experts,
        share_up=adamix.share_up,
        share_down=adamix.share_down,
        expert_init=adamix.expert_init,
        consistency_weight=adamix.consistency_weight,
        eval_mode=adamix.eval_mode,
        eval_expert=adamix.eval_expert,
        modules_to_save=modules_to_save,
        target_modules=None if adamix.target_modules is None else [t.strip() for t in adamix.target_modules.split(",") if t.strip()],
        seed=run.training.seed,
        base_model_name_or_path=run.model.model_name_or_path,
    )


def resolve_data_dir(task_name: str, data_dir: str | None) -> str | None:
    """``data_dir``, or when it is ``None`` the task's copy in ``../shared/data`` beside the repository if there
    is one (GLUE, E2E), else ``None`` (the Hub). ``ValueError`` for the task of an adapter that names none
    (``CUSTOM_TASK``): it has no splits to read."""
    if task_name == CUSTOM_TASK:
        raise ValueError(
            f"the adapter names no task (task {CUSTOM_TASK}: saved through the library alone), so it has no splits to read: "
            "pass --task_name (the task it was trained on), or give predict.py your own file with --input"
        )
    if data_dir is not None:
        return data_dir
    local = get_task_spec(task_name).local_copy(SHARED_DATA)
    return None if local is None else str(local)


def to_dict(run: RunArguments) -> dict[str, dict[str, Any]]:
    """Plain-JSON form of all groups (written next to the results)."""
    return {name: dataclasses.asdict(getattr(run, name)) for name in ("model", "data", "adamix", "generation", "training")}


@dataclass
class EvalArguments:
    """What ``launchers/evaluate.py`` evaluates and where it writes."""

    _argument_group_name = "evaluation"

    eval_modes: str = field(default="all", metadata={"help": "'all' or a comma-separated list of merged, ensemble, fixed, random."})
    random_draws: int = field(default=10, metadata={"help": "Random-routing evaluations for the random mode."})
    fisher_batches: int = field(
        default=8, metadata={"help": "Training batches (of --per_device_eval_batch_size) that estimate the fisher merge."}
    )
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch per rank."})
    output_file: str | None = field(default=None, metadata={"help": "Write the JSON here (default: print it)."})


@dataclass
class EvalRun:
    """All argument groups of one ``launchers/evaluate.py`` run."""

    model: ModelArguments
    data: DataArguments
    generation: GenerationArguments
    evaluation: EvalArguments


# What evaluate.py takes from the training run beside the adapter, unless a flag says otherwise: the same
# backbone, data and batching, so that its "merged" result equals that run's own final evaluation.
_RUN_DEFAULTS = {
    "model": ("model_name_or_path", "tokenizer_name"),
    # max_train_samples and holdout_samples: the merges' training batches and held-out rows are the run's own.
    "data": (
        "task_name",
        "data_dir",
        "max_seq_length",
        "max_train_samples",
        "max_eval_samples",
        "holdout_samples",
        "prompt",
        "template",
        "label_words",
    ),  # fmt: skip
    "generation": tuple(field.name for field in dataclasses.fields(GenerationArguments)),
    "evaluation": ("per_device_eval_batch_size",),
}


def parse_eval_args(argv: list[str] | None = None) -> EvalRun:
    """Parse ``launchers/evaluate.py``'s flags; ``ValueError`` names the first bad value.

    ``--adapter_name_or_path`` is required. When the adapter sits in a training run's output folder
    (``OUT/experts``), the backbone, task, data folder, sequence length, eval size and eval batch of that run
    (``OUT/run_config.json``) are the defaults.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser((ModelArguments, DataArguments, GenerationArguments, EvalArguments), prog="evaluate.py", allow_abbrev=False)
    model, data, generation, evaluation, unknown = parser.parse_args_into_dataclasses(
        args=argv, look_for_args_file=False, return_remaining_strings=True
    )
    if unknown:
        raise ValueError(f"unrecognized arguments: {' '.join(unknown)} (see --help)")
    if model.adapter_name_or_path is None:
        raise ValueError("--adapter_name_or_path is required: the experts folder of a run (OUT/experts)")
    run = EvalRun(model, data, generation, evaluation)
    given = {arg.split("=", 1)[0].lstrip("-").replace("-", "_") for arg in argv if arg.startswith("--")}
    run_config = Path(model.adapter_name_or_path).parent / "run_config.json"
    if run_config.is_file():
        try:
            saved = json.loads(run_config.read_text())["arguments"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{run_config} is malformed: {error}") from None
        source = {
            "model": saved.get("model", {}),
            "data": saved.get("data", {}),
            "generation": saved.get("generation", {}),
            "evaluation": saved.get("training", {}),
        }
        for group, names in _RUN_DEFAULTS.items():
            for name in names:
                if name not in given and name in source[group]:
                    setattr(getattr(run, group), name, source[group][name])
                    given.add(name)
    # Neither a flag nor the run's: the adapter's own record decides (adamix_ds.inference.load_for_inference).
    for group, name in ((model, "model_name_or_path"), (data, "task_name"), (data, "max_seq_length")):
        if name not in given:
            setattr(group, name, None)
    if data.task_name is not None:
        get_task_spec(data.task_name)
    for name in ("max_seq_length", "max_eval_samples", "per_device_eval_batch_size", "random_draws"):
        value = getattr(data, name, None) if hasattr(data, name) else getattr(evaluation, name)
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} is invalid: allowed an integer >= 1")
    check_merges("uniform", evaluation.eval_modes, evaluation.fisher_batches, data.holdout_samples)
    generation.decoding()
    return run
