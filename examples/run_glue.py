#!/usr/bin/env python
"""Fine-tune AdaMix on a GLUE task with the Hugging Face Trainer: the run_glue.py of AdaMix, to copy and change.

Every flag of ``transformers.TrainingArguments`` works, and so does every way of starting the Trainer:
    python examples/run_glue.py --output_dir out --task_name sst2 --num_train_epochs 1
    torchrun --nproc_per_node 2 examples/run_glue.py --output_dir out ...
    deepspeed --num_gpus 2 examples/run_glue.py --deepspeed ds_configs/zero2.json --output_dir out ...
    accelerate launch --config_file accelerate_configs/zero3.yaml examples/run_glue.py --output_dir out ...
OUT/adapter (the merged adapter) and OUT/experts are what launchers/predict.py, evaluate.py and export.py take, and
every checkpoint-N holds them too. `make train-trainer` runs `make train`'s SST-2 configuration through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer, EvalPrediction, HfArgumentParser, TrainingArguments, set_seed

from adamix_ds import AdaMixConfig, add_adamix
from adamix_ds.backbones import DEFAULT_MODEL, resolve_model_path
from adamix_ds.data import get_task_spec
from adamix_ds.families import build_family
from adamix_ds.trainer import AdaMixTrainer
from adamix_ds.training.arguments import resolve_data_dir


@dataclass
class AdaMixRunArguments:
    """The model, the task and AdaMix; everything else is a ``TrainingArguments`` flag."""

    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={"help": "Hub id or local folder of the backbone."})
    task_name: str = field(default="sst2", metadata={"help": "A GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte."})
    data_dir: str | None = field(default=None, metadata={"help": "The task's GLUE folder (default: ../shared/data, else the Hub)."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training examples."})
    num_experts: int = field(default=4, metadata={"help": "Experts per projection."})
    bottleneck_dim: int = field(default=16, metadata={"help": "Adapter bottleneck size."})
    consistency_weight: float = field(default=1.0, metadata={"help": "Weight of the consistency loss (0: one routed pass)."})
    unrouted_experts: str = field(default="zero_grad", metadata={"help": "zero_grad (the paper's runs) or untouched."})


def main() -> None:
    run, training_args = HfArgumentParser((AdaMixRunArguments, TrainingArguments)).parse_args_into_dataclasses()
    model_path = resolve_model_path(run.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    family = build_family(get_task_spec(run.task_name), tokenizer, run.max_seq_length, model_path)
    data = family.load_data(resolve_data_dir(run.task_name, run.data_dir), run.max_train_samples)

    set_seed(training_args.seed)  # the same head and experts on every rank
    model = family.load_model(model_path)
    config = AdaMixConfig(
        num_experts=run.num_experts,
        bottleneck_dim=run.bottleneck_dim,
        consistency_weight=run.consistency_weight,
        seed=training_args.seed,
        base_model_name_or_path=run.model_name_or_path,
    )
    add_adamix(model, config)

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        return family.scores(torch.from_numpy(prediction.predictions), torch.from_numpy(prediction.label_ids))

    trainer = AdaMixTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval["validation"],
        data_collator=family.collator(),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        family=family,
        unrouted_experts=run.unrouted_experts,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
