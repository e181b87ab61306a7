"""The launcher's command line, DeepSpeed config builder, step plan and input checks, in one process.

Bad input is run through ``launchers/train.py``'s ``main`` itself: exit code 2, one line that names the
value, and nothing written to ``output_dir`` (an earlier run's folder is left as it was).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil

import pytest
import torch

from adamix_ds.distributed import DistEnv
from adamix_ds.training import (
    TrainSchedule,
    adamix_config,
    build_ds_config,
    check_cuda_arch_list,
    jit_builds_fused_adam,
    parse_args,
    step_seed,
)
from adamix_ds.training.arguments import DEFAULT_MODEL, DEMO_PRESET
from adamix_ds.training.data import ResumableSampler

from conftest import REPO_ROOT, SHARED_DATA

STAGE_CONFIGS = ("zero0", "zero1", "zero2", "zero3", "zero3_offload")
TINY = [
    "--task_name",
    "sst2",
    "--max_train_samples",
    "16",
    "--max_eval_samples",
    "8",
    "--max_seq_length",
    "32",
    "--per_device_train_batch_size",
    "4",
]


def _launcher():
    spec = importlib.util.spec_from_file_location("adamix_train_launcher", REPO_ROOT / "launchers" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def launcher():
    return _launcher()


def _schedule(**overrides) -> TrainSchedule:
    values = dict(
        num_samples=100,
        world_size=2,
        micro_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=3.0,
        max_steps=-1,
        warmup_ratio=0.06,
        warmup_steps=0,
    )
    return TrainSchedule.build(**{**values, **overrides})


# -- arguments ------------------------------------------------------------------------------------------


def test_help_lists_the_five_groups_with_run_glue_and_generate_names(launcher, capsys):
    with pytest.raises(SystemExit) as exit_info:
        launcher.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for group in ("model:", "data:", "adamix:", "generation:", "training:"):
        assert group in text
    run_glue = (
        "--model_name_or_path --task_name --data_dir --max_seq_length --per_device_train_batch_size --gradient_accumulation_steps "
        "--learning_rate --num_train_epochs --max_steps --warmup_ratio --weight_decay --seed --output_dir --max_train_samples "
        "--max_eval_samples --eval_steps --deepspeed --bf16 --fp16 --resume_from_checkpoint"
    )
    adamix = "--method --num_experts --bottleneck_dim --share_up --share_down --consistency_weight --eval_mode --target_modules"
    adamix += " --num_beams --length_penalty --no_repeat_ngram_size --max_new_tokens --label_smoothing_factor"
    for flag in (run_glue + " " + adamix).split():
        assert flag in text


def test_default_run_is_the_minilm_sst2_demo():
    run = parse_args([])
    assert run.demo and run.model.model_name_or_path == DEFAULT_MODEL and run.data.task_name == "sst2"
    assert run.data.max_train_samples == DEMO_PRESET["max_train_samples"]
    assert run.training.deepspeed == str(REPO_ROOT / "ds_configs" / "zero2.json")
    # Naming a model or a task means a real run: no preset trims it, and a given flag always wins.
    real = parse_args(["--task_name", "rte"])
    assert not real.demo and real.data.max_train_samples is None and real.data.max_seq_length == 128
    assert parse_args(["--max_seq_length", "48"]).data.max_seq_length == 48


def test_methods_set_their_defaults_and_refuse_contradictions():
    adamix = parse_args(["--task_name", "rte"]).adamix
    assert (adamix.num_experts, adamix.consistency_weight, adamix.unrouted_experts) == (4, 1.0, "zero_grad")
    for method in ("adapter", "lora"):
        single = parse_args(["--task_name", "rte", "--method", method]).adamix
        assert (single.num_experts, single.consistency_weight) == (1, 0.0)
    with pytest.raises(ValueError, match="num_experts=4 contradicts --method adapter"):
        parse_args(["--task_name", "rte", "--method", "adapter", "--num_experts", "4"])
    assert adamix_config(parse_args(["--task_name", "rte", "--method", "lora"])).adapter_type == "lora"
    # The experts' init: the reference's for each adapter type unless named.
    assert adamix_config(parse_args(["--task_name", "rte"])).expert_init == "independent"
    assert adamix_config(parse_args(["--task_name", "rte", "--adapter_type", "lora"])).expert_init == "shared"
    named = adamix_config(parse_args(["--task_name", "rte", "--adapter_type", "lora", "--expert_init", "independent"]))
    assert named.expert_init == "independent"
    mixture_of_lora = adamix_config(parse_args(["--task_name", "rte", "--adapter_type", "lora", "--lora_alpha", "16"]))
    assert (mixture_of_lora.adapter_type, mixture_of_lora.num_experts, mixture_of_lora.lora_alpha) == ("lora", 4, 16.0)
    with pytest.raises(ValueError, match="adapter_type=lora contradicts --method adapter"):
        parse_args(["--task_name", "rte", "--method", "adapter", "--adapter_type", "lora"])
    run = parse_args(["--task_name", "rte", "--eval_steps", "5"])
    assert run.training.eval_strategy == "steps"


# -- DeepSpeed config -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STAGE_CONFIGS)
def test_shipped_configs_take_every_run_value_from_the_flags(name, tmp_path):
    run = parse_args(
        ["--task_name", "rte", "--bf16", "--learning_rate", "3e-4", "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path)]
    )
    config = build_ds_config(REPO_ROOT / "ds_configs" / f"{name}.json", run.training, 4, "job")
    assert (
        config["train_micro_batch_size_per_gpu"] == 32 and config["gradient_accumulation_steps"] == 2 and config["train_batch_size"] == 256
    )
    assert config["optimizer"]["params"]["lr"] == 3e-4 and "scheduler" not in config  # the launcher's client scheduler
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert config["tensorboard"]["output_path"] == str(tmp_path / "runs")
    assert config["zero_optimization"]["stage"] == int(name[4])
    if name == "zero3_offload":
        assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert config["zero_optimization"]["offload_param"]["device"] == "cpu"


def _config_file(tmp_path, **changes):
    config = json.loads((REPO_ROOT / "ds_configs" / "zero2.json").read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        section = config
        for parent in parents:
            section = section[parent]
        section[leaf] = value
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"optimizer__params__lr": 1e-3}, "optimizer.params.lr=0.001 contradicts --learning_rate"),
        ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu=8 contradicts --per_device_train_batch_size"),
        ({"bf16__enabled": True}, "bf16.enabled=true contradicts --bf16"),
        ({"train_batch_size": 30}, "train_batch_size=30 does not divide"),
        ({"train_batch_size": 128}, "train_batch_size=128 means gradient_accumulation_steps=2"),
        ({"scheduler": {"type": "WarmupDecayLR"}}, "a scheduler section is not allowed: the schedule is the reference's linear"),
        ({"zero_optimization__stage": 5}, "DeepSpeed rejects the config"),
        ({"zero_optimization__bogus": 1}, "DeepSpeed rejects the config"),
        ({"steps_per_print": "auto"}, 'steps_per_print="auto" has no flag'),
    ],
)
def test_a_contradiction_between_file_and_flags_is_an_error(tmp_path, changes, message):
    run = parse_args(["--task_name", "rte", "--per_device_train_batch_size", "32"])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        build_ds_config(_config_file(tmp_path, **changes), run.training, 2, "job")


def test_a_file_value_that_agrees_with_the_flags_is_kept(tmp_path):
    run = parse_args(["--task_name", "rte", "--per_device_train_batch_size", "32"])
    config = build_ds_config(_config_file(tmp_path, train_batch_size=64, optimizer__params__lr=4e-4), run.training, 2, "job")
    assert config["train_batch_size"] == 64 and config["optimizer"]["params"]["lr"] == 4e-4


# -- step plan and data order ---------------------------------------------------------------------------


def test_schedule_counts_steps_like_run_glue():
    plan = _schedule()  # 100 samples on 2 ranks: 50 each, 13 micro-batches of 4, 6 steps of 2 per epoch
    assert (plan.micro_batches_per_epoch, plan.steps_per_epoch, plan.total_steps, plan.warmup_steps, plan.num_epochs) == (13, 6, 18, 2, 3)
    assert plan.position(8) == (1, 4)
    assert _schedule(max_steps=7, warmup_steps=3).total_steps == 7 and _schedule(max_steps=7, warmup_steps=3).warmup_steps == 3
    with pytest.raises(ValueError, match="gradient_accumulation_steps=20 is larger than the 13 micro-batches"):
        _schedule(gradient_accumulation_steps=20)


@pytest.mark.parametrize(
    ("warmup_steps", "factors"),
    [(2, [0, 1 / 2, 1, 3 / 4, 2 / 4, 1 / 4]), (0, [1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])],
)
def test_lr_schedule_is_the_references_linear_warmup_and_decay_of_every_groups_own_rate(warmup_steps, factors):
    """transformers' linear schedule, as run_glue.py and LiST's trainer step it: step n trains at lr * n / W during
    warmup, then lr * (T - n) / (T - W); no warmup trains the first step at the full rate (DeepSpeed's
    WarmupDecayLR trains it at 0, and the next one too)."""
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([{"params": [weight], "lr": 1e-3}, {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 4e-3}])
    scheduler = _schedule(max_steps=6, warmup_ratio=0.0, warmup_steps=warmup_steps).lr_scheduler(optimizer)
    rates = []
    for _ in range(6):
        rates += [group["lr"] for group in optimizer.param_groups]  # the rates this step trains at
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([rate for factor in factors for rate in (1e-3 * factor, 4e-3 * factor)])
    assert [group["lr"] for group in optimizer.param_groups] == [0, 0]


def test_sampler_resumes_mid_epoch_in_the_same_order():
    env = DistEnv(rank=1, local_rank=1, world_size=2, local_world_size=2)
    sampler = ResumableSampler(37, env, seed=3)
    sampler.set_position(epoch=2, skip_samples=0)
    full = list(sampler)
    sampler.set_position(epoch=2, skip_samples=8)
    assert list(sampler) == full[8:] and len(sampler) == len(full) - 8
    sampler.set_position(epoch=3, skip_samples=0)
    assert list(sampler) != full


def test_dropout_seed_is_a_function_of_seed_rank_and_step():
    assert step_seed(1, 0, 5) == step_seed(1, 0, 5)
    assert len({step_seed(1, r, s) for r in range(2) for s in range(50)}) == 100


# -- bad input: exit 2, one line naming the value, nothing written ---------------------------------------


def _glue_copy(tmp_path, train_rows: int = 40, bad_row: bool = False, drop_dev: bool = False):
    """A small SST-2 folder cut from the shared GLUE files, optionally broken."""
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    lines = (SHARED_DATA / "glue" / "SST-2" / "train.tsv").read_text().splitlines()[: train_rows + 1]
    if bad_row:
        lines.append("a fine film\tpositive")
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    if not drop_dev:
        shutil.copy(SHARED_DATA / "glue" / "SST-2" / "dev.tsv", folder / "dev.tsv")
    return folder.parent


def _foreign_adapter(tmp_path):
    """An AdaMix adapter trained on another architecture (a hidden-32 BERT), saved by this library."""
    from adamix_ds import AdaMixConfig, add_adamix, save_adapter

    from tiny_models import tiny_classifier

    model = add_adamix(tiny_classifier("bert"), AdaMixConfig(bottleneck_dim=16, num_experts=4))
    save_adapter(model, tmp_path / "foreign_adapter")
    return tmp_path / "foreign_adapter"


BAD_INPUTS = {
    "unknown task": (lambda tmp: ["--task_name", "sst3"], "'sst3'"),
    "unknown flag": (lambda tmp: ["--learning_rat", "1e-3"], "unrecognized arguments: --learning_rat 1e-3"),
    "missing data folder": (lambda tmp: ["--data_dir", str(tmp / "nowhere")], "nowhere"),
    "missing data file": (lambda tmp: ["--data_dir", str(_glue_copy(tmp, drop_dev=True))], "dev.tsv"),
    "malformed data file": (lambda tmp: ["--data_dir", str(_glue_copy(tmp, bad_row=True))], "bad label 'positive'"),
    "malformed ds config": (
        lambda tmp: ["--deepspeed", str(_write(tmp / "ds.json", '{"zero_optimization": {"stage": 2}'))],
        "not valid JSON",
    ),
    "ds config rejected by DeepSpeed": (
        lambda tmp: ["--deepspeed", str(_write(tmp / "ds.json", '{"zero_optimization": {"stage": 7}}'))],
        "stage",
    ),
    "batch sizes that don't divide": (
        lambda tmp: ["--deepspeed", str(_write(tmp / "ds.json", '{"train_batch_size": 30}'))],
        "train_batch_size=30",
    ),
    "accumulation beyond the data": (lambda tmp: ["--gradient_accumulation_steps", "64"], "gradient_accumulation_steps=64"),
    "num_experts < 1": (lambda tmp: ["--num_experts", "0"], "num_experts=0"),
    "non-positive expert lr scale": (lambda tmp: ["--expert_lr_scale", "0"], "expert_lr_scale=0.0 is invalid: allowed a positive number"),
    "expert lr scale without routed experts": (
        lambda tmp: ["--method", "adapter", "--expert_lr_scale", "2"],
        "expert_lr_scale=2.0 needs routed experts: --method adapter with num_experts=1 has none",
    ),
    "unknown unrouted experts semantics": (lambda tmp: ["--unrouted_experts", "frozen"], "'frozen'"),
    "unknown expert init": (lambda tmp: ["--expert_init", "zeros"], "'zeros'"),
    "unknown merge": (lambda tmp: ["--merge", "average"], "'average'"),
    "no Fisher batch": (lambda tmp: ["--merge", "fisher", "--fisher_batches", "0"], "fisher_batches=0 is invalid: allowed an integer >= 1"),
    "greedy soup without a held-out split": (
        lambda tmp: ["--eval_modes", "merged,greedy_soup"],
        "greedy_soup selects on held-out training examples: add --holdout_samples N",
    ),
    "best expert without a held-out split": (
        lambda tmp: ["--merge", "best_expert"],
        "best_expert selects on held-out training examples: add --holdout_samples N",
    ),
    "held-out split as large as the training set": (
        lambda tmp: ["--holdout_samples", "16", "--merge", "greedy_soup"],
        "holdout_samples=16 is invalid: allowed 1..15",
    ),
    "fisher merge at ZeRO-3": (
        lambda tmp: ["--merge", "fisher", "--deepspeed", str(REPO_ROOT / "ds_configs" / "zero3.json")],
        "fisher merging needs whole parameters, not ZeRO-3 partitions",
    ),
    "merge without experts": (lambda tmp: ["--method", "adapter", "--merge", "fisher"], "merge=fisher needs experts to merge"),
    "negative adam epsilon": (lambda tmp: ["--adam_epsilon=-1e-6"], "adam_epsilon=-1e-06 is invalid: allowed a positive number"),
    "backbone dropout of 1": (
        lambda tmp: ["--backbone_dropout", "1"],
        "backbone_dropout=1.0 is invalid: allowed 0 <= backbone_dropout < 1",
    ),
    "negative backbone dropout": (lambda tmp: ["--backbone_dropout=-0.1"], "backbone_dropout=-0.1 is invalid"),
    "bottleneck larger than hidden": (lambda tmp: ["--bottleneck_dim", "1000"], "bottleneck_dim=1000"),
    "adapter from another architecture": (lambda tmp: ["--adapter_name_or_path", str(_foreign_adapter(tmp))], "foreign_adapter"),
    "non-positive batch size": (lambda tmp: ["--per_device_train_batch_size", "0"], "per_device_train_batch_size=0"),
    "unknown best metric": (lambda tmp: ["--metric_for_best_model", "f1"], "metric_for_best_model='f1'"),
    "missing checkpoint": (lambda tmp: ["--resume_from_checkpoint", str(tmp / "no_ckpt")], "no_ckpt"),
}


def _write(path, text):
    path.write_text(text)
    return path


def _run_bad(launcher, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        launcher.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()  # log lines on rank 0 come before it
    assert lines[-1].startswith("train.py: error: ") and sum("error" in line.lower() for line in lines) == 1, lines
    return lines[-1]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(launcher, tmp_path, capsys, case):
    make_args, expected = BAD_INPUTS[case]
    output_dir = tmp_path / "out"
    line = _run_bad(launcher, [*TINY, "--output_dir", str(output_dir), *make_args(tmp_path)], capsys)
    assert expected in line
    assert not output_dir.exists()


def test_only_a_config_with_deepspeeds_own_adam_on_the_gpu_needs_a_cuda_build(tmp_path):
    run = parse_args(["--task_name", "rte", "--output_dir", str(tmp_path)])
    built = {
        name: jit_builds_fused_adam(build_ds_config(REPO_ROOT / "ds_configs" / f"{name}.json", run.training, 2, "job"))
        for name in STAGE_CONFIGS
    }
    assert not any(built.values()), built  # torch's fused AdamW, or DeepSpeedCPUAdam for the offload config
    assert jit_builds_fused_adam(build_ds_config(_config_file(tmp_path, optimizer__params__torch_adam=False), run.training, 2, "job"))


@pytest.mark.parametrize("value", [None, "", "9.0", "8.0;8.6;9.0+PTX", "7.5 8.0 10.0", " 9.0 ; 12.0+PTX "])
def test_arch_lists_deepspeed_can_build_for_pass(value):
    check_cuda_arch_list(value)


@pytest.mark.parametrize(("value", "named"), [("9.0a", "9.0a"), ("8.0;9.0a;10.0a+PTX", "9.0a, 10.0a+PTX"), ("sm_90", "sm_90"), ("9", "9")])
def test_arch_lists_deepspeed_cannot_parse_are_a_value_error_naming_them(value, named):
    with pytest.raises(
        ValueError, match=re.escape(f"TORCH_CUDA_ARCH_LIST={value!r}: DeepSpeed cannot build its fused optimizer for {named}:")
    ):
        check_cuda_arch_list(value)


def test_a_cuda_arch_list_deepspeed_cannot_parse_exits_2_and_writes_nothing(launcher, tmp_path, capsys, monkeypatch):
    # What a CUDA image's "9.0a" does on a GPU with a config that has DeepSpeed JIT-build its fused AdamW.
    monkeypatch.setattr(launcher.torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    output_dir = tmp_path / "out"
    config = ["--deepspeed", str(_config_file(tmp_path, optimizer__params__torch_adam=False))]
    line = _run_bad(launcher, [*TINY, *config, "--output_dir", str(output_dir)], capsys)
    assert "TORCH_CUDA_ARCH_LIST='8.0;9.0a': DeepSpeed cannot build its fused optimizer for 9.0a" in line
    assert not output_dir.exists()


def test_bad_input_leaves_an_earlier_run_untouched(launcher, tmp_path, capsys):
    output_dir = tmp_path / "out"
    (output_dir / "checkpoints").mkdir(parents=True)
    (output_dir / "checkpoints" / "latest").write_text("step-3\n")
    (output_dir / "metrics.json").write_text("{}")
    before = {p: p.read_bytes() for p in output_dir.rglob("*") if p.is_file()}
    _run_bad(launcher, [*TINY, "--output_dir", str(output_dir), "--num_experts", "0"], capsys)
    _run_bad(launcher, [*TINY, "--output_dir", str(output_dir), "--overwrite_output_dir", "--bottleneck_dim", "999"], capsys)
    assert {p: p.read_bytes() for p in output_dir.rglob("*") if p.is_file()} == before


def test_a_non_empty_output_dir_without_checkpoint_needs_overwrite(launcher, tmp_path, capsys):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    line = _run_bad(launcher, [*TINY, "--output_dir", str(output_dir)], capsys)
    assert "--overwrite_output_dir" in line and (output_dir / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in output_dir.iterdir()) == ["notes.txt"]


def test_evaluation_splits_are_named_like_run_glue():
    from types import SimpleNamespace

    from adamix_ds.data import GLUE_TASKS, TaskData
    from adamix_ds.training import data as training_data

    family = SimpleNamespace(evaluate=lambda *args: {"accuracy": 0.5, "loss": 0.7})
    splits = {name: None for name in ("validation", "validation_mismatched", "test", "test_mismatched")}
    metrics = training_data.evaluate_splits(None, TaskData(train=None, eval=splits, spec=GLUE_TASKS["mnli"]), family, 8, None)
    assert set(metrics) == {
        "eval_accuracy", "eval_loss", "eval_accuracy_mm", "eval_loss_mm", "test_accuracy", "test_loss", "test_accuracy_mm", "test_loss_mm"
    }  # fmt: skip
