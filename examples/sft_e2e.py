#!/usr/bin/env python
"""Fine-tune a causal LM on E2E NLG with AdaMix-LoRA through TRL's SFTTrainer (pip install 'adamix-ds[trl]').

Every flag of ``trl.SFTConfig`` works, under python, torchrun, deepspeed or accelerate launch:
    python examples/sft_e2e.py --output_dir out --model_name_or_path openai-community/gpt2 --max_steps 500
    accelerate launch --config_file accelerate_configs/zero3.yaml examples/sft_e2e.py --output_dir out ...
The consistency loss compares the two routed passes at the completion tokens. OUT/adapter decodes with
    python launchers/predict.py --adapter_name_or_path out/adapter --input mrs.jsonl
and launchers/evaluate.py scores it with the five E2E metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoTokenizer, HfArgumentParser, set_seed
from trl import SFTConfig

from adamix_ds import AdaMixConfig, add_adamix
from adamix_ds.backbones import resolve_model_path
from adamix_ds.data import get_task_spec
from adamix_ds.families import build_family
from adamix_ds.trainer import adamix_sft_trainer
from adamix_ds.training.arguments import resolve_data_dir


@dataclass
class AdaMixSFTArguments:
    """The model, the data and AdaMix-LoRA (the paper's E2E setting); everything else is an ``SFTConfig`` flag."""

    model_name_or_path: str = field(default="openai-community/gpt2-medium", metadata={"help": "A causal LM: Hub id or folder."})
    data_dir: str | None = field(default=None, metadata={"help": "The E2E folder (default: ../shared/data/e2e, else the Hub)."})
    max_seq_length: int = field(default=128, metadata={"help": "Prompt and completion tokens the decoder may take."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training pairs."})
    num_experts: int = field(default=8, metadata={"help": "Experts per projection."})
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank of each expert."})
    consistency_weight: float = field(default=1.0, metadata={"help": "Weight of the consistency loss (0: one routed pass)."})


def main() -> None:
    run, sft_args = HfArgumentParser((AdaMixSFTArguments, SFTConfig)).parse_args_into_dataclasses()
    model_path = resolve_model_path(run.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    family = build_family(get_task_spec("e2e_nlg"), tokenizer, run.max_seq_length, model_path)
    train = family.prompt_completion(resolve_data_dir("e2e_nlg", run.data_dir), run.max_train_samples)

    set_seed(sft_args.seed)
    model = family.load_model(model_path)
    config = AdaMixConfig(
        adapter_type="lora",
        bottleneck_dim=run.lora_rank,
        num_experts=run.num_experts,
        consistency_weight=run.consistency_weight,
        modules_to_save=family.head_modules(model),
        seed=sft_args.seed,
        base_model_name_or_path=run.model_name_or_path,
    )
    add_adamix(model, config)
    trainer = adamix_sft_trainer()(model=model, args=sft_args, train_dataset=train, processing_class=tokenizer, family=family)
    trainer.train(resume_from_checkpoint=sft_args.resume_from_checkpoint)
    trainer.save_model()


if __name__ == "__main__":
    main()
