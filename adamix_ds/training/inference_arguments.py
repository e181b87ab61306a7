"""The command lines of ``launchers/predict.py`` and ``launchers/export.py``: typed argument groups, parsed and
checked here; a bad value is a ``ValueError`` whose one line names it (the launchers turn it into exit code 2)."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from adamix_ds.config import EVAL_MODES
from adamix_ds.inference import LoadedAdapter, load_for_inference
from adamix_ds.training.arguments import GenerationArguments, _Parser

__all__ = ["AdapterArguments", "ExportArguments", "PredictArguments", "parse_export_args", "parse_predict_args"]


@dataclass
class AdapterArguments:
    """Which adapter, on which backbone (``adamix_ds.inference.load_for_inference``)."""

    _argument_group_name = "adapter"

    adapter_name_or_path: str | None = field(
        default=None, metadata={"help": "An adapter folder (OUT/adapter, OUT/experts) or a Hub repo id."}
    )
    base_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The backbone (a Hub id or a local copy). Default: the one the adapter records (adamix_config.json)."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the backbone's own."})
    task_name: str | None = field(
        default=None,
        metadata={
            "help": "The adapter's task; needed only for a folder that records none (no task.json, no task_type in adamix_config.json)."
        },
    )
    max_seq_length: int | None = field(default=None, metadata={"help": "Longer inputs are truncated (default: the training run's)."})
    eval_mode: Literal["merged", "random", "fixed", "ensemble"] = field(
        default="merged", metadata={"help": "How the experts route: merged (averaged: the paper), ensemble, fixed or random."}
    )
    eval_expert: int = field(default=0, metadata={"help": "The expert of every projection that --eval_mode fixed uses."})
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={"help": "Precision of the model."})

    def load(self, **options: Any) -> LoadedAdapter:
        """``load_for_inference`` with these flags; ``options`` (``decoding``, ``device``) pass through."""
        return load_for_inference(
            self.adapter_name_or_path,
            self.base_model_name_or_path,
            task_name=self.task_name,
            max_seq_length=self.max_seq_length,
            tokenizer_name=self.tokenizer_name,
            eval_mode=self.eval_mode,
            eval_expert=self.eval_expert,
            dtype=self.dtype,
            **options,
        )


@dataclass
class PredictArguments:
    """What to predict and where the predictions go."""

    _argument_group_name = "predict"

    split: str | None = field(
        default=None,
        metadata={
            "help": "A split of the adapter's GLUE task: test (unlabelled; MNLI test_matched, test_mismatched, diagnostic), validation, train."
        },
    )
    data_dir: str | None = field(default=None, metadata={"help": "The GLUE folder of --split (default: ../shared/data/glue)."})
    input: str | None = field(default=None, metadata={"help": "Your own file instead of a split: .tsv, .csv or .jsonl with named columns."})
    text_column: str | None = field(
        default=None,
        metadata={
            "help": "With --input: the column of the (first) text; for e2e_nlg the meaning representation (default: the task's name for it)."
        },
    )
    text_pair_column: str | None = field(
        default=None,
        metadata={"help": "With --input, for a sentence-pair task: the column of the second text (default: the task's name for it)."},
    )
    output_file: str | None = field(default=None, metadata={"help": "Write the predictions here as JSON lines (default: print them)."})
    glue_submission: str | None = field(
        default=None,
        metadata={
            "help": "Write the GLUE leaderboard files of the adapter's task (RTE.tsv; MNLI-m.tsv, MNLI-mm.tsv, AX.tsv) into this folder."
        },
    )
    per_device_batch_size: int = field(default=32, metadata={"help": "Inputs per forward (or beam search) on each rank."})
    local_rank: int = field(default=-1, metadata={"help": "Set by the deepspeed launcher; the environment's LOCAL_RANK is used."})


@dataclass
class ExportArguments:
    """What to export and where."""

    _argument_group_name = "export"

    format: Literal["transformers", "peft", "adamix"] | None = field(
        default=None,
        metadata={
            "help": "transformers: AdaMix-LoRA folded into the backbone, a plain checkpoint; peft: a PEFT LoRA adapter; "
            "adamix: the merged adapter folder."
        },
    )
    output_dir: str | None = field(default=None, metadata={"help": "The folder to write (it appears whole or not at all)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing output_dir."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload output_dir to the Hub when it is written."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "With --push_to_hub: the Hub repo (user/name); default output_dir's name."}
    )


@dataclass
class PredictRun:
    adapter: AdapterArguments
    predict: PredictArguments
    generation: dict[str, Any]  # the decoding flags given: they replace the adapter's saved decoding


@dataclass
class ExportRun:
    adapter: AdapterArguments
    export: ExportArguments


def _parse(groups: tuple[type, ...], prog: str, argv: list[str] | None) -> tuple[list[Any], set[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    *parsed, unknown = _Parser(groups, prog=prog, allow_abbrev=False).parse_args_into_dataclasses(
        args=argv, look_for_args_file=False, return_remaining_strings=True
    )
    if unknown:
        raise ValueError(f"unrecognized arguments: {' '.join(unknown)} (see --help)")
    adapter = parsed[0]
    if adapter.adapter_name_or_path is None:
        raise ValueError("--adapter_name_or_path is required: an adapter folder (OUT/adapter) or a Hub repo id")
    if adapter.max_seq_length is not None and adapter.max_seq_length < 1:
        raise ValueError(f"max_seq_length={adapter.max_seq_length} is invalid: allowed an integer >= 1")
    if adapter.eval_mode not in EVAL_MODES:
        raise ValueError(f"eval_mode={adapter.eval_mode} is invalid: allowed {', '.join(EVAL_MODES)}")
    given = {arg.split("=", 1)[0].lstrip("-").replace("-", "_") for arg in argv if arg.startswith("--")}
    return parsed, given


def parse_predict_args(argv: list[str] | None = None) -> PredictRun:
    """Parse ``launchers/predict.py``'s flags; ``ValueError`` names the first bad value. Without ``--input`` and
    ``--glue_submission`` the split defaults to ``test``."""
    (adapter, predict, generation), given = _parse((AdapterArguments, PredictArguments, GenerationArguments), "predict.py", argv)
    sources = [name for name in ("input", "glue_submission") if getattr(predict, name) is not None]
    if predict.split is not None:
        sources.insert(0, "split")
    if len(sources) > 1:
        raise ValueError(f"--{sources[0]} and --{sources[1]} both name the inputs: allowed one of --split, --input, --glue_submission")
    if predict.input is None:
        for name in ("text_column", "text_pair_column"):
            if getattr(predict, name) is not None:
                raise ValueError(f"{name}={getattr(predict, name)} needs --input (your own file)")
        if predict.split is None and predict.glue_submission is None:
            predict.split = "test"
    if predict.per_device_batch_size < 1:
        raise ValueError(f"per_device_batch_size={predict.per_device_batch_size} is invalid: allowed an integer >= 1")
    decoding = {name: value for name, value in dataclasses.asdict(generation).items() if name in given}
    generation.decoding()  # a bad decoding value fails here
    if predict.output_file is not None and not Path(predict.output_file).parent.is_dir():
        raise ValueError(f"output_file={predict.output_file} is in no existing folder")
    return PredictRun(adapter, predict, decoding)


def parse_export_args(argv: list[str] | None = None) -> ExportRun:
    """Parse ``launchers/export.py``'s flags; ``ValueError`` names the first bad value."""
    (adapter, export), _ = _parse((AdapterArguments, ExportArguments), "export.py", argv)
    if export.format is None:
        raise ValueError("--format is required: allowed transformers, peft, adamix")
    if export.output_dir is None:
        raise ValueError("--output_dir is required: the folder to write")
    if adapter.eval_mode != "merged":
        raise ValueError(f"eval_mode={adapter.eval_mode} is invalid for an export: allowed merged (every format holds the merged adapter)")
    output = Path(export.output_dir)
    if output.exists() and any(output.iterdir()) and not export.overwrite_output_dir:
        raise ValueError(f"output_dir={output} exists and is not empty: pass --overwrite_output_dir to replace it")
    if export.hub_model_id is not None and not export.push_to_hub:
        raise ValueError(f"hub_model_id={export.hub_model_id} needs --push_to_hub")
    return ExportRun(adapter, export)
