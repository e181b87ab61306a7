"""AdaMix through the Hugging Face Trainer and TRL's SFTTrainer (``adamix_ds.trainer``, ``examples/``): in-process
with plain python (parameter groups, bad input, saved folders that load, resume), two CPU ranks through
``accelerate launch`` at ZeRO-2 and ZeRO-3 with gradient accumulation, the Trainer's own ``--deepspeed`` under the
``deepspeed`` launcher with a resumed run, and TRL on E2E under ``torchrun`` (DDP) decoded by ``predict.py``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM, TrainingArguments

from adamix_ds import AdaMixConfig, add_adamix
from adamix_ds.data import get_task_spec
from adamix_ds.families import build_family
from adamix_ds.inference import load_for_inference
from adamix_ds.model import adamix_layers
from adamix_ds.routing import Projection, Stream, choose_expert
from adamix_ds.trainer import AdaMixTrainer

from conftest import REPO_ROOT, SHARED_DATA, VENV_BIN, free_port, subprocess_env
from test_prompts import gpt2_tokenizer, minilm_tokenizer
from tiny_models import tiny_config

PROBE = str(REPO_ROOT / "tests" / "trainer_probe.py")
RUN_GLUE = str(REPO_ROOT / "examples" / "run_glue.py")
SFT_E2E = str(REPO_ROOT / "examples" / "sft_e2e.py")
# A real MiniLM run on a few RTE examples: 32 training pairs, 4 optimizer steps.
RTE_ARGS = [
    "--task_name", "rte", "--max_train_samples", "32", "--max_seq_length", "32", "--per_device_train_batch_size", "4",
    "--max_steps", "4", "--save_steps", "2", "--logging_steps", "2", "--learning_rate", "3e-3", "--weight_decay", "0.1",
    "--eval_strategy", "no", "--report_to", "none", "--seed", "7",
]  # fmt: skip
MINILM_LAYERS = 6


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny random BERT encoder with MiniLM's tokenizer, saved as a backbone folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = minilm_tokenizer()
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(tiny_config("bert", vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _trainer(backbone: Path, output_dir: Path, max_steps: int = 4, **trainer_options) -> AdaMixTrainer:
    """An AdaMixTrainer on 32 RTE pairs with the tiny BERT, on this process (no launcher), saving every 2 steps."""
    tokenizer = minilm_tokenizer()
    family = build_family(get_task_spec("rte"), tokenizer, 32, str(backbone))
    data = family.load_data(SHARED_DATA / "glue" / "RTE", max_train_samples=32, max_eval_samples=16)
    torch.manual_seed(0)
    model = family.load_model(str(backbone))
    add_adamix(model, AdaMixConfig(num_experts=4, bottleneck_dim=8, seed=3, base_model_name_or_path=str(backbone)))
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=8, max_steps=max_steps, save_steps=2, learning_rate=1e-2, weight_decay=0.1,
        report_to="none", use_cpu=True, seed=7, logging_steps=2,
    )  # fmt: skip
    return AdaMixTrainer(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval["validation"], data_collator=family.collator(),
        family=family, **trainer_options,
    )  # fmt: skip


def test_the_trainer_refuses_a_model_without_adamix_and_bad_options(tiny_bert, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="no AdaMix layers: call add_adamix"):
        AdaMixTrainer(model=AutoModelForSequenceClassification.from_pretrained(tiny_bert), args=args)
    with pytest.raises(ValueError, match="unrouted_experts='never' is invalid: allowed untouched, zero_grad"):
        _trainer(tiny_bert, tmp_path, unrouted_experts="never")
    with pytest.raises(ValueError, match="consistency_weight=-1 is invalid"):
        _trainer(tiny_bert, tmp_path, consistency_weight=-1)


def test_plain_trainer_groups_saves_loadable_adapters_and_resumes_with_the_same_routing(tiny_bert, tmp_path):
    trainer = _trainer(tiny_bert, tmp_path / "straight", expert_lr_scale=0.5)
    assert trainer.consistency_weight == 1.0  # the AdaMixConfig's
    trainer.train()
    # The launcher's AdamW groups: decayed weights, undecayed biases and LayerNorm, then the experts' own at half the rate.
    groups = sorted((group["lr"], group["weight_decay"]) for group in trainer.optimizer.param_groups)
    assert groups == [(0.0, 0.0), (0.0, 0.0), (0.0, 0.1), (0.0, 0.1)]  # at the end of the linear decay
    initial = sorted((group["initial_lr"], group["weight_decay"]) for group in trainer.optimizer.param_groups)
    assert initial == [(5e-3, 0.0), (5e-3, 0.1), (1e-2, 0.0), (1e-2, 0.1)]
    logged = [entry for entry in trainer.state.log_history if "consistency_loss" in entry]
    assert len(logged) == 2 and all(entry["consistency_loss"] > 0 and entry["task_loss"] > 0 for entry in logged)
    trainer.save_model()

    # Every checkpoint and the end hold the launcher's folders; the merged adapter loads in one call and predicts.
    for folder in (tmp_path / "straight", tmp_path / "straight" / "checkpoint-2"):
        assert {"adapter", "experts"} <= {path.name for path in folder.iterdir()}
    loaded = load_for_inference(tmp_path / "straight" / "adapter")
    assert loaded.family.spec.name == "rte" and loaded.predict([["A man plays.", "A person plays."]])[0]["label"] in (
        "entailment",
        "not_entailment",
    )
    experts = load_file(tmp_path / "straight" / "experts" / "adapter_model.safetensors")
    counters = [value.tolist() for key, value in experts.items() if key.endswith("_extra_state")]
    assert counters and all(counter == [8, 0] for counter in counters)  # 4 steps of two routed passes

    # Resumed from step 2: the same routing counters, so the same experts, as the run that was not interrupted.
    resumed = _trainer(tiny_bert, tmp_path / "resumed", expert_lr_scale=0.5)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    resumed.save_model()
    again = load_file(tmp_path / "resumed" / "experts" / "adapter_model.safetensors")
    assert again.keys() == experts.keys()
    for key, value in experts.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=1e-6, msg=key)


def test_each_trainer_step_leaves_unrouted_experts_as_unrouted_experts_names(tiny_bert, tmp_path):
    for unrouted in ("untouched", "zero_grad"):
        trainer = _trainer(tiny_bert, tmp_path / unrouted, max_steps=1, unrouted_experts=unrouted)
        layers = dict(adamix_layers(trainer.model))
        before = {name: layer.down_weight.detach().clone() for name, layer in layers.items()}
        trainer.train()
        for name, layer in layers.items():
            # The step's two routed passes (forward counts 0 and 1) drew these down experts.
            routed = {choose_expert(layer.seed, Stream.TRAIN, count, layer.layer_id, Projection.DOWN, 4) for count in (0, 1)}
            assert len(routed) < 4
            for expert in range(4):
                kept = torch.equal(layer.down_weight[expert], before[name][expert])
                # untouched: AdamW neither moves nor decays an unrouted expert; zero_grad: weight decay moves it.
                assert kept == (unrouted == "untouched" and expert not in routed), (unrouted, name, expert)


def _launch(command: list[str], probe_output: Path) -> list[dict]:
    env = {**subprocess_env(), "TRAINER_PROBE_OUTPUT": str(probe_output)}
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return [json.loads(Path(f"{probe_output}.{rank}.json").read_text()) for rank in (0, 1)]


def _accelerate(config: str, output_dir: Path, *extra: str) -> list[dict]:
    command = [
        str(Path(VENV_BIN) / "accelerate"), "launch", "--config_file", f"accelerate_configs/{config}.yaml", "--num_processes", "2",
        "--main_process_port", str(free_port()), PROBE, RUN_GLUE, "--output_dir", str(output_dir), *RTE_ARGS, *extra,
    ]  # fmt: skip
    return _launch(command, output_dir.parent / f"{output_dir.name}-probe")


def _same_routing_on_both_ranks(ranks: list[dict], steps: int, layers: int) -> list:
    assert ranks[0]["routed"] == ranks[1]["routed"]
    assert len(ranks[0]["routed"]) == steps * layers  # one guarded step per optimizer step, not per micro-batch
    return ranks[0]["routed"]


@pytest.mark.slow
def test_accelerate_launch_at_zero2_and_zero3_on_two_ranks_saves_whole_adapters(tmp_path):
    # Gradient accumulation 2: 4 steps of 2 micro-batches of 4 per rank.
    zero2 = _accelerate("zero2", tmp_path / "zero2", "--gradient_accumulation_steps", "2")
    zero3 = _accelerate("zero3", tmp_path / "zero3", "--gradient_accumulation_steps", "2")
    routed = _same_routing_on_both_ranks(zero2, 4, MINILM_LAYERS)
    assert _same_routing_on_both_ranks(zero3, 4, MINILM_LAYERS) == routed  # the routing depends on the seed alone
    assert any(len(down) > 1 for _, down, _ in routed)  # two micro-batches of two passes: several experts a step
    for ranks in (zero2, zero3):
        # DeepSpeed's optimizer (torch's fused AdamW, ds_configs) over the launcher's groups: weights decayed, biases not.
        assert ranks[0]["optimizer"] == ["AdamW", True]
        assert sorted(weight_decay for _, weight_decay, _ in ranks[0]["groups"]) == [0.0, 0.1]

    # ZeRO-3's adapter on disk is whole: the values ZeRO-2 trained (the same run, partitioned otherwise).
    for folder in ("experts", "adapter", "checkpoint-2/experts"):
        whole = load_file(tmp_path / "zero2" / folder / "adapter_model.safetensors")
        gathered = load_file(tmp_path / "zero3" / folder / "adapter_model.safetensors")
        assert gathered.keys() == whole.keys()
        for key, value in gathered.items():
            assert value.shape == whole[key].shape and value.numel() > 0, key
            if not value.is_floating_point():  # the routing counters
                assert torch.equal(value, whole[key]), key
                continue
            assert value.abs().sum() > 0, key
            # Partitioned reductions add in another order; Adam scales a near-zero gradient's difference up to the
            # step size (3e-3) in a few elements.
            torch.testing.assert_close(value, whole[key], rtol=1e-3, atol=1e-3, msg=key)
            assert (value - whole[key]).abs().mean() < 1e-4, key
    experts = load_file(tmp_path / "zero3" / "experts" / "adapter_model.safetensors")
    assert {tuple(v.tolist()) for k, v in experts.items() if k.endswith("_extra_state")} == {(16, 0)}  # 4 x 2 x 2 passes
    assert (tmp_path / "zero3" / "checkpoint-4" / "global_step4").is_dir()

    # It loads strictly and predicts as ZeRO-2's adapter does.
    pairs = [["A man is playing a guitar.", "A person plays music."], ["The cat sleeps.", "The dog barks loudly."]]
    predictions = [load_for_inference(tmp_path / stage / "adapter").predict(pairs) for stage in ("zero2", "zero3")]
    assert [row["prediction"] for row in predictions[0]] == [row["prediction"] for row in predictions[1]]
    for row0, row1 in zip(*predictions, strict=True):
        for label, probability in row0["probabilities"].items():
            assert abs(row1["probabilities"][label] - probability) < 1e-3


@pytest.mark.slow
def test_trainer_deepspeed_flag_under_the_deepspeed_launcher_resumes_with_the_routing_it_would_have_had(tmp_path):
    def deepspeed(output_dir: Path, *extra: str) -> list[dict]:
        command = [
            str(Path(VENV_BIN) / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), PROBE, RUN_GLUE,
            "--deepspeed", "ds_configs/zero2.json", "--output_dir", str(output_dir), *RTE_ARGS, *extra,
        ]  # fmt: skip
        return _launch(command, output_dir.parent / f"{output_dir.name}-probe")

    straight = deepspeed(tmp_path / "straight")
    routed = _same_routing_on_both_ranks(straight, 4, MINILM_LAYERS)
    resumed = deepspeed(tmp_path / "resumed", "--resume_from_checkpoint", str(tmp_path / "straight" / "checkpoint-2"))
    # Steps 3 and 4 of the resumed run route as steps 3 and 4 of the run that went straight through.
    assert _same_routing_on_both_ranks(resumed, 2, MINILM_LAYERS) == routed[2 * MINILM_LAYERS :]
    final = load_file(tmp_path / "straight" / "experts" / "adapter_model.safetensors")
    again = load_file(tmp_path / "resumed" / "experts" / "adapter_model.safetensors")
    for key, value in final.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama causal LM with GPT-2's tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = gpt2_tokenizer()
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(tokenizer), max_position_embeddings=256, pad_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_trl_sft_on_e2e_under_torchrun_trains_with_consistency_and_predict_decodes_the_adapter(tiny_llama, tmp_path):
    pytest.importorskip("trl")
    output_dir = tmp_path / "sft"
    command = [
        str(Path(VENV_BIN) / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), PROBE, SFT_E2E,
        "--output_dir", str(output_dir), "--model_name_or_path", str(tiny_llama), "--max_train_samples", "32",
        "--per_device_train_batch_size", "4", "--max_steps", "4", "--logging_steps", "2", "--learning_rate", "1e-2",
        "--max_length", "128", "--save_steps", "4", "--bf16", "false", "--report_to", "none", "--num_experts", "4",
    ]  # fmt: skip
    ranks = _launch(command, tmp_path / "sft-probe")
    _same_routing_on_both_ranks(ranks, 4, 2 * 2)  # AdaMix-LoRA on q_proj and v_proj of the 2 Llama blocks
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "consistency_loss" in entry]
    assert len(logged) == 2 and logged[-1]["consistency_loss"] > 0  # TRL's default activation checkpointing replays routes
    record = json.loads((output_dir / "adapter" / "task.json").read_text())
    assert record["family"] == "generation" and record["task_name"] == "e2e_nlg"

    (tmp_path / "mrs.jsonl").write_text(json.dumps({"mr": "name[The Eagle], eatType[coffee shop], food[French]"}) + "\n")
    predict = [
        str(Path(VENV_BIN) / "python"), "launchers/predict.py", "--adapter_name_or_path", str(output_dir / "adapter"),
        "--input", str(tmp_path / "mrs.jsonl"), "--num_beams", "2", "--max_new_tokens", "6",
    ]  # fmt: skip
    completed = subprocess.run(predict, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = [json.loads(line) for line in completed.stdout.splitlines()]
    assert len(rows) == 1 and isinstance(rows[0]["prediction"], str) and rows[0]["prediction"]
