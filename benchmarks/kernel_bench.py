"""Fused Triton adapter vs the eager PyTorch chain, forward + backward, on one CUDA device.

For each shape it times both paths through the dispatcher (``adamix_ds.kernels.adapter_forward`` with
``ADAMIX_KERNEL`` forcing each: CUDA events around each iteration, after warm-up, L2 flushed and the host
given a head start before each, median reported), converts the median into achieved bandwidth over the
shape's byte floor, and compares that with a device-to-device copy measured in the same run, the practical
bandwidth ceiling. Besides the routed grid it times the stacked consistency case (two passes with different
experts in one call). From all rows it derives the dispatcher rule for this device class (``derive_rule``):
the ``FusedFasterRule`` to record in ``benchmarks/RESULTS.md`` and ``adamix_ds.kernels.FUSED_FASTER_RULES``.
``--floors`` prints the byte and FLOP floors as a markdown table and needs no GPU.

    python benchmarks/kernel_bench.py            # full sweep
    python benchmarks/kernel_bench.py --fast     # a corner subset, fewer iterations
    python benchmarks/kernel_bench.py --floors   # floors table only

The byte floor is the traffic no implementation can avoid: the forward reads ``h`` and writes ``y``;
the backward reads ``dy`` and ``h`` and writes ``dh``; both also move the chosen experts' weights and
their gradients. It leaves out what a given implementation adds (the fused kernel's saved ``[N, r]``
fp32 pre-activation, eager's intermediates, zeroing the unchosen experts' gradients). The FLOP floor
counts the matmuls as ``FlopCounterMode`` does, ``2·N·d·r`` for each ``[N, d] x [d, r]``-sized one:
two forward (``4·N·d·r``) and four backward (``8·N·d·r``).

Needs the ``adamix_ds`` package importable (``make install``, or ``PYTHONPATH=.``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from adamix_ds.kernels import KERNEL_ENV_VAR, FusedFasterRule, adapter_forward

TOKENS = (8192, 16384, 32768, 65536)
HIDDEN_SIZES = (768, 1024, 1536)
RANKS = (8, 16, 48, 64)
FAST_TOKENS = (8192, 65536)
FAST_HIDDEN_SIZES = (768, 1536)
FAST_RANKS = (8, 64)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Experts in the stacked tensors and the ones chosen, so the timed path offsets into the stack: one routed
# pass, and two stacked consistency passes with different experts (tokens count both passes' rows).
NUM_EXPERTS = 4
ROUTED = ((1, 2),)
STACKED = ((1, 2), (3, 0))
STACKED_HIDDEN, STACKED_RANK = 1024, 16
# A shape counts as faster only by this margin over run-to-run timing noise.
MIN_SPEEDUP = 1.05
# Zeroed before each timed iteration: evicts L2 (50 MB on an H100, 60 MB on an H200).
L2_FLUSH_BYTES = 2**30
# Then the GPU spins this many cycles (about 3 ms at 2 GHz) while the host queues the whole step, so the events
# time the GPU's work rather than the host's: on an H200 a flush alone (0.3 ms) let every shape's time collapse
# to the 0.5-1.3 ms the host takes to issue one autograd step, whatever its size.
HOST_LEAD_CYCLES = 6_000_000


@dataclass(frozen=True)
class Floors:
    """Unavoidable DRAM bytes and matmul FLOPs of one adapter call."""

    forward_bytes: int
    backward_bytes: int
    forward_flops: int
    backward_flops: int

    @property
    def total_bytes(self) -> int:
        return self.forward_bytes + self.backward_bytes

    @property
    def total_flops(self) -> int:
        return self.forward_flops + self.backward_flops


def floors(tokens: int, hidden: int, rank: int, element_size: int) -> Floors:
    """Byte and FLOP floors of forward and backward for ``tokens`` x ``hidden`` activations and rank ``rank``."""
    activation = tokens * hidden
    expert = 2 * rank * hidden + rank + hidden  # one down and one up projection with biases
    return Floors(
        forward_bytes=element_size * (2 * activation + expert),
        # dy, h read and dh written; weights read (no biases needed) and all four gradients written.
        backward_bytes=element_size * (3 * activation + 2 * rank * hidden + expert),
        forward_flops=4 * tokens * hidden * rank,
        backward_flops=8 * tokens * hidden * rank,
    )


def floors_table(tokens: Sequence[int], hidden_sizes: Sequence[int], ranks: Sequence[int], dtype: str) -> str:
    """The floors of every shape as a markdown table."""
    element_size = DTYPES[dtype].itemsize
    lines = [
        f"| tokens | d | r | fwd bytes (MB) | bwd bytes (MB) | fwd+bwd GFLOP | FLOP/byte ({dtype}) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in tokens:
        for d in hidden_sizes:
            for r in ranks:
                f = floors(n, d, r, element_size)
                lines.append(
                    f"| {n} | {d} | {r} | {f.forward_bytes / 1e6:.1f} | {f.backward_bytes / 1e6:.1f} "
                    f"| {f.total_flops / 1e9:.2f} | {f.total_flops / f.total_bytes:.1f} |"
                )
    return "\n".join(lines)


def _median_ms(step: Callable[[], object], warmup: int, iters: int, flush: torch.Tensor) -> float:
    """Median GPU milliseconds of ``step`` over ``iters`` runs, each timed alone with a cold L2.

    An iteration in which the GPU reached the timed region before the host had queued all of it is
    thrown away and the lead spin doubled, so every kept time is the GPU's alone.
    """
    for _ in range(warmup):
        step()
    times: list[float] = []
    lead_cycles = HOST_LEAD_CYCLES
    while len(times) < iters:
        flush.zero_()
        torch.cuda._sleep(lead_cycles)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        caught_up = start.query()
        end.synchronize()
        if caught_up:
            lead_cycles *= 2
        else:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(num_bytes: int, warmup: int, iters: int, flush: torch.Tensor) -> float:
    """Device-to-device copy bandwidth in bytes/s (a read plus a write of ``num_bytes``)."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), warmup, iters, flush)
    return 2 * num_bytes / (ms * 1e-3)


def _adapter_inputs(tokens: int, hidden: int, rank: int, dtype: torch.dtype) -> list[torch.Tensor]:
    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device="cuda") * scale).to(dtype).requires_grad_()

    return [
        randn(tokens, hidden),
        randn(NUM_EXPERTS, rank, hidden, scale=hidden**-0.5),
        randn(NUM_EXPERTS, rank, scale=0.1),
        randn(NUM_EXPERTS, hidden, rank, scale=rank**-0.5),
        randn(NUM_EXPERTS, hidden, scale=0.1),
    ]


@dataclass(frozen=True)
class Timing:
    """How each shape is timed: iterations, the L2 flush buffer, and the device-copy bandwidth (bytes/s) of this run."""

    warmup: int
    iters: int
    flush: torch.Tensor
    ceiling: float


@contextlib.contextmanager
def forced_kernel(kernel: str) -> Iterator[None]:
    """``ADAMIX_KERNEL=kernel`` inside the block, the previous value after it."""
    previous = os.environ.get(KERNEL_ENV_VAR)
    os.environ[KERNEL_ENV_VAR] = kernel
    try:
        yield
    finally:
        if previous is None:
            del os.environ[KERNEL_ENV_VAR]
        else:
            os.environ[KERNEL_ENV_VAR] = previous


def _forward_backward(inputs: list[torch.Tensor], grad_out: torch.Tensor, routes: list[tuple[int, int]], activation: str) -> None:
    out = adapter_forward(*inputs, routes, activation)
    # autograd.grad rather than backward: accumulating into .grad would add kernels to the timing.
    torch.autograd.grad(out, inputs, grad_out)


def _measure(
    tokens: int,
    hidden: int,
    rank: int,
    routes: Sequence[tuple[int, int]],
    dtype: torch.dtype,
    activation: str,
    timing: Timing,
) -> dict[str, float]:
    """One result row: fused and eager forward+backward times of one shape, their forward gap and bandwidths."""
    inputs = _adapter_inputs(tokens, hidden, rank, dtype)
    grad_out = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    row: dict[str, float] = {"tokens": tokens, "d": hidden, "r": rank, "passes": len(routes)}
    outputs = {}
    for name, kernel in (("fused", "triton"), ("eager", "eager")):
        with forced_kernel(kernel):
            step = functools.partial(_forward_backward, inputs, grad_out, list(routes), activation)
            row[f"{name}_ms"] = _median_ms(step, timing.warmup, timing.iters, timing.flush)
            with torch.no_grad():
                outputs[name] = adapter_forward(*inputs, list(routes), activation).float()
    row["rel_err"] = ((outputs["fused"] - outputs["eager"]).norm() / outputs["eager"].norm()).item()
    floor_bytes = floors(tokens, hidden, rank, dtype.itemsize).total_bytes
    for name in ("fused", "eager"):
        row[f"{name}_gbs"] = floor_bytes / (row[f"{name}_ms"] * 1e-3) / 1e9
        row[f"{name}_of_copy"] = row[f"{name}_gbs"] * 1e9 / timing.ceiling
    row["speedup"] = row["eager_ms"] / row["fused_ms"]
    row["copy_gbs"] = timing.ceiling / 1e9
    return row


def run_benchmark(
    tokens: Sequence[int] = TOKENS,
    hidden_sizes: Sequence[int] = HIDDEN_SIZES,
    ranks: Sequence[int] = RANKS,
    dtype: str = "bfloat16",
    activation: str = "gelu",
    warmup: int = 10,
    iters: int = 50,
) -> list[dict[str, float]]:
    """Time fused vs eager forward+backward over the routed shape grid, then the stacked case at each token count."""
    torch_dtype = DTYPES[dtype]
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    largest = max(tokens) * max(hidden_sizes) * torch_dtype.itemsize
    timing = Timing(warmup, iters, flush, copy_bandwidth(largest, warmup, iters, flush))
    shapes = [(n, d, r, ROUTED) for n in tokens for d in hidden_sizes for r in ranks]
    shapes += [(n, STACKED_HIDDEN, STACKED_RANK, STACKED) for n in tokens]
    return [_measure(n, d, r, routes, torch_dtype, activation, timing) for n, d, r, routes in shapes]


def derive_rule(
    rows: Sequence[dict[str, float]], device_name: str, dtype: torch.dtype, min_speedup: float = MIN_SPEEDUP
) -> FusedFasterRule | None:
    """The dispatcher rule these rows support: a ``FusedFasterRule`` from the smallest measured token count from
    which every measured shape (routed and stacked) was at least ``min_speedup`` times faster fused, over the
    measured hidden sizes and ranks; ``None`` when there is no such token count (the default stays eager)."""
    for threshold in sorted({row["tokens"] for row in rows}):
        covered = [row for row in rows if row["tokens"] >= threshold]
        if all(row["speedup"] >= min_speedup for row in covered):
            hidden_sizes = [row["d"] for row in covered]
            return FusedFasterRule(
                device_name, dtype, int(threshold), (min(hidden_sizes), max(hidden_sizes)), max(row["r"] for row in covered)
            )
    return None


def rule_text(rule: FusedFasterRule | None, min_speedup: float = MIN_SPEEDUP) -> str:
    """One line for the report: the rule to record, or why there is none."""
    if rule is None:
        return f"Dispatcher rule: none: no token count from which every measured shape was >= {min_speedup}x faster fused; eager stays the default."
    return f"Dispatcher rule (fused >= {min_speedup}x eager in every measured shape from {rule.min_tokens} tokens on): {rule!r}"


def results_table(rows: Sequence[dict[str, float]]) -> str:
    """Benchmark rows as a markdown table."""
    lines = [
        f"Device-copy ceiling: {rows[0]['copy_gbs']:.0f} GB/s.",
        "",
        "| tokens | d | r | passes | fused ms | eager ms | speedup | fused GB/s (% copy) | eager GB/s (% copy) | fwd rel err |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['tokens']} | {row['d']} | {row['r']} | {row['passes']} | {row['fused_ms']:.3f} | {row['eager_ms']:.3f} "
            f"| {row['speedup']:.2f}x | {row['fused_gbs']:.0f} ({row['fused_of_copy']:.0%}) "
            f"| {row['eager_gbs']:.0f} ({row['eager_of_copy']:.0%}) | {row['rel_err']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", help=f"token counts (default {TOKENS})")
    parser.add_argument("--hidden", type=int, nargs="+", help=f"hidden sizes d (default {HIDDEN_SIZES})")
    parser.add_argument("--ranks", type=int, nargs="+", help=f"bottleneck ranks r (default {RANKS})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--activation", choices=("gelu", "gelu_tanh", "relu"), default="gelu")
    parser.add_argument("--warmup", type=int, help="untimed iterations per measurement (default 10, --fast 3)")
    parser.add_argument("--iters", type=int, help="timed iterations per measurement (default 50, --fast 10)")
    parser.add_argument("--fast", action="store_true", help=f"tokens {FAST_TOKENS}, d {FAST_HIDDEN_SIZES}, r {FAST_RANKS}")
    parser.add_argument("--floors", action="store_true", help="print the byte/FLOP floors table and exit (no GPU needed)")
    args = parser.parse_args(argv)

    tokens = args.tokens or (FAST_TOKENS if args.fast else TOKENS)
    hidden_sizes = args.hidden or (FAST_HIDDEN_SIZES if args.fast else HIDDEN_SIZES)
    ranks = args.ranks or (FAST_RANKS if args.fast else RANKS)
    if args.floors:
        print(floors_table(tokens, hidden_sizes, ranks, args.dtype))
        return 0
    if not torch.cuda.is_available():
        print("kernel_bench: no CUDA device available, nothing timed (--floors prints the byte/FLOP floors)")
        return 0
    rows = run_benchmark(
        tokens,
        hidden_sizes,
        ranks,
        dtype=args.dtype,
        activation=args.activation,
        warmup=args.warmup if args.warmup is not None else (3 if args.fast else 10),
        iters=args.iters if args.iters is not None else (10 if args.fast else 50),
    )
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, activation {args.activation}")
    print(results_table(rows))
    print()
    print(rule_text(derive_rule(rows, torch.cuda.get_device_name(), DTYPES[args.dtype])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
