"""FLOPs per token of AdaMix vs one adapter of the same size, counted three independent ways.

    python benchmarks/flops.py              # bert-base, roberta-large, deberta-v2-xxlarge, gpt2-medium; M = 1, 2, 4, 8
    python benchmarks/flops.py --fast       # bert-base, M = 1 and 4 (what the unit test runs)

For every backbone, adapter type (bottleneck, LoRA) and number of experts M, and for a plain single
adapter of the same r (``common.SingleAdapter`` / ``common.SingleLoRA``, no AdaMix code):

* routed training pass: forward + backward of one ``model.train()`` pass with the task loss;
* full training step with the consistency loss: ``adamix_loss(model, batch, 1.0)`` + backward (both
  routed passes as one pass over the batch stacked twice);
* merged inference: one ``model.eval()`` forward, ``eval_mode="merged"``.

Counters, sharing no code:

1. ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no memory, exact shapes). It counts
   what the library dispatches to: the eager matmuls here, the fused op's registered formula
   (``adamix::adapter_fwd``/``adapter_bwd``) where that op runs (CUDA). The formula itself is checked
   against the eager matmuls op by op (``kernel`` table).
2. DeepSpeed's flops profiler on the eager path. It patches ``torch.nn.functional`` and ``torch.matmul``
   and so sees forward calls only: we compare its forward counts, and show what its engine would report
   for a training step (backward = 2x forward, a full fine-tuning assumption). It runs on real bf16
   CPU tensors (zeroed, never initialised) because on meta tensors PyTorch's meta kernel for ``addmm`` is a
   Python decomposition that calls the profiler's patched ``torch.mm``, which counts every biased linear twice.
3. The closed form ``adamix_ds.flops.estimate_flops`` (frozen weights: forward + input gradient only;
   adapter weights: forward + both gradients; nothing upstream of the first adapter gets a gradient).

The script exits with status 1 if AdaMix / single adapter is off 1.000 by more than ``tolerance`` for
the routed pass or merged inference, or if two counters disagree by more than ``tolerance``.
Attention is the eager (math) implementation: fused attention kernels recompute the scores in
backward, which changes the hardware's work but not the model's FLOPs.
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker
import torch
import torch.fx.experimental._config as fx_config
from deepspeed.profiling.flops_profiler import FlopsProfiler
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from adamix_ds import AdaMixConfig, adamix_loss, add_adamix
from adamix_ds.flops import estimate_flops
from adamix_ds.kernels.eager import adapter_forward_eager

from common import (
    BACKBONES,
    BENCH_DIR,
    RESULTS_DIR,
    backbone_config,
    build_backbone,
    cli,
    environment,
    markdown_table,
    single_adapter_model,
    structural_copy,
    token_inputs,
    training_labels,
    write_results,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

# The paper's ranks (bottleneck: BERT-base 48, RoBERTa-large 16, GPT-2 adapter 8; LoRA: GPT-2 4, LoRA
# paper 8 on encoders); DeBERTa-v2-XXLarge has no AdaMix result, so it gets RoBERTa-large's.
RANKS: dict[str, dict[str, int]] = {
    "bert-base": {"bottleneck": 48, "lora": 8},
    "roberta-large": {"bottleneck": 16, "lora": 8},
    "deberta-v2-xxlarge": {"bottleneck": 16, "lora": 8},
    "gpt2-medium": {"bottleneck": 8, "lora": 4},
}
SINGLE = "single"
# (FlopCounterMode quantity, closed-form quantity) compared for every model; the single adapter has no consistency step.
CLOSED_FORM_PAIRS = (
    ("routed_step", "closed_routed_step"),
    ("consistency_step", "closed_consistency_step"),
    ("merged_forward", "closed_forward"),
)


def with_adapters(backbone: nn.Module, config: AdaMixConfig, adamix: bool) -> nn.Module:
    """A copy of ``backbone`` (sharing its weights) with AdaMix, or with the plain single adapter of ``config``'s size."""
    model = structural_copy(backbone)
    return add_adamix(model, config) if adamix else single_adapter_model(model, config)


def _flop_counter(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def count_flop_counter_mode(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, adamix: bool) -> dict[str, float]:
    """Total FLOPs of the three quantities with ``FlopCounterMode`` (meta tensors)."""
    batch = {**inputs, "labels": labels}
    counts: dict[str, float] = {}
    # A causal LM's consistency loss keeps the target rows with a boolean mask; on meta tensors that
    # needs the (correct here: every token is a target) assumption that the mask is all true.
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        model.train()
        counts["routed_step"] = _flop_counter(lambda: model(**batch).loss.backward())
        if adamix:
            counts["consistency_step"] = _flop_counter(lambda: adamix_loss(model, batch, 1.0).loss.backward())
        model.eval()
        with torch.no_grad():
            counts["merged_forward"] = _flop_counter(lambda: model(**inputs))
    return counts


def count_deepspeed(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """DeepSpeed profiler counts of the routed training forward and the merged inference forward.

    ``2 * MACs`` counts the matrix products only (the quantity the other counters count); ``flops`` adds
    the elementwise ops DeepSpeed also patches (GELU, LayerNorm, softmax, the bias of ``addmm``).
    """
    counts: dict[str, float] = {}
    for mode, key in ((True, "routed_forward"), (False, "merged_forward")):
        model.train(mode)
        profiler = FlopsProfiler(model)
        profiler.start_profile()
        with torch.no_grad():
            model(**inputs)
        counts[f"ds_{key}"] = 2 * profiler.get_total_macs()
        counts[f"ds_{key}_all_ops"] = profiler.get_total_flops()
        profiler.end_profile()
    return counts


def kernel_formula_check(hidden: int, rank: int, tokens: int) -> dict[str, Any] | None:
    """FlopCounterMode on the fused op (its registered formula) vs on the eager adapter, same shapes.

    ``None`` when the fused op cannot be imported (no Triton).
    """
    try:
        from adamix_ds.kernels import ops  # noqa: F401  (registers adamix::adapter_fwd / adapter_bwd)
    except ImportError:
        return None

    def run(fused: bool, input_grad: bool) -> int:
        meta = {"device": "meta"}
        args = (
            torch.empty(1, tokens, hidden, requires_grad=input_grad, **meta),
            torch.empty(4, rank, hidden, requires_grad=True, **meta),
            torch.empty(4, rank, requires_grad=True, **meta),
            torch.empty(1, hidden, rank, requires_grad=True, **meta),
            torch.empty(1, hidden, requires_grad=True, **meta),
        )

        def step() -> None:
            if fused:  # experts 1 (down) and 0 (up), as the op takes them: a [passes, 2] tensor
                out = torch.ops.adamix.adapter_fwd(*args, torch.empty(1, 2, dtype=torch.int64, **meta), "gelu")[0]
            else:
                out = adapter_forward_eager(*args, 1, 0, "gelu")
            out.sum().backward()

        return _flop_counter(step)

    result = {"hidden": hidden, "rank": rank, "tokens": tokens}
    for input_grad in (True, False):
        result[f"eager_input_grad_{input_grad}"] = run(False, input_grad)
        result[f"fused_input_grad_{input_grad}"] = run(True, input_grad)
    return result


def _relative_gap(a: float, b: float) -> float:
    return abs(a / b - 1.0)


def run_flops(
    backbones: list[str] | None = None,
    experts: list[int] | None = None,
    adapter_types: list[str] | None = None,
    batch_size: int = 1,
    seq_len: int = 128,
    tolerance: float = 1e-3,
    deepspeed: bool = True,
    fast: bool = False,
    out_dir: Path = RESULTS_DIR,
    plot_dir: Path = BENCH_DIR,
) -> dict[str, Any]:
    """Count FLOPs per token of AdaMix and a single adapter; check ratios and counter agreement.

    Args:
        backbones: backbones to count (default: all of bert-base, roberta-large, deberta-v2-xxlarge, gpt2-medium).
        experts: numbers of experts M (default 1 2 4 8).
        adapter_types: bottleneck and/or lora (default both).
        batch_size: sequences per batch.
        seq_len: tokens per sequence.
        tolerance: largest relative deviation allowed for AdaMix / single and between counters.
        deepspeed: also count with DeepSpeed's flops profiler (real bf16 tensors, about 3 GB for DeBERTa).
        fast: bert-base with M = 1 and 4 only (the unit test).
        out_dir: where flops.json and flops.md go.
        plot_dir: where flops_vs_experts.png goes.
    """
    backbones = backbones or (["bert-base"] if fast else list(BACKBONES))
    experts = experts or ([1, 4] if fast else [1, 2, 4, 8])
    adapter_types = adapter_types or ["bottleneck", "lora"]
    tokens = batch_size * seq_len
    rows: list[dict[str, Any]] = []
    kernel: list[dict[str, Any]] = []
    for backbone in backbones:
        config = backbone_config(backbone)
        meta_base = build_backbone(backbone, "meta")
        real_base = build_backbone(backbone, "cpu", torch.bfloat16) if deepspeed else None
        meta_inputs = token_inputs(batch_size, seq_len, "meta")
        real_inputs = token_inputs(batch_size, seq_len, "cpu")
        for adapter_type in adapter_types:
            rank = RANKS[backbone][adapter_type]
            for model_name in [SINGLE, *experts]:
                adamix = model_name != SINGLE
                adamix_config = AdaMixConfig(adapter_type=adapter_type, bottleneck_dim=rank, num_experts=model_name if adamix else 1)
                labels = training_labels(config, meta_inputs)
                counts = count_flop_counter_mode(with_adapters(meta_base, adamix_config, adamix), meta_inputs, labels, adamix)
                if real_base is not None:
                    counts.update(count_deepspeed(with_adapters(real_base, adamix_config, adamix), real_inputs))
                closed = estimate_flops(config, adamix_config, batch_size, seq_len)
                row = {"backbone": backbone, "adapter_type": adapter_type, "rank": rank, "model": str(model_name)}
                row.update({key: value / tokens for key, value in counts.items()})
                row.update(
                    closed_forward=closed.forward, closed_routed_step=closed.routed_step, closed_consistency_step=closed.consistency_step
                )
                rows.append(row)
                print(
                    f"{backbone} {adapter_type} r={rank} {model_name}: {row['routed_step'] / 1e9:.4f} GFLOP/token routed step", flush=True
                )
            if adapter_type == "bottleneck":
                check = kernel_formula_check(config.hidden_size, rank, tokens)
                if check is not None:
                    kernel.append({"backbone": backbone, **check})
        del meta_base, real_base
        gc.collect()
    failures = _check(rows, kernel, tolerance)
    results = {
        "environment": environment(),
        "settings": {"batch_size": batch_size, "seq_len": seq_len, "tolerance": tolerance, "ranks": RANKS, "deepspeed": deepspeed},
        "rows": rows,
        "kernel": kernel,
        "failures": failures,
    }
    plot_path = Path(plot_dir) / "flops_vs_experts.png"
    _plot(rows, plot_path)
    write_results("flops", results, _markdown(rows, kernel, failures, batch_size, seq_len, tolerance, plot_path), Path(out_dir))
    return results


def _check(rows: list[dict[str, Any]], kernel: list[dict[str, Any]], tolerance: float) -> list[str]:
    """Every violated claim, as a sentence."""
    failures = []
    singles = {(r["backbone"], r["adapter_type"]): r for r in rows if r["model"] == SINGLE}
    for row in rows:
        label = f"{row['backbone']} {row['adapter_type']} {'single' if row['model'] == SINGLE else 'M=' + row['model']}"
        single = singles[(row["backbone"], row["adapter_type"])]
        pairs = [
            ("AdaMix/single routed step (FlopCounterMode)", row["routed_step"], single["routed_step"]),
            ("AdaMix/single merged inference (FlopCounterMode)", row["merged_forward"], single["merged_forward"]),
        ]
        pairs += [
            (f"FlopCounterMode/closed form {measured}", row[measured], row[closed])
            for measured, closed in CLOSED_FORM_PAIRS
            if measured in row
        ]
        if "ds_routed_forward" in row:
            pairs += [
                ("AdaMix/single routed forward (DeepSpeed)", row["ds_routed_forward"], single["ds_routed_forward"]),
                ("AdaMix/single merged inference (DeepSpeed)", row["ds_merged_forward"], single["ds_merged_forward"]),
                ("DeepSpeed/closed form routed forward", row["ds_routed_forward"], row["closed_forward"]),
                ("DeepSpeed/closed form merged forward", row["ds_merged_forward"], row["closed_forward"]),
            ]
        for what, value, reference in pairs:
            if _relative_gap(value, reference) > tolerance:
                failures.append(f"{label}: {what} = {value / reference:.5f}, allowed 1 +- {tolerance}")
    for check in kernel:
        if check["fused_input_grad_True"] != check["eager_input_grad_True"]:
            failures.append(
                f"{check['backbone']}: fused op formula {check['fused_input_grad_True']} != eager {check['eager_input_grad_True']} FLOPs"
            )
    return failures


def _fmt(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}f}"


def _markdown(
    rows: list[dict[str, Any]],
    kernel: list[dict[str, Any]],
    failures: list[str],
    batch_size: int,
    seq_len: int,
    tolerance: float,
    plot: Path,
) -> str:
    singles = {(r["backbone"], r["adapter_type"]): r for r in rows if r["model"] == SINGLE}
    ratio_rows, agreement_rows = [], []
    for row in rows:
        single = singles[(row["backbone"], row["adapter_type"])]
        is_single = row["model"] == SINGLE
        ratio_rows.append(
            [
                row["backbone"],
                row["adapter_type"],
                row["rank"],
                "single" if is_single else row["model"],
                _fmt(row["routed_step"] / 1e9),
                _fmt(row["routed_step"] / single["routed_step"], 5),
                "—" if is_single else _fmt(row["consistency_step"] / row["routed_step"], 5),
                _fmt(row["merged_forward"] / 1e9),
                _fmt(row["merged_forward"] / single["merged_forward"], 5),
            ]
        )
    groups = sorted({(r["backbone"], r["adapter_type"]) for r in rows}, key=lambda g: (list(BACKBONES).index(g[0]), g[1]))
    has_ds = "ds_routed_forward" in rows[0]
    for backbone, adapter_type in groups:
        group = [r for r in rows if (r["backbone"], r["adapter_type"]) == (backbone, adapter_type)]
        closed_gap = max(_relative_gap(r[measured], r[closed]) for r in group for measured, closed in CLOSED_FORM_PAIRS if measured in r)
        cells = [
            backbone,
            adapter_type,
            _fmt(group[0]["closed_forward"] / 1e9),
            _fmt(group[0]["closed_routed_step"] / 1e9),
            f"{closed_gap:.1e}",
        ]
        if has_ds:
            ds_gap = max(
                max(_relative_gap(r["ds_routed_forward"], r["closed_forward"]), _relative_gap(r["ds_merged_forward"], r["closed_forward"]))
                for r in group
            )
            elementwise = statistics.mean(r["ds_merged_forward_all_ops"] / r["ds_merged_forward"] - 1 for r in group)
            convention = statistics.mean(3 * r["ds_routed_forward"] / r["routed_step"] for r in group)
            cells += [f"{ds_gap:.1e}", f"+{100 * elementwise:.2f}%", f"{convention:.3f}x"]
        agreement_rows.append(cells)
    agreement_headers = ["backbone", "adapter", "closed form fwd (GFLOP/tok)", "closed form fwd+bwd", "max gap FlopCounterMode"]
    if has_ds:
        agreement_headers += ["max gap DeepSpeed (2·MACs)", "DeepSpeed elementwise extra", "DeepSpeed 3×fwd / true step"]
    lines = [
        "## FLOPs: AdaMix vs a single adapter",
        "",
        f"Generated by `python benchmarks/flops.py`. Per token, batch {batch_size} x {seq_len} tokens, eager attention, "
        "published configs built locally (meta device). `single` is a plain adapter / LoRA of the same r written "
        "without AdaMix code, in the same slots. Consistency step = `adamix_loss(model, batch, 1.0)` + backward; "
        'merged = `model.eval()` with `eval_mode="merged"`. Counts from `FlopCounterMode`; '
        f"the script fails if a ratio or a counter differs by more than {tolerance:.1%}.",
        "",
        markdown_table(
            [
                "backbone",
                "adapter",
                "r",
                "M",
                "routed fwd+bwd (GFLOP/tok)",
                "÷ single",
                "consistency step ÷ routed",
                "merged fwd (GFLOP/tok)",
                "÷ single",
            ],
            ratio_rows,
        ),
        "",
        "### Counter agreement",
        "",
        "Largest relative gap, over all models of the row (single and every M), between `FlopCounterMode` (routed "
        "fwd+bwd, consistency step, merged forward) or DeepSpeed's profiler (routed training forward and merged forward, "
        "2 x its MAC count) and the closed form `adamix_ds.flops.estimate_flops`.",
        "",
        markdown_table(agreement_headers, agreement_rows),
        "",
        "Systematic differences, none of them a disagreement about the matrix products:",
        "",
        "- DeepSpeed's `flops` also counts the elementwise ops it patches (GELU, LayerNorm, softmax, the bias add of "
        "`addmm`); `FlopCounterMode` and the closed form count matrix products only. The column shows that extra.",
        "- DeepSpeed's profiler hooks Python functions, so it sees the forward only; its engine reports a training step as "
        "3x the forward (backward = 2x, true for full fine-tuning). With a frozen backbone the backward skips every frozen "
        "weight's gradient and everything before the first adapter, so that convention overstates a PEFT step by the "
        "factor shown.",
        "- The consistency step is one forward + backward over the batch stacked twice (`adamix_loss`): twice every "
        "per-token product, so exactly 2 routed passes wherever all products scale with the batch. DeBERTa-v2 projects its "
        "2 x 256 relative-position embeddings once per forward and layer, whatever the batch, so its step is below 2x "
        "(at 1 x 128 tokens those projections are a large share of a pass). The symmetric KL between the passes is "
        "elementwise (`O(classes)` per row, `O(vocab)` per target token for GPT-2), below 0.1% of a pass, not counted.",
        "- Merging costs one average per projection when the weights change (cached), not per token: not counted.",
        "- DeepSpeed runs on real (zeroed) bf16 CPU tensors, not meta: there PyTorch's meta kernel for `addmm` is a Python "
        "decomposition calling `torch.mm`, which the profiler has patched, so each biased linear would count twice.",
        "",
    ]
    if kernel:
        lines += [
            "### Fused-kernel FLOP formula",
            "",
            "`FlopCounterMode` on `adamix::adapter_fwd` + `adamix::adapter_bwd` (their registered formula: 4·N·d·r forward, "
            "8·N·d·r backward) vs on the eager adapter, one adapter call with the backbone's d and r. Equal when the adapter's "
            "input carries a gradient (every layer but the first). Without one (layer 0), eager skips the input gradient "
            "(6·N·d·r backward) while the fused backward always computes it: +2·N·d·r in one layer, shown against the whole "
            "routed step of the single adapter.",
            "",
            markdown_table(
                [
                    "backbone",
                    "d",
                    "r",
                    "tokens",
                    "eager fwd+bwd",
                    "fused formula",
                    "eager, input frozen",
                    "fused, input frozen",
                    "extra ÷ step",
                ],
                [
                    [
                        k["backbone"],
                        k["hidden"],
                        k["rank"],
                        k["tokens"],
                        k["eager_input_grad_True"],
                        k["fused_input_grad_True"],
                        k["eager_input_grad_False"],
                        k["fused_input_grad_False"],
                        f"{(k['fused_input_grad_False'] - k['eager_input_grad_False']) / (singles[(k['backbone'], 'bottleneck')]['routed_step'] * batch_size * seq_len):.4%}",
                    ]
                    for k in kernel
                ],
            ),
            "",
        ]
    lines += [f"![FLOPs per token vs number of experts]({plot.name})", ""]
    lines.append("**All checks passed.**" if not failures else "**FAILED:**\n\n" + "\n".join(f"- {f}" for f in failures))
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    """FLOPs per token vs M per backbone: AdaMix routed step, consistency step and merged forward; single adapter dashed."""
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    figure, axes = plt.subplots(1, len(backbones), figsize=(max(4.5 * len(backbones), 9), 4.6), squeeze=False)
    colors = {"bottleneck": "tab:blue", "lora": "tab:orange"}
    for axis, backbone in zip(axes[0], backbones, strict=True):
        for adapter_type, color in colors.items():
            group = [r for r in rows if r["backbone"] == backbone and r["adapter_type"] == adapter_type]
            if not group:
                continue
            single = next(r for r in group if r["model"] == SINGLE)
            mixed = [r for r in group if r["model"] != SINGLE]
            m = [int(r["model"]) for r in mixed]
            axis.plot(
                m, [r["consistency_step"] / 1e9 for r in mixed], "s:", color=color, label=f"{adapter_type}: AdaMix step + consistency"
            )
            axis.plot(m, [r["routed_step"] / 1e9 for r in mixed], "o-", color=color, label=f"{adapter_type}: AdaMix routed fwd+bwd")
            axis.plot(m, [r["merged_forward"] / 1e9 for r in mixed], "^-.", color=color, label=f"{adapter_type}: AdaMix merged fwd")
            for key in ("routed_step", "merged_forward"):
                axis.axhline(single[key] / 1e9, color=color, linestyle="--", linewidth=0.8)
        axis.set_title(backbone)
        axis.set_xlabel("experts M")
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted({int(r["model"]) for r in rows if r["model"] != SINGLE}))
        axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_ylabel("GFLOP / token")
        axis.set_ylim(bottom=0)
    handles, labels = axes[0][0].get_legend_handles_labels()
    columns = 3 if len(backbones) > 1 else 2
    figure.legend(
        handles, labels, loc="lower center", ncol=columns, fontsize=8, title="dashed: the single adapter / LoRA", title_fontsize=8
    )
    figure.tight_layout(rect=(0, 0.1 + 0.05 * math.ceil(len(handles) / columns), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(cli(run_flops))
