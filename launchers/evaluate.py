#!/usr/bin/env python
"""Evaluate a trained AdaMix run under every inference routing: merged, ensemble, each single expert and
R random-routing draws, on the same evaluation split (the paper's Fig. 5); by name also the greedy soup, the
Fisher-weighted merge and the best single expert on held-out rows (the run's held-out rows and training batches).

    python launchers/evaluate.py --adapter_name_or_path outputs/rte_adamix/experts --eval_modes all --output_file modes.json
    python launchers/evaluate.py --adapter_name_or_path OUT/experts --eval_modes merged,greedy_soup,fisher   # OUT trained with --holdout_samples
    python launchers/evaluate.py --adapter_name_or_path OUT/experts --task_name rte --data_dir ../shared/data/glue \
        --model_name_or_path sentence-transformers/all-MiniLM-L6-v2 --eval_modes merged,random --random_draws 20

Beside a training run's output (OUT/experts next to OUT/run_config.json) the backbone, task, data and eval
batch default to that run's, so "merged" reproduces the run's own final evaluation exactly; a prompt-based
adapter's template and label words come from its task.json. Prints (or
writes) one JSON object: a mode -> its metrics; "fixed" and "random" hold a list (one entry per expert
pair or draw). Runs on one process, or on several (torchrun/deepspeed: each rank scores a shard).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in train.py: set before torch is imported

import dataclasses

from adamix_ds.inference import load_for_inference
from adamix_ds.training import init_distributed, resolve_data_dir, shutdown_distributed, usage_errors
from adamix_ds.training.arguments import parse_eval_args
from adamix_ds.training.eval_modes import evaluate_modes, parse_eval_modes
from adamix_ds.training.merges import MERGE_MODES, compute_merges, hold_out
from adamix_ds.training.runtime import logger, start_launcher


def main(argv: list[str] | None = None) -> None:
    env, device = start_launcher()
    with usage_errors(env, prog="evaluate.py"):
        run = parse_eval_args(argv)
        # The experts as saved (every routing is evaluated); the backbone, task and template from the adapter's
        # records unless a flag or the run beside it says otherwise.
        adapter = load_for_inference(
            run.model.adapter_name_or_path,
            run.model.model_name_or_path,
            task_name=run.data.task_name,
            max_seq_length=run.data.max_seq_length,
            tokenizer_name=run.model.tokenizer_name,
            eval_mode=None,
            decoding=dataclasses.asdict(run.generation),
            device=device,
        )
        model, family = adapter.model, adapter.family
        task_name = family.spec.name
        modes = parse_eval_modes(run.evaluation.eval_modes)
        merges = [mode for mode in modes if mode in MERGE_MODES]
        # The eval splits are scored; the training split (and its held-out rows, as the run held them out) only
        # feeds the merges.
        train_samples = run.data.max_train_samples if merges else 1
        data = family.load_data(resolve_data_dir(task_name, run.data.data_dir), train_samples, run.data.max_eval_samples)
        data, holdout = hold_out(data, run.data.holdout_samples if merges else None)
    init_distributed(env)
    logger.info("evaluating %s on %s: %s", run.model.adapter_name_or_path, task_name, ", ".join(modes))
    batch_size = run.evaluation.per_device_eval_batch_size
    merged = compute_merges(merges, model, family, data.train, holdout, batch_size, env, run.evaluation.fisher_batches)
    results = evaluate_modes(model, data, family, batch_size, env, modes, run.evaluation.random_draws, merged)
    if env.is_main:
        text = json.dumps(results, indent=2) + "\n"
        if run.evaluation.output_file is None:
            print(text, end="")
        else:
            with open(run.evaluation.output_file, "w") as handle:
                handle.write(text)
            logger.info("wrote %s", run.evaluation.output_file)
    shutdown_distributed(env)


if __name__ == "__main__":
    main()
