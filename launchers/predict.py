#!/usr/bin/env python
"""Predict with a trained adapter on unlabelled data: a GLUE split (test.tsv), your own file, or GLUE's submission files.

    python launchers/predict.py --adapter_name_or_path outputs/sst2_adamix/adapter --split test --output_file sst2_test.jsonl
    python launchers/predict.py --adapter_name_or_path outputs/rte_adamix/adapter --glue_submission submission/
    python launchers/predict.py --adapter_name_or_path OUT/adapter --input reviews.csv --text_column review
    python launchers/predict.py --adapter_name_or_path OUT_E2E/adapter --input mrs.jsonl --text_column mr --num_beams 5
    deepspeed --num_gpus 2 launchers/predict.py --adapter_name_or_path OUT/adapter --split test --output_file test.jsonl

The backbone, task, template and decoding come from the adapter folder (``adamix_ds.inference.load_for_inference``;
flags override). Output: JSON lines, one per input in input order, with the input's text columns, ``prediction``
(the class id, a score, or the generated text) and for classification ``label`` and ``probabilities``;
``--glue_submission DIR`` writes the task's leaderboard files (``index<TAB>prediction``, labels as GLUE writes them).
On several ranks each rank predicts a shard and rank 0 writes.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in train.py: set before torch is imported

from pathlib import Path

from adamix_ds.data import GLUE_TASKS
from adamix_ds.data.inputs import GLUE_SUBMISSION, read_input_file, read_task_split, submission_lines
from adamix_ds.io import write_atomically
from adamix_ds.training import init_distributed, resolve_data_dir, shutdown_distributed, usage_errors
from adamix_ds.training.inference_arguments import parse_predict_args
from adamix_ds.training.runtime import logger, start_launcher


def main(argv: list[str] | None = None) -> None:
    env, device = start_launcher()
    with usage_errors(env, prog="predict.py"):
        run = parse_predict_args(argv)
        args, options = run.adapter, run.predict
        adapter = args.load(decoding=run.generation, device=device)
        spec = adapter.family.spec
        # Every input is read before anything is predicted: a missing split or column fails in seconds.
        if options.glue_submission is not None:
            if spec.name not in GLUE_SUBMISSION:
                raise ValueError(f"glue_submission needs a GLUE task: the adapter's task {spec.name} is not one of {', '.join(GLUE_TASKS)}")
            data_dir = resolve_data_dir(spec.name, options.data_dir)
            if data_dir is None:
                raise ValueError(f"glue_submission needs the {spec.name} test files: pass --data_dir (a GLUE folder)")
            inputs = {file.name: read_task_split(spec, data_dir, file.split) for file in GLUE_SUBMISSION[spec.name]}
        elif options.input is not None:
            columns = adapter.family.input_columns
            names = [options.text_column, options.text_pair_column][: len(columns)]
            if options.text_pair_column is not None and len(columns) < 2:
                raise ValueError(f"text_pair_column={options.text_pair_column} is for sentence-pair tasks: {spec.name} reads one text")
            inputs = {options.input: read_input_file(options.input, {c: n or c for c, n in zip(columns, names, strict=True)})}
        else:
            data_dir = resolve_data_dir(spec.name, options.data_dir)
            if data_dir is None:
                raise ValueError(f"split={options.split} needs the {spec.name} files: pass --data_dir (a GLUE folder), or --input")
            inputs = {options.split: read_task_split(spec, data_dir, options.split)}

    init_distributed(env)
    results = {}
    for name, rows in inputs.items():
        logger.info("predicting %d rows of %s with %s", len(rows), name, args.adapter_name_or_path)
        results[name] = adapter.predict(rows, options.per_device_batch_size, env, progress=True)
    if env.is_main:  # written once everything is predicted, each file whole or not at all
        if options.glue_submission is not None:
            folder = Path(options.glue_submission)
            folder.mkdir(parents=True, exist_ok=True)
            for name, predicted in results.items():
                write_atomically(folder / name, submission_lines(spec, [r["prediction"] for r in predicted]))
            logger.info("wrote %s to %s", ", ".join(results), folder)
        else:
            ((name, predicted),) = results.items()
            texts = inputs[name].select_columns(list(adapter.family.input_columns)).to_list()
            rows = (
                json.dumps({"index": i, **text, **result}, ensure_ascii=False) + "\n"
                for i, (text, result) in enumerate(zip(texts, predicted, strict=True))
            )
            text = "".join(rows)
            if options.output_file is None:
                sys.stdout.write(text)
            else:
                write_atomically(options.output_file, text)
                logger.info("wrote %d predictions to %s", len(predicted), options.output_file)
    shutdown_distributed(env)


if __name__ == "__main__":
    main()
