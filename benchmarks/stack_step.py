"""Training step of a deep adapter stack on one GPU: AdaMix, a single adapter and PEFT LoRA, fused kernel vs eager.

The model is ``layers`` frozen feed-forward blocks of width ``hidden`` with random weights (LayerNorm,
``d -> 4d``, GELU, ``4d -> d``, residual), the adapter on each block's output projection, where BERT-style
models carry AdaMix. A step is forward, backward and an AdamW step over the trainable parameters, on random
``[batch, tokens / batch, d]`` activations; the loss is the mean square of the output. Methods:

* ``adamix``: ``add_adamix`` with ``experts`` experts (up shared, the paper's setting), one routed pass per step;
* ``adapter``: the same layers with one expert, i.e. a single adapter through the same dispatcher;
* ``lora``: PEFT LoRA of the same rank on the same projections (no kernel choice: PEFT's own layers).

The two adapter methods run twice, with ``ADAMIX_KERNEL=triton`` and ``ADAMIX_KERNEL=eager``. All methods are
built first; then rounds run every method for a few steps in turn, so machine noise hits them alike; each step
is timed from its start to the device finishing it, and the median is reported.

    python benchmarks/stack_step.py                     # 24 layers, d = 1024, 16k tokens, bf16, on the GPU
    python benchmarks/stack_step.py --layers 4 --steps 3

Without a GPU it prints one line and exits 0 (``run_stack_step`` itself runs on CPU too, for the tests).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from kernel_bench import DTYPES, forced_kernel
from peft import LoraConfig, get_peft_model
from torch import nn

from adamix_ds import AdaMixConfig, add_adamix

# (method, ADAMIX_KERNEL): the adapter methods through each path; LoRA has no kernel choice.
RUNS = (("adamix", "triton"), ("adamix", "eager"), ("adapter", "triton"), ("adapter", "eager"), ("lora", None))
LEARNING_RATE = 1e-4


class FeedForwardStack(nn.Module):
    """``layers`` pre-norm feed-forward blocks; the adapters go on each block's ``out`` projection."""

    def __init__(self, layers: int, hidden: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(hidden), "inner": nn.Linear(hidden, 4 * hidden), "out": nn.Linear(4 * hidden, hidden)})
            for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block["out"](F.gelu(block["inner"](block["norm"](x))))
        return x


def build_model(method: str, layers: int, hidden: int, rank: int, experts: int, device: str, dtype: torch.dtype) -> nn.Module:
    """The stack with random weights and ``method``'s adapters, everything but the adapters frozen."""
    model = FeedForwardStack(layers, hidden)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["out"]))
    elif method in ("adamix", "adapter"):
        add_adamix(model, AdaMixConfig(bottleneck_dim=rank, num_experts=experts if method == "adamix" else 1, target_modules=["out"]))
    else:
        raise ValueError(f"method={method!r} is unknown: allowed adamix, adapter, lora")
    return model.to(device, dtype).train()


def run_stack_step(
    layers: int = 24,
    hidden: int = 1024,
    tokens: int = 16384,
    batch: int = 8,
    rank: int = 16,
    experts: int = 4,
    dtype: str = "bfloat16",
    device: str = "cuda",
    rounds: int = 3,
    steps: int = 4,
    warmup: int = 2,
) -> list[dict[str, float | str]]:
    """Median step time of every run in ``RUNS``; one row each, with its ratio to the same method's eager run."""
    torch_dtype = DTYPES[dtype]
    torch.manual_seed(0)
    x = torch.randn(batch, tokens // batch, hidden, device=device, dtype=torch_dtype)
    trainers = {}
    for method, kernel in RUNS:
        model = build_model(method, layers, hidden, rank, experts, device, torch_dtype)
        trainable = [p for p in model.parameters() if p.requires_grad]
        trainers[method, kernel] = (model, torch.optim.AdamW(trainable, lr=LEARNING_RATE), sum(p.numel() for p in trainable))

    def step(method: str, kernel: str | None) -> float:
        model, optimizer, _ = trainers[method, kernel]
        with forced_kernel(kernel or "eager"):
            start = time.perf_counter()
            model(x).float().square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
        return time.perf_counter() - start

    for run in trainers:
        for _ in range(warmup):
            step(*run)
    times: dict[tuple[str, str | None], list[float]] = {run: [] for run in trainers}
    for round_index in range(rounds):
        order = list(trainers)
        for run in order[round_index % len(order) :] + order[: round_index % len(order)]:
            times[run] += [step(*run) for _ in range(steps)]

    rows: list[dict[str, float | str]] = []
    for (method, kernel), measured in times.items():
        seconds = statistics.median(measured)
        rows.append(
            {
                "method": method,
                "kernel": kernel or "peft",
                "trainable": trainers[method, kernel][2],
                "ms": seconds * 1e3,
                "tokens_per_s": tokens / seconds,
            }
        )
    eager_ms = {row["method"]: row["ms"] for row in rows if row["kernel"] == "eager"}
    lora_ms = next(row["ms"] for row in rows if row["method"] == "lora")
    for row in rows:
        row["speedup_vs_eager"] = eager_ms.get(row["method"], row["ms"]) / row["ms"]
        row["time_vs_lora"] = row["ms"] / lora_ms
    return rows


def results_table(rows: Sequence[dict[str, float | str]]) -> str:
    """Rows as a markdown table."""
    lines = [
        "| method | kernel | trainable | ms / step | tokens/s | speed-up vs eager | time vs LoRA |",
        "|:---|:---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['kernel']} | {row['trainable']:,} | {row['ms']:.2f} | {row['tokens_per_s']:,.0f} "
            f"| {row['speedup_vs_eager']:.2f}x | {row['time_vs_lora']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per step (all sequences)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--rank", type=int, default=16, help="adapter bottleneck and LoRA rank")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run first")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("stack_step: no CUDA device available, nothing timed")
        return 0
    rows = run_stack_step(**vars(args), device="cuda")
    print(
        f"{torch.cuda.get_device_name()}, {args.dtype}: {args.layers} layers, d = {args.hidden}, {args.tokens} tokens in "
        f"{args.batch} sequences, rank {args.rank}, AdaMix with {args.experts} experts (up shared); median of "
        f"{args.rounds} x {args.steps} steps per run."
    )
    print(results_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
