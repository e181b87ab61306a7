"""Summaries of a sweep: mean ± sample std over seeds per cell, per-run rows, and plots.

``summarize(sweep)`` reads every run's ``metrics.json`` (and ``eval_modes.json`` where the run evaluated
every routing mode) and writes ``summary.md``, ``summary.csv``, ``summary.json`` and PNG plots under the
sweep's ``output_root``. A run without a complete ``metrics.json`` is listed as missing, never dropped.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adamix_ds.data import get_task_spec
from adamix_ds.sweep import Sweep, SweepRun, read_metrics, restore_records, save_records
from adamix_ds.training.eval_modes import EVAL_MODES_FILE

# metrics.json's final losses (the last log line's task loss; the held-out rows' task loss), shown unscaled.
LOSS_COLUMNS = ("train_task_loss", "holdout_loss")
# Grid axes that measure how much training a run got: "metric vs budget" plots use them.
BUDGET_AXES = ("num_train_epochs", "max_steps", "max_train_samples")


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (n - 1; ``nan`` for n = 1) of ``n`` values."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        values = [float(v) for v in values]
        if not values:
            raise ValueError("no values")
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        return cls(statistics.fmean(values), std, len(values))

    def format(self, scale: float = 1.0, digits: int = 2) -> str:
        """``mean ± std (n)``; values scaled by ``scale`` (100 for percentages)."""
        if math.isnan(self.std):
            return f"{self.mean * scale:.{digits}f} (n=1)"
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f} (n={self.n})"


@dataclass
class Cell:
    """The runs that differ only in seed."""

    key: dict[str, str]
    runs: list[SweepRun] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        extra = [f"{k}={v}" for k, v in self.key.items() if k not in ("task", "group")]
        return " ".join([self.key["group"], *extra])


def run_values(run: SweepRun) -> dict[str, float] | None:
    """The numbers a summary takes from one complete run, or ``None`` if it has not finished.

    ``final`` metrics keep their launcher names (``eval_accuracy``, ``test_accuracy``); the best evaluation
    during training (the paper reports the best epoch on dev) is ``best_<metric>``; ``train_runtime`` in s; the
    final losses of ``LOSS_COLUMNS`` where the run recorded them.
    """
    metrics = read_metrics(run.metrics_file)
    if metrics is None:
        return None
    values = {k: float(v) for k, v in metrics["final"].items() if k.startswith(("eval_", "test_")) and isinstance(v, (int, float))}
    values.update({f"best_{k}": float(v) for k, v in metrics.get("best", {}).items() if k.startswith("eval_")})
    values["train_runtime"] = float(metrics["train_runtime"])
    values.update({k: float(metrics[k]) for k in LOSS_COLUMNS if metrics.get(k) is not None})
    return values


def read_eval_modes(run: SweepRun) -> dict[str, Any] | None:
    """The run's all-modes evaluation (``eval_modes.json``), if it wrote one."""
    try:
        return json.loads((run.output_dir / EVAL_MODES_FILE).read_text())
    except (OSError, ValueError):
        return None


def collect(sweep: Sweep) -> list[Cell]:
    """Group the sweep's runs into cells, in sweep order, with the values of their complete runs."""
    cells: dict[tuple, Cell] = {}
    for run in sweep.runs:
        cell = cells.setdefault(tuple(run.cell.items()), Cell(dict(run.cell)))
        cell.runs.append(run)
        values = run_values(run)
        if values is None:
            cell.missing.append(run.name)
            continue
        for key, value in values.items():
            cell.metrics.setdefault(key, []).append(value)
    return list(cells.values())


def _scale(task: str) -> float:
    """What a task's metrics are multiplied by in tables and plots (100: fractions shown as percentages)."""
    return get_task_spec(task).report_scale


def _main_metric(task: str) -> str:
    return get_task_spec(task).metric_names[0]


def _plotted_metric(cells: list[Cell], task: str) -> str:
    """The task's main dev metric, or its test metric for runs without a dev set (few-shot splits)."""
    dev = f"eval_{_main_metric(task)}"
    return dev if any(dev in c.metrics for c in cells if c.key["task"] == task) else f"test_{_main_metric(task)}"


def _metric_columns(cells: list[Cell], task: str) -> list[str]:
    """The task's metrics in the order of its spec: final dev (eval_), best dev, then test_ where present."""
    present = {k for cell in cells for k in cell.metrics}
    names = get_task_spec(task).metric_names
    columns = [f"eval_{m}" for m in names] + [f"best_eval_{_main_metric(task)}"] + [f"test_{m}" for m in names] + list(LOSS_COLUMNS)
    return [c for c in columns if c in present]


def markdown(sweep: Sweep, cells: list[Cell]) -> str:
    """One table per task: a row per cell, ``mean ± std (n)`` per metric (classification ×100), mean run time."""
    lines = [f"# Sweep `{sweep.path.name}`", ""]
    lines += [
        f"{len(sweep.runs)} runs, {sum(len(c.runs) - len(c.missing) for c in cells)} complete. Classification metrics ×100, generation metrics as the E2E "
        "papers report them (BLEU, METEOR, ROUGE-L ×100; NIST, CIDEr raw); mean ± sample std "
        "(n − 1) over seeds, n = complete seeds; `eval_*` = dev metric at the end of training, `best_eval_*` = best dev evaluation "
        "during training (the paper's protocol), `test_*` = the held-out test file where the task has one.",
        "",
    ]
    for task in dict.fromkeys(c.key["task"] for c in cells):
        task_cells = [c for c in cells if c.key["task"] == task]
        columns = _metric_columns(task_cells, task)
        lines += [f"## {task}", "", "| " + " | ".join(["cell", *columns, "time / run"]) + " |", "|" + "---|" * (len(columns) + 2)]
        for cell in task_cells:
            row = [cell.label]
            for column in columns:
                scale, digits = (1.0, 4) if column in LOSS_COLUMNS else (_scale(task), 2)
                row.append(Stat.of(cell.metrics[column]).format(scale, digits) if column in cell.metrics else "—")
            runtime = cell.metrics.get("train_runtime")
            row.append(f"{statistics.fmean(runtime):.0f} s" if runtime else "—")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += _routing_tables(cells)
    missing = [name for cell in cells for name in cell.missing]
    lines += ["## Missing or failed runs", ""]
    lines += [f"- `{name}`" for name in missing] if missing else ["none"]
    return "\n".join(lines) + "\n"


def run_routings(modes: dict[str, Any], metric: str) -> dict[str, float]:
    """One number per inference routing of one run's ``eval_modes.json``: ``metric`` under each merge, the mean
    over random draws and over single experts, and the best single expert (chosen on the split it is scored on)."""
    out: dict[str, float] = {}
    for mode, result in modes.items():
        if not isinstance(result, list):
            if metric in result:
                out[mode] = float(result[metric])
            continue
        values = [float(entry[metric]) for entry in result if metric in entry]
        if values:
            out[f"{mode} (mean)"] = statistics.fmean(values)
            if mode == "fixed":
                out["fixed (best on this split)"] = max(values)
    return out


def _routing_tables(cells: list[Cell]) -> list[str]:
    """Per task with routing evaluations: a row per cell, ``mean ± std (n)`` over seeds of each routing."""
    lines: list[str] = []
    for task in dict.fromkeys(c.key["task"] for c in cells):
        metric = _plotted_metric([c for c in cells if c.key["task"] == task], task)
        rows = []
        for cell in (c for c in cells if c.key["task"] == task):
            per_run = [run_routings(m, metric) for run in cell.runs if (m := read_eval_modes(run)) is not None]
            if per_run:
                rows.append((cell.label, {k: [r[k] for r in per_run if k in r] for k in dict.fromkeys(k for r in per_run for k in r)}))
        if not rows:
            continue
        columns = list(dict.fromkeys(k for _, values in rows for k in values))
        lines += [f"## {task}: {metric} under each inference routing (eval_modes.json)", ""]
        lines += ["| " + " | ".join(["cell", *columns]) + " |", "|" + "---|" * (len(columns) + 1)]
        for label, values in rows:
            cells_text = [Stat.of(values[c]).format(_scale(task)) if values.get(c) else "—" for c in columns]
            lines.append("| " + " | ".join([label, *cells_text]) + " |")
        lines.append("")
    return lines


def _mode_stats(modes: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Per routing mode of several runs: the main metric of every run (merged, ensemble) or every expert/draw."""
    out: dict[str, list[float]] = {}
    for run_modes in modes:
        for mode, result in run_modes.items():
            entries = result if isinstance(result, list) else [result]
            out.setdefault(mode, []).extend(float(e[metric]) for e in entries if metric in e)
    return out


def summary_json(cells: list[Cell]) -> dict[str, Any]:
    """Cells with their statistics, per-run rows and the missing runs, as plain JSON."""
    result: dict[str, Any] = {"cells": [], "runs": [], "missing": []}
    for cell in cells:
        stats = {k: vars(Stat.of(v)) for k, v in cell.metrics.items()}
        entry = {**cell.key, "label": cell.label, "stats": stats, "complete": len(cell.runs) - len(cell.missing)}
        modes = [m for run in cell.runs if (m := read_eval_modes(run)) is not None]
        if modes:
            entry["eval_modes"] = _mode_stats(modes, _plotted_metric([cell], cell.key["task"]))
        result["cells"].append(entry)
        for run in cell.runs:
            values = run_values(run)
            result["runs"].append({"name": run.name, **run.cell, "seed": run.seed, "complete": values is not None, **(values or {})})
        result["missing"] += cell.missing
    return result


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Per-run rows; the columns are the union of every row's keys, in first-seen order."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot(sweep: Sweep, cells: list[Cell], data: dict[str, Any], output_dir: Path) -> list[Path]:
    """Bars with error bars per task and cell; metric vs budget when a budget axis is swept; and the
    paper's Fig. 5 (random routing and single experts against the merged model) where runs have
    ``eval_modes.json``. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    complete = [c for c in cells if c.metrics]
    # A task with no complete run yet gets no panel: summary.md lists its runs as missing.
    tasks = list(dict.fromkeys(c.key["task"] for c in complete))
    if complete:
        fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.0, 3.2 * len(tasks)), 3.6), squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=True):
            metric = _plotted_metric(complete, task)
            task_cells = [c for c in complete if c.key["task"] == task and metric in c.metrics]
            stats = [Stat.of(c.metrics[metric]) for c in task_cells]
            scale = _scale(task)
            ax.bar(
                range(len(stats)),
                [scale * s.mean for s in stats],
                yerr=[0 if math.isnan(s.std) else scale * s.std for s in stats],
                capsize=3,
            )
            ax.set_xticks(range(len(stats)), [c.label for c in task_cells], rotation=45, ha="right", fontsize=7)
            ax.set_title(f"{task}: {metric}", fontsize=9)
            lows = [scale * (s.mean - (0 if math.isnan(s.std) else s.std)) for s in stats]
            if lows:
                ax.set_ylim(max(0.0, min(lows) - 5), None)
        fig.tight_layout()
        written.append(_save(fig, output_dir / "summary_bars.png"))
        plt.close(fig)

    budget = next((axis for axis in BUDGET_AXES if axis in sweep.axes), None)
    if budget is not None and complete:
        fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.0, 3.2 * len(tasks)), 3.4), squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=True):
            metric = _plotted_metric(complete, task)
            series: dict[str, list[tuple[float, Stat]]] = {}
            for cell in complete:
                if cell.key["task"] == task and metric in cell.metrics:
                    label = " ".join(f"{k}={v}" if k != "group" else v for k, v in cell.key.items() if k not in ("task", budget))
                    series.setdefault(label, []).append((float(cell.key[budget]), Stat.of(cell.metrics[metric])))
            for label, points in series.items():
                points.sort(key=lambda p: p[0])
                ax.errorbar(
                    [x for x, _ in points],
                    [_scale(task) * s.mean for _, s in points],
                    yerr=[0 if math.isnan(s.std) else _scale(task) * s.std for _, s in points],
                    marker="o",
                    capsize=3,
                    label=label,
                )
            ax.set_xlabel(budget)
            ax.set_title(f"{task}: {metric}", fontsize=9)
            ax.legend(fontsize=6)
        fig.tight_layout()
        written.append(_save(fig, output_dir / "summary_budget.png"))
        plt.close(fig)

    with_modes = [c for c in data["cells"] if "eval_modes" in c]
    if with_modes:
        fig, ax = plt.subplots(figsize=(max(4.5, 1.8 * len(with_modes)), 3.8))
        styles = {
            "random": (-0.25, "tab:gray", "o", "random routing (each draw)"),
            "fixed": (0.0, "tab:blue", "o", "one expert (each)"),
            "merged": (0.25, "tab:red", "D", "merged (each seed)"),
        }
        for x, cell in enumerate(with_modes):
            for mode, (offset, color, marker, label) in styles.items():
                values = [_scale(cell["task"]) * v for v in cell["eval_modes"].get(mode, [])]
                if not values:
                    continue
                if mode != "merged" and len(values) > 1:
                    parts = ax.violinplot([values], positions=[x + offset], widths=0.22, showextrema=False)
                    for body in parts["bodies"]:
                        body.set_facecolor(color)
                ax.scatter([x + offset] * len(values), values, s=24 if mode == "merged" else 8, color=color, marker=marker, zorder=3,
                           label=label if x == 0 else None)  # fmt: skip
        ax.set_xticks(range(len(with_modes)), [f"{c['task']}\n{c['label']}" for c in with_modes], fontsize=7)
        ax.set_ylabel("dev metric (classification ×100)")
        ax.set_title("AdaMix at inference: routing vs merged experts (paper Fig. 5)", fontsize=9)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        written.append(_save(fig, output_dir / "summary_eval_modes.png"))
        plt.close(fig)
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=130)
    return path


def summarize(sweep: Sweep, output_dir: Path | None = None) -> str:
    """Write ``summary.md``, ``summary.csv``, ``summary.json`` and the plots into ``output_dir`` (default the
    sweep's ``output_root``); return the markdown. Another ``output_dir`` also keeps the complete runs'
    records (``save_records``), and the records already kept there count as complete runs."""
    if output_dir is not None:
        restore_records(sweep, output_dir)
        save_records(sweep, output_dir)
    output_dir = Path(output_dir or sweep.output_root)
    cells = collect(sweep)
    output_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(sweep, cells)
    data = summary_json(cells)
    (output_dir / "summary.md").write_text(text)
    (output_dir / "summary.json").write_text(json.dumps(data, indent=2) + "\n")
    write_csv(output_dir / "summary.csv", data["runs"])
    plot(sweep, cells, data, output_dir)
    return text
