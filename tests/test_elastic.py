"""Elastic resume (``--elastic_resume``): a checkpoint written on W ranks at one ZeRO stage continues on W' ranks
at another, through DeepSpeed's universal checkpoint.

The launcher tests share six real runs on a tiny BERT backbone (hidden 32, MiniLM's tokenizer, initialised wide
enough that a few steps at lr 1e-2 move the eval loss: 0.765 at step 3, 0.715 at step 8). An uninterrupted
2-rank ZeRO-2 and a 2-rank ZeRO-3 run checkpoint every step; their step-3 checkpoints continue on 1 rank (ZeRO-2
to ZeRO-3 with the same global batch, ZeRO-3 to ZeRO-2 with a larger one), the first 1-rank run's step-4
checkpoint continues on 2 ranks at ZeRO-3, and the second 1-rank run is restarted on its own layout. An elastic
resume first saves its checkpoint again on the new layout; read back through DeepSpeed's ``ds_to_universal``
it equals the one it loaded bit for bit.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
from deepspeed.checkpoint import ds_to_universal
from safetensors.torch import load_file

from adamix_ds.training import LR_SCHEDULE, TrainerState, TrainSchedule, check_resumable
from adamix_ds.training.elastic import elastic_position

from test_ds_launcher import _run
from test_launcher_args import _launcher, _run_bad
from test_recipes import TOKENIZER, _tiny_backbone

STEPS, RESUME_STEP, PASSES = 8, 3, 2  # PASSES: AdaMix's consistency loss routes every micro-batch twice
# 64 examples; on 2 ranks micro-batch 4 x accumulation 2: 4 steps per epoch. A checkpoint at every step.
COMMON = [
    "--task_name", "sst2", "--max_train_samples", "64", "--max_eval_samples", "32", "--max_seq_length", "32",
    "--per_device_train_batch_size", "4", "--max_steps", str(STEPS), "--save_steps", "1", "--save_total_limit", str(STEPS),
    "--eval_steps", str(RESUME_STEP), "--logging_steps", "1", "--learning_rate", "1e-2", "--num_experts", "4", "--bottleneck_dim", "8",
    "--seed", "7", "--tokenizer_name", TOKENIZER,
]  # fmt: skip
# name: (source run, its checkpoint step, ranks, ZeRO config, accumulation); "zero2" and "zero3" run on 2 ranks, accumulation 2.
ELASTIC = {
    "zero2_2_to_zero3_1": ("zero2", RESUME_STEP, 1, "zero3", 4),  # the same global batch (16)
    "zero3_2_to_zero2_1": ("zero3", RESUME_STEP, 1, "zero2", 5),  # global batch 20: epoch 0 continues at sample 40, not 48
    "zero3_1_to_zero3_2": ("zero2_2_to_zero3_1", RESUME_STEP + 1, 2, "zero3", 2),
}
# The final eval loss of a run that continued elastically differs from the uninterrupted run's by less than this
# fraction of what the uninterrupted run's steps after the checkpoint moved it (measured: at most 0.05). Routing draws
# and dropout masks are functions of the layout, and another global batch takes other steps: the runs differ a little.
LOSS_TOLERANCE = 0.2


# The run with another global batch, restarted on its own layout from the checkpoint it saved again, without the flag.
RESTARTED = "zero3_2_to_zero2_1"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("elastic")
    torch.manual_seed(0)  # the same backbone, hence the same losses, in every session
    backbone = _tiny_backbone(root / "backbone", "bert", {"initializer_range": 0.2})
    outputs: dict[str, Path] = {}

    def train(name: str, ranks: int, config: str, accumulation: int, extra: list[str]) -> None:
        outputs[name] = root / name
        args = [
            *COMMON,
            "--model_name_or_path",
            str(backbone),
            "--deepspeed",
            f"ds_configs/{config}.json",
            "--output_dir",
            str(root / name),
        ]
        completed = _run("deepspeed", [*args, "--gradient_accumulation_steps", str(accumulation), *extra], ranks=ranks)
        assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-5000:]
        (root / f"{name}.log").write_text(completed.stdout + completed.stderr)

    for stage in ("zero2", "zero3"):
        train(stage, 2, stage, 2, [])
    for name, (source, step, ranks, config, accumulation) in ELASTIC.items():
        checkpoint = outputs[source] / "checkpoints" / f"step-{step}"
        train(name, ranks, config, accumulation, ["--resume_from_checkpoint", str(checkpoint), "--elastic_resume"])
    _, step, ranks, config, accumulation = ELASTIC[RESTARTED]
    checkpoint = outputs[RESTARTED] / "checkpoints" / f"step-{step}"
    train("restarted", ranks, config, accumulation, ["--resume_from_checkpoint", str(checkpoint)])
    return outputs


def _reference(name: str) -> str:
    """The uninterrupted run a resumed run is compared with: the 2-rank run of its first source."""
    while name in ELASTIC:
        name = ELASTIC[name][0]
    return name


def _universal(checkpoint: Path, folder: Path) -> dict[str, object]:
    """``checkpoint`` as DeepSpeed's ``ds_to_universal`` reads it: per trainable parameter its fp32 weights, Adam
    moments (flat) and step, the routing counters, the lr schedule, the step count and the parameter groups."""
    args = argparse.Namespace(
        input_folder=str(checkpoint),
        output_folder=str(folder / checkpoint.name),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)
    zero = folder / checkpoint.name / "zero"
    optimizer = torch.load(zero / "optimizer_state.pt", weights_only=False)
    tensors: dict[str, object] = {}
    for parameter in (path for path in zero.iterdir() if (path / "exp_avg.pt").is_file()):
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            value = torch.load(parameter / f"{key}.pt", weights_only=False)
            tensors[f"{parameter.name}/{key}"] = (value["param"] if isinstance(value, dict) else value).flatten()
        # ZeRO 1/2 keep Adam's step per parameter, ZeRO-3 once for the whole optimizer.
        step = parameter / "step.pt"
        tensors[f"{parameter.name}/step"] = (
            torch.load(step, weights_only=False) if step.is_file() else optimizer["optimizer_state_dict"]["state"][0]["step"]
        )
    model_states = torch.load(sorted(checkpoint.glob("*model_states.pt"))[0], weights_only=False)
    return {
        "tensors": tensors,
        "counters": {key: value for key, value in model_states["module"].items() if key.endswith("_extra_state")},
        "module_keys": set(model_states["module"]),
        "lr_scheduler": model_states["lr_scheduler"],
        "global_steps": model_states["global_steps"],
        "groups": [{key: value for key, value in group.items() if key != "params"} for group in optimizer["param_groups"]],
    }


def _same(actual: dict[str, object], expected: dict[str, object], what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key, value in expected.items():
        assert torch.equal(torch.as_tensor(actual[key]), torch.as_tensor(value)), f"{what}: {key} differs"


# -- the launcher, on real checkpoints ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ELASTIC))
def test_restored_state_equals_the_saved_state_bit_for_bit(runs, name, tmp_path):
    source, step, *_ = ELASTIC[name]
    saved = _universal(runs[source] / "checkpoints" / f"step-{step}", tmp_path / "saved")
    restored = _universal(runs[name] / "checkpoints" / f"step-{step}", tmp_path / "restored")  # saved again on loading
    _same(restored["tensors"], saved["tensors"], "weights, Adam moments and step")
    _same(restored["counters"], saved["counters"], "routing counters")
    assert (restored["lr_scheduler"], restored["global_steps"]) == (saved["lr_scheduler"], saved["global_steps"])
    assert (saved["lr_scheduler"]["last_epoch"], saved["global_steps"]) == (step, step)
    assert restored["groups"] == saved["groups"] and [group["weight_decay"] for group in restored["groups"]] == [0.1, 0.0]
    # A restart continues exactly on the new layout: the checkpoint records it, and where the data stands on it.
    trainer_state = TrainerState.load(runs[name] / "checkpoints" / f"step-{step}")
    _, _, ranks, config, accumulation = ELASTIC[name]
    assert (trainer_state.layout["world_size"], trainer_state.layout["zero_stage"]) == (ranks, int(config[-1]))
    assert trainer_state.layout["gradient_accumulation_steps"] == accumulation and trainer_state.global_step == step
    assert trainer_state.data_step_offset == (-1 if name == RESTARTED else 0)  # global batch 20: one step behind
    # The frozen backbone stays out: the module states hold the trained parameters and the routing counters only.
    assert restored["module_keys"] == set(trainer_state.trainable) | set(restored["counters"])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ELASTIC))
def test_training_continues_the_routing_stream_lr_schedule_and_loss(runs, name, tmp_path):
    source, step, *_ = ELASTIC[name]
    reference = runs[_reference(name)]
    experts = load_file(str(runs[name] / "experts" / "adapter_model.safetensors"))
    counters = [tensor[0].item() for key, tensor in experts.items() if key.endswith("_extra_state")]
    routed = _universal(runs[source] / "checkpoints" / f"step-{step}", tmp_path / "source")["counters"]
    expected = next(iter(routed.values()))[0].item() + (STEPS - step) * ELASTIC[name][4] * PASSES
    assert counters == [expected] * len(routed)  # every pass since the checkpoint drew the next routes
    for later in range(step + 1, STEPS + 1):  # the lr schedule is the uninterrupted run's, step for step
        resumed = _universal(runs[name] / "checkpoints" / f"step-{later}", tmp_path / f"resumed-{later}")
        uninterrupted = _universal(reference / "checkpoints" / f"step-{later}", tmp_path / f"reference-{later}")
        assert resumed["groups"] == uninterrupted["groups"] and resumed["lr_scheduler"] == uninterrupted["lr_scheduler"]
    final = json.loads((runs[name] / "metrics.json").read_text())["final"]
    expected_final = json.loads((reference / "metrics.json").read_text())["final"]
    at_checkpoint = float(
        re.search(rf"step {RESUME_STEP}: .*eval_loss=([0-9.]+)", (reference.parent / f"{reference.name}.log").read_text())[1]
    )
    moved = abs(expected_final["eval_loss"] - at_checkpoint)
    assert final["step"] == STEPS and abs(final["eval_loss"] - expected_final["eval_loss"]) < LOSS_TOLERANCE * moved


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ELASTIC))
def test_metrics_and_log_say_it_resumed_elastically(runs, name):
    source, step, ranks, config, accumulation = ELASTIC[name]
    source_ranks, source_stage = (ELASTIC[source][2], int(ELASTIC[source][3][-1])) if source in ELASTIC else (2, int(source[-1]))
    metrics = json.loads((runs[name] / "metrics.json").read_text())
    record = metrics["elastic_resume"]
    assert metrics["resumed_from_step"] == step and metrics["world_size"] == ranks
    sample = step * 16 % 64  # every source reads 16 samples a step, 4 steps an epoch
    resumed_sample = sample // (4 * ranks * accumulation) * (4 * ranks * accumulation)
    assert record == {
        "step": step,
        "from_world_size": source_ranks,
        "to_world_size": ranks,
        "from_zero_stage": source_stage,
        "to_zero_stage": int(config[-1]),
        "from_train_batch_size": 16,
        "to_train_batch_size": 4 * ranks * accumulation,
        "epoch": step * 16 // 64,
        "sample": sample,
        "resumed_epoch": step * 16 // 64,
        "resumed_sample": resumed_sample,
    }
    lines = [line for line in (runs[name].parent / f"{name}.log").read_text().splitlines() if "resumed elastically" in line]
    assert len(lines) == 1 and f"from {source_ranks} to {ranks} rank(s), ZeRO-{source_stage} to ZeRO-{config[-1]}" in lines[0]
    assert json.loads((runs[_reference(name)] / "metrics.json").read_text())["elastic_resume"] is None


@pytest.mark.slow
def test_a_restart_on_the_new_layout_continues_exactly_without_the_flag(runs):
    """The checkpoint saved again on the new layout records it and where the data stands on it (one step before
    the old layout's position): the restart takes the same steps as the run that continued elastically.
    DeepSpeed's CPU FusedAdam rounds differently depending on where its buffers sit: equal to 1e-6."""
    metrics = json.loads((runs["restarted"] / "metrics.json").read_text())
    expected = json.loads((runs[RESTARTED] / "metrics.json").read_text())
    assert metrics["elastic_resume"] is None and metrics["resumed_from_step"] == RESUME_STEP
    assert metrics["final"]["epoch"] == expected["final"]["epoch"] == (STEPS - 1) / 3  # 3 steps per epoch, one step behind
    assert abs(metrics["final"]["eval_loss"] - expected["final"]["eval_loss"]) < 1e-6
    experts = load_file(str(runs["restarted"] / "experts" / "adapter_model.safetensors"))
    for key, tensor in load_file(str(runs[RESTARTED] / "experts" / "adapter_model.safetensors")).items():
        torch.testing.assert_close(experts[key], tensor, atol=1e-6, rtol=0, msg=key)


@pytest.mark.slow
def test_a_layout_change_without_elastic_resume_exits_2_and_writes_nothing(runs, tmp_path, capsys):
    checkpoint = runs["zero2"] / "checkpoints" / f"step-{RESUME_STEP}"
    argv = [*COMMON, "--model_name_or_path", str(runs["zero2"].parent / "backbone"), "--gradient_accumulation_steps", "4"]
    output_dir = tmp_path / "out"
    line = _run_bad(_launcher(), [*argv, "--output_dir", str(output_dir), "--resume_from_checkpoint", str(checkpoint)], capsys)
    assert "world_size=2, this run has world_size=1: it cannot continue exactly (pass --elastic_resume" in line, line
    assert not output_dir.exists()


# -- the rules, in one process ------------------------------------------------------------------------------

LAYOUT = {
    "world_size": 2,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "train_samples": 64,
    "seed": 7,
    "total_steps": 8,
    "zero_stage": 2,
    "lr_schedule": LR_SCHEDULE,
}


def _state(step: int = RESUME_STEP, offset: int = 0, **layout) -> TrainerState:
    return TrainerState(global_step=step, layout={**LAYOUT, **layout}, trainable={"w": [2]}, data_step_offset=offset)


def _check(state: TrainerState, elastic: bool, **layout) -> None:
    check_resumable(Path("ckpt"), state, {**LAYOUT, **layout}, {"w": [2]}, elastic)


def test_a_layout_change_needs_the_flag_and_keeps_the_data_and_the_lr_schedule():
    for change in ({"world_size": 1}, {"zero_stage": 3}, {"gradient_accumulation_steps": 4}, {"per_device_train_batch_size": 8}):
        key, value = next(iter(change.items()))
        with pytest.raises(ValueError, match=rf"{key}={LAYOUT[key]}, this run has {key}={value}: .* \(pass --elastic_resume"):
            _check(_state(), False, **change)
        _check(_state(), True, **change)
    with pytest.raises(
        ValueError, match=r"total_steps=8, this run has total_steps=16: .* \(pass --max_steps 8 to continue its lr schedule\)"
    ):
        _check(_state(), True, world_size=1, total_steps=16)
    for change in ({"seed": 8}, {"train_samples": 60}):
        with pytest.raises(ValueError, match="cannot continue exactly$"):
            _check(_state(), True, **change)


def test_zero0_changes_ranks_but_not_stage_and_an_older_checkpoint_only_resumes_as_it_was():
    _check(_state(zero_stage=0), True, zero_stage=0, world_size=1)
    for before, after in ((0, 2), (3, 0)):
        with pytest.raises(ValueError, match=f"written at ZeRO-{before}, this run is ZeRO-{after}: .* has no ZeRO-0"):
            _check(_state(zero_stage=before), True, zero_stage=after, world_size=1)
    older = TrainerState(global_step=1, layout={k: v for k, v in LAYOUT.items() if k != "zero_stage"}, trainable={"w": [2]})
    _check(older, False)  # written before the layout recorded the ZeRO stage: resumes on its own layout as before
    with pytest.raises(ValueError, match="records no zero_stage"):
        _check(older, True, world_size=1)


def test_a_checkpoint_of_deepspeeds_warmup_decay_schedule_does_not_continue_under_the_linear_one():
    # Its scheduler state ({"last_batch_iteration": n}) is not the linear schedule's: one line, before DeepSpeed
    # fails to load it on every rank.
    before = TrainerState(global_step=1, layout={k: v for k, v in LAYOUT.items() if k != "lr_schedule"}, trainable={"w": [2]})
    for elastic in (False, True):
        with pytest.raises(
            ValueError, match=r"under DeepSpeed's WarmupDecayLR schedule, this run has lr_schedule='linear' .* cannot continue"
        ):
            _check(before, elastic)


def _schedule(layout: dict) -> TrainSchedule:
    return TrainSchedule.build(
        layout["train_samples"], layout["world_size"], layout["per_device_train_batch_size"], layout["gradient_accumulation_steps"],
        1.0, layout["total_steps"], 0.0, 0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("state", "layout", "expected"),
    [
        # The same global batch on 1 rank: the same sample, the same step.
        (_state(), {"world_size": 1, "gradient_accumulation_steps": 4}, (0, 0, 48, 0, 48)),
        # Global batch 20: steps start at multiples of 20 (the next one is at sample 40), one step earlier.
        (_state(), {"world_size": 1, "gradient_accumulation_steps": 5}, (-1, 0, 48, 0, 40)),
        # Where that run stands after its next step (data_step_offset -1): epoch 0 done, on 2 ranks again.
        (_state(4, -1, world_size=1, gradient_accumulation_steps=5), {}, (0, 1, 0, 1, 0)),
        # Global batch 8 to 24: the new layout's epoch (2 steps, 48 samples) ends before sample 56: the next epoch.
        (_state(7, world_size=1), {"gradient_accumulation_steps": 3}, (-5, 0, 56, 1, 0)),
    ],
)
def test_the_data_continues_at_the_checkpoints_sample_as_far_as_the_new_batch_allows(state, layout, expected):
    new = {**LAYOUT, **layout}
    schedule = _schedule(new)
    offset, epoch, sample, resumed_epoch, resumed_sample = elastic_position(state, new, schedule)
    assert (offset, epoch, sample, resumed_epoch, resumed_sample) == expected
    epoch_now, micro_batches = schedule.position(state.global_step + offset)
    assert (epoch_now, micro_batches * new["per_device_train_batch_size"] * new["world_size"]) == (resumed_epoch, resumed_sample)
