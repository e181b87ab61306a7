#!/usr/bin/env python
"""Train, evaluate, merge and save AdaMix on a GLUE, few-shot or generation task with DeepSpeed: the run_glue.py of adamix-ds.

The CPU demo (real MiniLM on SST-2; a few minutes on 2 cores):
    deepspeed launchers/train.py --deepspeed ds_configs/zero2.json
Two ranks (CPU ranks, or two GPUs), any ZeRO stage:
    deepspeed --num_gpus 2 launchers/train.py --deepspeed ds_configs/zero3.json --task_name rte --data_dir ../shared/data/glue
    torchrun --nproc_per_node 2 launchers/train.py --deepspeed ds_configs/zero1.json --task_name mrpc
The paper's RoBERTa-large recipe on 8 GPUs, and a model that needs ZeRO-3 with CPU offload:
    deepspeed --num_gpus 8 launchers/train.py --deepspeed ds_configs/zero2.json --bf16 --model_name_or_path FacebookAI/roberta-large \
        --task_name mnli --max_seq_length 128 --per_device_train_batch_size 8 --learning_rate 3e-4 --num_train_epochs 20
    deepspeed --num_gpus 8 launchers/train.py --deepspeed ds_configs/zero3_offload.json --bf16 --model_name_or_path microsoft/deberta-v2-xxlarge ...
Few-shot, prompt-based (the pretrained LM head predicts the task's label words; LiST's K=30 split 1):
    deepspeed launchers/train.py --task_name sst2 --data_dir ../shared/data/list/SST-2/30-1 --prompt --model_name_or_path FacebookAI/roberta-large
Generation (E2E NLG: a causal LM writes the text of each meaning representation; beam search, five metrics):
    deepspeed launchers/train.py --task_name e2e_nlg --model_name_or_path openai-community/gpt2-medium --method adamix \
        --adapter_type lora --bottleneck_dim 4 --num_experts 8 --label_smoothing_factor 0.1 --weight_decay 0.01
Several nodes: deepspeed --hostfile hostfile launchers/train.py ...; one process without a launcher: python launchers/train.py
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time

# CPU ranks share a few cores with each other and with whatever else runs. OpenMP threads that spin while
# they wait make a contended core several times slower; waiting passively costs little on free cores.
# (Read by OpenMP when torch loads, so it is set before the first import of torch.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import deepspeed
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import AutoTokenizer

from adamix_ds import ExpertStepGuard, add_adamix, count_parameters, enable_activation_checkpointing, load_adapter
from adamix_ds.data import get_task_spec
from adamix_ds.evaluation import evaluate_loss
from adamix_ds.families import build_family
from adamix_ds.hub import push_folder
from adamix_ds.merging import set_merge
from adamix_ds.optim import adamw_param_groups
from adamix_ds.optim_deepspeed import DeepSpeedOptimizerAccess
from adamix_ds.training import (
    LR_SCHEDULE,
    TrainerState,
    TrainSchedule,
    adamix_config,
    build_ds_config,
    check_cuda_arch_list,
    check_resumable,
    directory_bytes,
    evaluate_splits,
    find_checkpoint,
    init_distributed,
    jit_builds_fused_adam,
    parse_args,
    resolve_data_dir,
    resolve_model_path,
    save_checkpoint,
    save_model,
    shutdown_distributed,
    step_seed,
    train_loader,
    trainable_shapes,
    usage_errors,
    zero_stage,
)
from adamix_ds.training.arguments import DEMO_PRESET, family_options, to_dict
from adamix_ds.training.checkpoint import CHECKPOINTS, CheckpointSaveError
from adamix_ds.training.elastic import resume_checkpoint
from adamix_ds.training.eval_modes import EVAL_MODES_FILE, evaluate_modes, parse_eval_modes
from adamix_ds.training.loop import BestKeeper, LossWindow, checkpoint_due, evaluation_due, log_events, step_batches, train_step
from adamix_ds.training.merges import MERGE_MODES, compute_merges, hold_out
from adamix_ds.training.preemption import PreemptionSignal, request_requeue
from adamix_ds.training.runtime import logger, start_launcher


def main(argv: list[str] | None = None) -> None:
    env, _ = start_launcher()  # the device is the engine's, once DeepSpeed has started

    # -- Setup. Every input is checked here; bad input ends with one line and exit code 2, and nothing
    # is written to output_dir before this block has passed.
    with usage_errors(env):
        run = parse_args(argv)
        args, output_dir = run.training, run.output_dir
        if run.demo:
            logger.info(
                "no --model_name_or_path or --task_name: the CPU demo run (%s)", ", ".join(f"{k}={v}" for k, v in DEMO_PRESET.items())
            )
        # Verified (manifest sizes and checksums) before the model loads: a damaged file fails in seconds.
        checkpoint = find_checkpoint(output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
        model_path = resolve_model_path(run.model.model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(run.model.tokenizer_name or model_path)
        # The task family: sequence classification (a fresh head), --prompt (the pretrained LM head), or
        # generation (a causal LM continues the task's input; decoded and scored at evaluation).
        options = family_options(run.data, run.generation, run.adamix.train_lm_head, args.label_smoothing_factor)
        family = build_family(get_task_spec(run.data.task_name), tokenizer, run.data.max_seq_length, model_path, **options)
        data_dir = resolve_data_dir(run.data.task_name, run.data.data_dir)
        logger.info("data: %s from %s", run.data.task_name, data_dir or "the Hugging Face Hub")
        data = family.load_data(data_dir, run.data.max_train_samples, run.data.max_eval_samples)
        data, holdout = hold_out(data, run.data.holdout_samples)  # what a greedy soup selects on, never trained on
        schedule = TrainSchedule.build(
            len(data.train),
            env.world_size,
            args.per_device_train_batch_size,
            args.gradient_accumulation_steps,
            args.num_train_epochs,
            args.max_steps,
            args.warmup_ratio,
            args.warmup_steps,
        )
        ds_config = build_ds_config(args.deepspeed, args, env.world_size, job_name=output_dir.name)
        modes = () if run.adamix.eval_modes is None else parse_eval_modes(run.adamix.eval_modes)
        merges = sorted({mode for mode in modes if mode in MERGE_MODES} | {run.adamix.merge} - {"uniform"})
        if "fisher" in merges and zero_stage(ds_config) == 3:
            raise ValueError(
                "fisher merging needs whole parameters, not ZeRO-3 partitions: use ZeRO 0-2, or launchers/evaluate.py on OUT/experts"
            )
        if torch.cuda.is_available() and jit_builds_fused_adam(ds_config):  # a config of the user's: DeepSpeed's FusedAdam
            check_cuda_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"))
        torch.manual_seed(args.seed)  # the same head and expert initialisation on every rank
        model = family.load_model(model_path, run.model.backbone_dropout)
        backbone_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        config = adamix_config(run, family.head_modules(model))
        if config is not None:
            add_adamix(model, config)
        if run.model.adapter_name_or_path is not None:
            if config is None:
                raise ValueError(f"adapter_name_or_path={run.model.adapter_name_or_path} needs an adapter method, not --method full")
            load_adapter(model, run.model.adapter_name_or_path)
        if config is not None:
            model.adamix_task = family.record()  # saved with the adapters: how this run read its inputs
        if args.gradient_checkpointing:
            enable_activation_checkpointing(model)
        parameters = count_parameters(model) if config is not None else {"trainable": sum(p.numel() for p in model.parameters())}
        # What decides data order and routing: a checkpoint written under another layout cannot continue exactly.
        layout = {
            "world_size": env.world_size,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "train_samples": len(data.train),
            "seed": args.seed,
            "total_steps": schedule.total_steps,
            "lr_schedule": LR_SCHEDULE,
            "zero_stage": zero_stage(ds_config),
        }
        state = TrainerState(layout=layout, trainable=trainable_shapes(model))
        if checkpoint is not None:
            state = TrainerState.load(checkpoint)
            check_resumable(checkpoint, state, layout, trainable_shapes(model), args.elastic_resume)

    # -- DeepSpeed: the engine owns the optimizer of the config and steps the reference's lr schedule; the guard
    # gives experts that no pass routed to since the last step the semantics --unrouted_experts names (the
    # paper's runs' by default).
    init_distributed(env)
    param_groups = adamw_param_groups(model, args.learning_rate, args.weight_decay, run.adamix.expert_lr_scale, args.decay_biases)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups, config=ds_config, lr_scheduler=schedule.lr_scheduler
    )
    guard = ExpertStepGuard(engine.module, DeepSpeedOptimizerAccess(engine), run.adamix.unrouted_experts)
    preemption = PreemptionSignal()  # Slurm's SIGUSR1 before the time limit (launchers/slurm/)
    elastic = None
    if checkpoint is not None:
        elastic = resume_checkpoint(engine, checkpoint, state, layout, schedule, output_dir / CHECKPOINTS)
        if elastic is not None:  # saved again on this layout: a restart continues exactly, without --elastic_resume
            save_checkpoint(engine, output_dir, state, args.save_total_limit)
        logger.info("resumed from %s at step %d", checkpoint, state.global_step)
    elif args.overwrite_output_dir and env.is_main:
        shutil.rmtree(output_dir / CHECKPOINTS, ignore_errors=True)  # never resume into a previous run's checkpoints
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "run_config.json").write_text(json.dumps({"arguments": to_dict(run), "deepspeed": ds_config}, indent=2) + "\n")
    logger.info(
        "%d training examples, %d rank(s), %d steps of %d examples (%d epochs), %d warmup; parameters %s",
        len(data.train),
        env.world_size,
        schedule.total_steps,
        ds_config["train_batch_size"],
        schedule.num_epochs,
        schedule.warmup_steps,
        parameters,
    )

    # What the adapters' model cards say of this run's data and hyper-parameters.
    card_hyperparameters = {
        "task_name": run.data.task_name,
        "data": data_dir or "the Hugging Face Hub",
        "train_samples": len(data.train),
        "max_seq_length": run.data.max_seq_length,
        "method": run.adamix.method,
        "learning_rate": args.learning_rate,
        "train_batch_size": ds_config["train_batch_size"],
        "total_steps": schedule.total_steps,
        "warmup_steps": schedule.warmup_steps,
        "lr_scheduler_type": LR_SCHEDULE,
        "weight_decay": args.weight_decay,
        "world_size": env.world_size,
        "zero_stage": zero_stage(ds_config),
        "seed": args.seed,
    }
    loader = train_loader(data.train, family.collator(), args.per_device_train_batch_size, env, args.seed, engine.device)
    best_key = "eval_" + (args.metric_for_best_model or family.metric_names[0]).removeprefix("eval_")
    best_dir = output_dir / ("best_model" if config is None else "best_adapter")
    save_options = {"tokenizer": tokenizer, "hyperparameters": card_hyperparameters}
    evaluate_and_keep_best = BestKeeper(
        engine, data, family, args.per_device_eval_batch_size, env, output_dir, state, best_key, best_dir, save_options
    )

    # -- Training: a step is --gradient_accumulation_steps micro-batches, each one or two routed passes (consistency
    # loss). The host reads the device once per log line, where the ranks also agree to stop on Slurm's signal.
    step = start_step = saved_step = state.global_step
    metrics: dict[str, float] = {}
    window = LossWindow(engine.device)
    stop = False
    last_task_loss: float | None = None  # the last log line's, what metrics.json reports as the final one
    train_start = time.perf_counter()
    engine.train()
    with (
        logging_redirect_tqdm(),
        tqdm(total=schedule.total_steps, initial=step, disable=not env.is_main, desc="train", dynamic_ncols=True) as bar,
    ):
        for batches in step_batches(loader, schedule, state):
            train_step(engine, guard, family, batches, run.adamix.consistency_weight, window, step_seed(args.seed, env.rank, step))
            step = state.global_step = step + 1
            bar.update(1)
            if step % args.logging_steps == 0 or step == schedule.total_steps:
                means = window.close(preemption.received)
                logs = means.logs(run.adamix.consistency_weight, scheduler.get_last_lr()[0], args.per_device_train_batch_size)
                log_events(engine, logs, step)
                bar.set_postfix(loss=f"{logs['train_loss']:.4f}", lr=f"{logs['train_learning_rate']:.2e}")
                last_task_loss, stop = means.task_loss, means.stop
            evaluated = evaluation_due(args.eval_strategy, args.eval_steps, step, step + state.data_step_offset, schedule.steps_per_epoch)
            if evaluated:
                metrics = evaluate_and_keep_best(step)
            if checkpoint_due(args.save_steps, step, evaluated):
                saved = save_checkpoint(engine, output_dir, state, args.save_total_limit)
                saved_step = step
                logger.info("saved %s (%.2f MB)", saved, directory_bytes(saved) / 1e6)
            if stop:
                break
    train_runtime = time.perf_counter() - train_start

    if stop:  # checkpoint and leave; the requeued job resumes from output_dir
        if saved_step != step:
            save_checkpoint(engine, output_dir, state, args.save_total_limit)
        if env.is_main:
            request_requeue()
        logger.info("stopped at step %d on the preemption signal; the next start resumes from %s", step, output_dir / CHECKPOINTS)
        shutdown_distributed(env)
        return

    # -- The end: evaluate the merged model, keep a resumable checkpoint, save merged adapter and experts.
    if metrics.get("step") != step:
        metrics = evaluate_and_keep_best(step)
    # The merges beyond the uniform average: evaluated as modes, and the one --merge names is what adapter/ holds.
    merged = compute_merges(merges, engine, family, data.train, holdout, args.per_device_eval_batch_size, env, run.adamix.fisher_batches)
    # The held-out rows' task loss under the model as evaluated (AdaMix: the uniform merge): every method's, alike.
    holdout_loss = None if holdout is None else evaluate_loss(engine, holdout, family, args.per_device_eval_batch_size, env)
    if modes:  # every routing of the final experts, for the paper's Fig. 5
        routings = evaluate_modes(engine, data, family, args.per_device_eval_batch_size, env, modes, run.adamix.random_draws, merged)
        if env.is_main:
            (output_dir / EVAL_MODES_FILE).write_text(json.dumps(routings, indent=2) + "\n")
    merge_summary = None
    if run.adamix.merge != "uniform":
        coefficients, record = merged[run.adamix.merge]
        set_merge(engine.module, coefficients)
        # A merge also evaluated as a mode keeps those scores: the same coefficients, not decoded twice.
        scores = (
            routings[run.adamix.merge]
            if run.adamix.merge in modes
            else evaluate_splits(engine, data, family, args.per_device_eval_batch_size, env)
        )
        merge_summary = {"merge": run.adamix.merge, **record, **scores}
        logger.info("merge %s: %s", run.adamix.merge, json.dumps(merge_summary))
    if saved_step != step:
        save_checkpoint(engine, output_dir, state, args.save_total_limit)
    checkpoint_dir = output_dir / CHECKPOINTS / f"step-{step}"
    if config is None:
        save_model(engine, output_dir / "model", merged=True, tokenizer=tokenizer)
    else:
        # adapter/'s card reports the merge it holds: the average's final metrics, or --merge's own scores.
        adapter_metrics = metrics if merge_summary is None else {k: v for k, v in merge_summary.items() if k.startswith(("eval_", "test_"))}
        save_model(engine, output_dir / "adapter", merged=True, metrics=adapter_metrics, hyperparameters=card_hyperparameters)
        save_model(engine, output_dir / "experts", merged=False, metrics=metrics, hyperparameters=card_hyperparameters)
    trained_samples = (step - start_step) * ds_config["train_batch_size"]
    summary = {
        "final": {**metrics, "epoch": (step + state.data_step_offset) / schedule.steps_per_epoch},
        "best": {**state.best_metrics, "step": state.best_step},
        "merge": merge_summary,  # adapter/'s merge when not the uniform average, with its scores
        "train_runtime": train_runtime,
        # The last log line's mean task loss over its micro-batches (AdaMix: under random routing, with dropout).
        "train_task_loss": last_task_loss,
        "holdout_loss": holdout_loss,
        "train_samples": trained_samples,
        "train_samples_per_second": trained_samples / train_runtime if train_runtime > 0 else 0.0,
        "train_steps_per_second": (step - start_step) / train_runtime if train_runtime > 0 else 0.0,
        "resumed_from_step": start_step,
        "elastic_resume": None if elastic is None else dataclasses.asdict(elastic),
        "total_steps": schedule.total_steps,
        "world_size": env.world_size,
        "zero_stage": zero_stage(ds_config),
        "parameters": parameters,
        "checkpoint_bytes": directory_bytes(checkpoint_dir),
        "backbone_bytes": backbone_bytes,
    }
    if env.is_main:
        (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        scores = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith(("eval_", "test_")) and not k.endswith("loss"))
        logger.info(
            "done in %.0f s: %s (best %s=%s at step %s); checkpoint %.2f MB next to a %.1f MB backbone; results in %s",
            train_runtime,
            scores,
            best_key,
            "none" if state.best_metric is None else f"{state.best_metric:.4f}",
            state.best_step,
            summary["checkpoint_bytes"] / 1e6,
            backbone_bytes / 1e6,
            output_dir,
        )
    upload_failed = False
    if args.push_to_hub and env.is_main:  # the end of a complete run; a failed upload keeps every local file
        folder = output_dir / ("model" if config is None else "adapter")
        try:
            logger.info("uploaded %s: %s", folder, push_folder(folder, args.hub_model_id or output_dir.name))
        except RuntimeError as error:
            print(f"train.py: error: {error}", file=sys.stderr, flush=True)
            upload_failed = True
    shutdown_distributed(env)
    if upload_failed:
        sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except CheckpointSaveError:  # rank 0 logged the one line that says why; no traceback per rank
        sys.exit(1)
