"""Predictions of a saved adapter: exactly the training run's evaluation, and what a merged AdaMix costs at inference.

    python benchmarks/prediction.py          # two short real MiniLM SST-2 runs (AdaMix and one adapter), a few minutes
    python benchmarks/prediction.py --fast   # fewer steps and sentences (the smoke test)

1. Trains AdaMix (``launchers/train.py``, real MiniLM, the first ``train_samples`` SST-2 sentences, ``steps`` steps)
   and a single bottleneck adapter (``--method adapter``, the same data), each evaluated on the SST-2 dev set.
2. Predicts the SST-2 dev set with ``launchers/predict.py --split validation`` from the AdaMix run's ``adapter/``
   folder, scores the predictions against the dev labels and compares with the run's ``eval_accuracy``
   (``metrics.json``): they must be equal exactly.
3. Times ``predict`` of both adapters (``load_for_inference``, merged, fp32) on the dev sentences, in rotated rounds in
   one process, on the device a user predicts on (the GPU when there is one, as ``predict.py`` does; the device is
   synchronised before and after each round): sentences per second, and the merged AdaMix model's time relative to
   the single adapter's. The script prints the device it timed, and the results record it.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from adamix_ds.data import get_task_spec
from adamix_ds.data.inputs import read_task_split
from adamix_ds.distributed import DistEnv
from adamix_ds.inference import load_for_inference

from common import REPO_ROOT, RESULTS_DIR, cli, environment, markdown_table, median_ratio, timed_rounds, write_results

GLUE = REPO_ROOT.parent / "shared" / "data" / "glue"
METHODS = ("adapter", "adamix")


def _train(method: str, output_dir: Path, train_samples: int, steps: int, eval_samples: int | None) -> dict[str, Any]:
    command = [sys.executable, str(REPO_ROOT / "launchers" / "train.py"), "--task_name", "sst2", "--method", method]
    command += ["--max_train_samples", str(train_samples), "--max_steps", str(steps), "--max_seq_length", "64"]
    command += ["--per_device_train_batch_size", "16", "--learning_rate", "3e-3", "--output_dir", str(output_dir), "--overwrite_output_dir"]
    command += ["--eval_strategy", "no"] + (["--max_eval_samples", str(eval_samples)] if eval_samples else [])
    subprocess.run(command, check=True, cwd=REPO_ROOT)
    return json.loads((output_dir / "metrics.json").read_text())


def prediction(
    out_dir: str = str(RESULTS_DIR),
    work_dir: str = "outputs/bench_prediction",
    train_samples: int = 2000,
    steps: int = 100,
    rounds: int = 5,
    batch_size: int = 32,
    device: str | None = None,
    fast: bool = False,
) -> dict[str, Any]:
    """Check that predictions equal the training run's evaluation and time merged AdaMix against one adapter.

    Args:
        out_dir: where prediction.json and prediction.md go.
        work_dir: the two training runs' output folders.
        train_samples: SST-2 training sentences of both runs.
        steps: optimizer steps of both runs (batch 16).
        rounds: timing rounds (median reported).
        batch_size: sentences per forward when predicting.
        device: where the timed predictions run, cpu or cuda (default: cuda when available).
        fast: 8 steps, the first 96 dev sentences, 2 rounds.
    """
    eval_samples = 96 if fast else None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    machine = environment()
    print(f"device: {device} ({machine['gpu'] if device == 'cuda' else machine['cpu']})", flush=True)
    steps, rounds = (8, 2) if fast else (steps, rounds)
    work = Path(work_dir)
    metrics = {method: _train(method, work / method, train_samples, steps, eval_samples) for method in METHODS}

    spec = get_task_spec("sst2")
    dev = read_task_split(spec, GLUE, "validation")
    if eval_samples:
        dev = dev.select(range(eval_samples))
    predictions_file = work / "dev_predictions.jsonl"
    command = [sys.executable, str(REPO_ROOT / "launchers" / "predict.py"), "--adapter_name_or_path", str(work / "adamix" / "adapter")]
    command += ["--split", "validation", "--output_file", str(predictions_file), "--per_device_batch_size", str(batch_size)]
    subprocess.run(command, check=True, cwd=REPO_ROOT)
    predicted = [json.loads(line)["prediction"] for line in predictions_file.read_text().splitlines()][: len(dev)]
    accuracy = sum(int(p == label) for p, label in zip(predicted, dev["labels"], strict=True)) / len(dev)
    trained = metrics["adamix"]["final"]["eval_accuracy"]

    env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1)
    adapters = {method: load_for_inference(work / method / "adapter", device=device) for method in METHODS}
    encoded = {method: adapter.family.encode_inputs(dev) for method, adapter in adapters.items()}

    def run(method: str, _: int) -> None:
        adapters[method].family.predict(adapters[method].model, encoded[method], batch_size, env)

    seconds = timed_rounds(list(METHODS), run, rounds, warmup=1, device=device)
    results: dict[str, Any] = {
        "environment": machine,
        "settings": {
            "train_samples": train_samples,
            "steps": steps,
            "dev_sentences": len(dev),
            "batch_size": batch_size,
            "rounds": rounds,
            "device": device,
        },
        "dev_accuracy_from_predictions": accuracy,
        "training_eval_accuracy": trained,
        "equal": accuracy == trained,
        "sentences_per_second": {method: len(dev) / statistics.median(seconds[method]) for method in METHODS},
        "adamix_time_vs_adapter": median_ratio(seconds, "adamix", "adapter"),
        "failures": [] if accuracy == trained else [f"dev accuracy from predictions {accuracy} != the run's eval_accuracy {trained}"],
    }
    speed = results["sentences_per_second"]
    markdown = "\n".join(
        [
            "## Prediction: equal to training's evaluation, and its speed",
            "",
            f"`benchmarks/prediction.py`: real MiniLM, AdaMix (bottleneck r=16, M=4) and one bottleneck adapter trained {steps} steps "
            f"on {train_samples} SST-2 sentences; `launchers/predict.py --split validation` on the {len(dev)} dev sentences "
            f"(batch {batch_size}), merged; speed on **{device}** (fp32): median of {rounds} rotated rounds in one process.",
            "",
            markdown_table(
                ["", "value"],
                [
                    ["dev accuracy of predict.py's predictions", f"{accuracy:.6f}"],
                    ["the run's eval_accuracy (metrics.json)", f"{trained:.6f}"],
                    ["equal", "yes" if accuracy == trained else "**no**"],
                    ["sentences/s, single adapter", f"{speed['adapter']:.1f}"],
                    ["sentences/s, merged AdaMix", f"{speed['adamix']:.1f}"],
                    ["merged AdaMix time ÷ single adapter", f"{results['adamix_time_vs_adapter']:.3f}"],
                ],
            ),
            "",
        ]
    )
    write_results("prediction", results, markdown, out_dir=Path(out_dir))
    return results


if __name__ == "__main__":
    sys.exit(cli(prediction))
