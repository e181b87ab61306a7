"""Summaries of a sweep: mean ± sample std over seeds per cell, per-run rows, the sweep's comparisons, and plots.

``summarize(sweep)`` reads every run's ``metrics.json`` (and ``eval_modes.json`` where the run evaluated
every routing mode) and writes ``summary.md``, ``summary.csv``, ``summary.json`` and PNG plots under the
sweep's ``output_root``. A run without a complete ``metrics.json`` is listed as missing, never dropped.

The comparisons the sweep file names (``compare``) are tested within each task and grid point: the mean
difference A − B with Welch's t-test and its Welch–Satterthwaite 95% interval, and, where the two sides pair by
seed (the same seed, or for few-shot the same split, on both sides), the paired t-test; both from ``scipy.stats``.
``verdict`` puts the comparisons of several sweeps in one table and one forest plot.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scipy import stats

from adamix_ds.data import get_task_spec
from adamix_ds.sweep import (
    LATER_ROUTINGS_FILE,
    RUN_CONFIG_FILE,
    Comparison,
    Side,
    Sweep,
    SweepRun,
    read_metrics,
    restore_records,
    save_records,
)
from adamix_ds.training.eval_modes import EVAL_MODES_FILE

# metrics.json's final losses (the last log line's task loss; the held-out rows' task loss), shown unscaled.
LOSS_COLUMNS = ("train_task_loss", "holdout_loss")
# Grid axes that measure how much training a run got: "metric vs budget" plots use them.
BUDGET_AXES = ("num_train_epochs", "max_steps", "max_train_samples")
CONFIDENCE = 0.95
VERDICT_MD, VERDICT_JSON, VERDICT_PLOT = "verdict.md", "verdict.json", "verdict_forest.png"


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


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_eval_modes(run: SweepRun) -> dict[str, Any] | None:
    """The run's inference routings: its all-modes evaluation (``eval_modes.json``) and the routings scored later
    from its saved experts (``LATER_ROUTINGS_FILE``; ``eval_modes.json`` wins where both have a mode), or ``None``
    when it has neither.

    A run whose files lack ``merged`` (E2E decodes the merged model once, as its final evaluation) gets ``merged``
    from its final metrics when those are the uniform merge's: it evaluated with ``eval_mode merged``
    and no other merge."""
    files = [m for name in (LATER_ROUTINGS_FILE, EVAL_MODES_FILE) if (m := _read_json(run.output_dir / name)) is not None]
    if not files:
        return None
    modes = {mode: result for data in files for mode, result in data.items()}
    adamix = ((_read_json(run.output_dir / RUN_CONFIG_FILE) or {}).get("arguments") or {}).get("adamix") or {}
    metrics = read_metrics(run.metrics_file)
    if "merged" not in modes and metrics is not None and adamix.get("eval_mode") == "merged" and adamix.get("merge") in (None, "uniform"):
        modes["merged"] = {k: v for k, v in metrics["final"].items() if k.startswith(("eval_", "test_"))}
    return modes


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


def markdown(sweep: Sweep, cells: list[Cell], comparisons: Sequence[ComparisonResult] = ()) -> str:
    """One table per task: a row per cell, ``mean ± std (n)`` per metric (classification ×100), mean run time; the
    sweep's comparisons (``comparisons_markdown``); the routings of runs that scored several."""
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
    lines += comparisons_markdown(list(comparisons))
    lines += _routing_tables(cells)
    missing = [name for cell in cells for name in cell.missing]
    lines += ["## Missing or failed runs", ""]
    lines += [f"- `{name}`" for name in missing] if missing else ["none"]
    return "\n".join(lines) + "\n"


def routing_value(modes: dict[str, Any], mode: str, metric: str) -> float | None:
    """``metric`` of one run under routing ``mode`` (the mean over random draws or single experts), or ``None``."""
    result = modes.get(mode)
    if isinstance(result, list):
        values = [float(entry[metric]) for entry in result if metric in entry]
        return statistics.fmean(values) if values else None
    return float(result[metric]) if isinstance(result, dict) and metric in result else None


def run_routings(modes: dict[str, Any], metric: str) -> dict[str, float]:
    """One number per inference routing of one run's ``eval_modes.json``: ``metric`` under each merge, the mean
    over random draws and over single experts, and the best single expert (chosen on the split it is scored on)."""
    out: dict[str, float] = {}
    for mode, result in modes.items():
        value = routing_value(modes, mode, metric)
        if value is None:
            continue
        out[f"{mode} (mean)" if isinstance(result, list) else mode] = value
        if mode == "fixed":
            out["fixed (best on this split)"] = max(float(entry[metric]) for entry in result if metric in entry)
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


@dataclass(frozen=True)
class TTest:
    """One t-test of A − B: the mean difference, its 95% interval, t, its degrees of freedom and the two-sided p."""

    difference: float
    low: float
    high: float
    t: float
    df: float
    p: float

    @classmethod
    def of(cls, result: Any, difference: float) -> TTest:
        """From a ``scipy.stats`` t-test result (its ``confidence_interval`` is Welch–Satterthwaite's for Welch). Values
        without spread have no t (scipy: NaN, or infinite with p = 0 when the differences are all equal): NaN here."""
        if not math.isfinite(result.statistic):
            return cls(difference, math.nan, math.nan, math.nan, float(result.df), math.nan)
        interval = result.confidence_interval(CONFIDENCE)
        return cls(difference, float(interval.low), float(interval.high), float(result.statistic), float(result.df), float(result.pvalue))


@dataclass
class ComparisonResult:
    """One comparison of the sweep file at one task and grid point (``setting``), on one metric.

    ``a`` and ``b`` map each complete run's seed to its value. ``welch`` compares the two sides as independent
    samples (never for two routings of the same runs, which are not independent); ``paired`` the seeds both sides
    have. ``test`` is the one the verdict reads: paired for two routings of the same runs, Welch otherwise.
    """

    sweep: str
    comparison: Comparison
    setting: dict[str, str]
    metric: str
    scale: float
    a: dict[int, float]
    b: dict[int, float]
    welch: TTest | None
    paired: TTest | None

    @property
    def test(self) -> TTest | None:
        return self.paired if self.comparison.same_runs else self.welch

    @property
    def test_name(self) -> str:
        return "paired" if self.comparison.same_runs else "Welch"

    @property
    def pairs(self) -> list[float]:
        """A − B for each seed both sides have."""
        return [self.a[seed] - self.b[seed] for seed in self.a if seed in self.b]

    @property
    def difference(self) -> float:
        """The effect: the test's mean difference, or the difference of the means where no test is possible."""
        return self.test.difference if self.test is not None else statistics.fmean(self.a.values()) - statistics.fmean(self.b.values())

    @property
    def n(self) -> str:
        return str(len(self.pairs)) if self.comparison.same_runs else f"{len(self.a)} / {len(self.b)}"

    @property
    def setting_label(self) -> str:
        return " ".join([self.setting["task"], *(f"{k}={v}" for k, v in self.setting.items() if k != "task")])

    @property
    def verdict(self) -> str:
        """The claim "A beats B" in words, read off the test's 95% interval, with how many seeds agree."""
        test = self.test
        if test is None:
            words = f"not tested (under 2 {'pairs' if self.comparison.same_runs else 'runs a side'})"
        elif math.isnan(test.low):
            words = "not tested (no spread)"
        elif test.low > 0:
            words = "holds (CI above 0)"
        elif test.high < 0:
            words = "opposite (CI below 0)"
        else:
            words = "not shown (CI spans 0)"
        pairs = self.pairs
        if pairs:
            level = sum(d == 0 for d in pairs)
            words += f"; A ahead in {sum(d > 0 for d in pairs)}/{len(pairs)} seeds" + (f", level in {level}" if level else "")
        return words

    def to_json(self) -> dict[str, Any]:
        return {
            "sweep": self.sweep,
            "a": str(self.comparison.a),
            "b": str(self.comparison.b),
            "claim": self.comparison.claim,
            "protocol": self.comparison.protocol,
            "setting": self.setting,
            "metric": self.metric,
            "scale": self.scale,
            "a_values": {str(k): v for k, v in self.a.items()},
            "b_values": {str(k): v for k, v in self.b.items()},
            "welch": _finite(vars(self.welch)) if self.welch else None,
            "paired": {**_finite(vars(self.paired)), "n": len(self.pairs)} if self.paired else None,
            "test": self.test_name,
            "verdict": self.verdict,
        }


def _finite(values: dict[str, float]) -> dict[str, float | None]:
    """NaN (a test without spread) as JSON null: ``json`` would write NaN, which is not JSON."""
    return {k: None if math.isnan(v) else v for k, v in values.items()}


def side_values(cell: Cell, side: Side, metric: str) -> dict[int, float]:
    """Seed -> ``metric`` of each complete run of ``cell``: its own final value, or its value under ``side.mode``."""
    values: dict[int, float] = {}
    for run in cell.runs:
        if side.mode is None:
            value = (run_values(run) or {}).get(metric)
        else:
            modes = read_eval_modes(run)
            value = routing_value(modes, side.mode, metric) if modes is not None else None
        if value is not None:
            values[run.seed] = value
    return values


def t_tests(a: dict[int, float], b: dict[int, float], same_runs: bool) -> tuple[TTest | None, TTest | None]:
    """Welch's test of the two samples (not for ``same_runs``) and the paired test over the seeds both have; each
    ``None`` below 2 values a side (2 pairs)."""
    # Values without spread make scipy warn (and TTest.of records no t): the verdict says "no spread" instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        welch = None
        if not same_runs and len(a) > 1 and len(b) > 1:
            xs, ys = list(a.values()), list(b.values())
            welch = TTest.of(stats.ttest_ind(xs, ys, equal_var=False), statistics.fmean(xs) - statistics.fmean(ys))
        seeds = [seed for seed in a if seed in b]
        paired = None
        if len(seeds) > 1:
            xs, ys = [a[s] for s in seeds], [b[s] for s in seeds]
            paired = TTest.of(stats.ttest_rel(xs, ys), statistics.fmean(x - y for x, y in zip(xs, ys, strict=True)))
    return welch, paired


def compare(sweep: Sweep, cells: list[Cell]) -> list[ComparisonResult]:
    """Every comparison of ``sweep.comparisons`` at every task and grid point where both sides have a complete run:
    on the task's main metric (dev, or test without a dev set) and, between groups, on the best dev evaluation
    during training where both sides have one."""
    by_key = {frozenset(c.key.items()): c for c in cells}
    settings = list(dict.fromkeys(tuple((k, v) for k, v in c.key.items() if k != "group") for c in cells))
    results = []
    for comparison in sweep.comparisons:
        for setting in settings:
            pair = [by_key.get(frozenset({*setting, ("group", side.group)})) for side in (comparison.a, comparison.b)]
            if None in pair:
                continue
            task = dict(setting)["task"]
            main = _plotted_metric(pair, task)
            metrics = [main] + ([f"best_{main}"] if not comparison.same_runs and comparison.a.mode is comparison.b.mode is None else [])
            for metric in metrics:
                a, b = (side_values(cell, side, metric) for cell, side in zip(pair, (comparison.a, comparison.b), strict=True))
                if a and b:
                    welch, paired = t_tests(a, b, comparison.same_runs)
                    results.append(ComparisonResult(sweep.path.stem, comparison, dict(setting), metric, _scale(task), a, b, welch, paired))
    return results


def _number(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:+.2f}"


def _p(test: TTest | None) -> str:
    return "—" if test is None or math.isnan(test.p) else f"{test.p:.3f}" if test.p >= 0.001 else f"{test.p:.1e}"


def _interval(test: TTest | None, scale: float) -> str:
    if test is None or math.isnan(test.low):
        return "—"
    return f"[{test.low * scale:+.2f}, {test.high * scale:+.2f}]"


def _t(test: TTest | None) -> str:
    return "—" if test is None or math.isnan(test.t) else f"{test.t:+.2f} ({test.df:.1f})"


def comparisons_markdown(results: list[ComparisonResult]) -> list[str]:
    """The full table of ``compare``: both tests, their intervals, t (df) and p, and each side's mean ± std (n)."""
    if not results:
        return []
    lines = [
        "## Comparisons (A − B; the claim: A beats B)",
        "",
        f"Differences in the tables' units (classification ×100). Welch: the two sides as independent samples, "
        f"Welch–Satterthwaite {CONFIDENCE:.0%} interval; paired: over the seeds both sides have (for few-shot sweeps the seed is the "
        "split). The verdict reads the paired test for two routings of the same runs, Welch's otherwise. `scipy.stats` "
        "`ttest_ind(equal_var=False)` and `ttest_rel`, two-sided, no correction for the number of comparisons.",
        "",
        "| claim | protocol | setting | A − B | metric | A | B | Welch: diff [95% CI] | t (df) | p | paired: diff [95% CI] | t (df) | p | verdict |",
        "|" + "---|" * 14,
    ]
    for r in results:
        a, b = (Stat.of(list(v.values())).format(r.scale) for v in (r.a, r.b))
        row = [
            r.comparison.claim or "",
            r.comparison.protocol or "",
            r.setting_label,
            f"{r.comparison.a} − {r.comparison.b}",
            r.metric,
            a,
            b,
        ]
        for test in (r.welch, r.paired):
            row += [f"{_number(test.difference * r.scale)} {_interval(test, r.scale)}" if test else "—", _t(test), _p(test)]
        lines.append("| " + " | ".join([*row, r.verdict]) + " |")
    return [*lines, ""]


def verdict_markdown(results: list[ComparisonResult]) -> str:
    """One row per claim, setting, protocol and metric: the effect with its 95% interval, p, n and the verdict."""
    lines = [
        "| claim | setting | protocol | A − B | effect [95% CI] | test | p | paired p | n | verdict |",
        "|" + "---|" * 10,
    ]
    for r in results:
        test = r.test
        effect = f"{r.difference * r.scale:+.2f} {_interval(test, r.scale)}"
        paired = "" if r.comparison.same_runs else _p(r.paired)
        setting = f"{r.sweep}: {r.setting_label}, {r.metric}"
        row = [
            r.comparison.claim or "",
            setting,
            r.comparison.protocol or "",
            f"{r.comparison.a} − {r.comparison.b}",
            effect,
            r.test_name,
            _p(test),
            paired,
            r.n,
            r.verdict,
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_forest(results: list[ComparisonResult], path: Path, title: str) -> Path:
    """A forest plot: each comparison's effect (A − B) with its 95% interval against zero, one panel per claim.

    A filled marker is a verdict (the interval excludes 0), a hollow one is not; a row without a test (n = 1 on a
    side) shows its difference of means as a cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    claims = list(dict.fromkeys(r.comparison.claim or "(no claim)" for r in results))
    rows = {claim: [r for r in results if (r.comparison.claim or "(no claim)") == claim] for claim in claims}
    heights = [len(rows[c]) + 1.2 for c in claims]
    fig, axes = plt.subplots(len(claims), 1, figsize=(9, 0.3 * sum(heights) + 0.8), gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, claim in zip(axes[:, 0], claims, strict=True):
        members = rows[claim]
        for y, r in enumerate(reversed(members)):
            test, effect = r.test, r.difference * r.scale
            if test is None or math.isnan(test.low):
                ax.scatter([effect], [y], marker="x", color="tab:gray", zorder=3)
                continue
            significant = test.low > 0 or test.high < 0
            ax.plot([test.low * r.scale, test.high * r.scale], [y, y], color="tab:blue", lw=1.5)
            ax.scatter([effect], [y], marker="o", s=28, zorder=3, color="tab:blue", facecolors="tab:blue" if significant else "white")
        # The protocol names what is compared (the table has each side's name); the labels stay short for the plot.
        labels = [
            f"{r.sweep}: {r.setting_label} · {r.comparison.protocol or f'{r.comparison.a} − {r.comparison.b}'} · {r.metric}"
            for r in members
        ]
        ax.set_yticks(range(len(members)), list(reversed(labels)), fontsize=7)
        ax.set_ylim(-0.7, len(members) - 0.3)
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set_title(claim, fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel(f"A − B with its {CONFIDENCE:.0%} interval (points: accuracy ×100, BLEU)", fontsize=8)
    fig.suptitle(
        f"{title}\nfilled: the {CONFIDENCE:.0%} interval excludes 0 · hollow: it spans 0 · ×: no test (under 2 runs a side)", fontsize=8
    )
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def verdict(sweeps: Sequence[Sweep], output_dir: str | os.PathLike[str]) -> str:
    """The comparisons of every sweep in one table, grouped by claim (in the order the claims first appear), and its
    forest plot: ``verdict.md``, ``verdict.json`` and ``verdict_forest.png`` in ``output_dir``; returns the markdown.
    Reads the runs where ``summarize`` left them (their output folders, records restored)."""
    results = [r for sweep in sweeps for r in compare(sweep, collect(sweep))]
    claims = list(dict.fromkeys(r.comparison.claim for r in results))
    results.sort(key=lambda r: claims.index(r.comparison.claim))  # stable: sweep, then file order within a claim
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    text = verdict_markdown(results)
    (output_dir / VERDICT_MD).write_text(text)
    (output_dir / VERDICT_JSON).write_text(json.dumps([r.to_json() for r in results], indent=2) + "\n")
    if results:
        plot_forest(results, output_dir / VERDICT_PLOT, " · ".join(s.path.name for s in sweeps))
    return text


def _mode_stats(modes: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Per routing mode of several runs: the main metric of every run (merged, ensemble) or every expert/draw."""
    out: dict[str, list[float]] = {}
    for run_modes in modes:
        for mode, result in run_modes.items():
            entries = result if isinstance(result, list) else [result]
            out.setdefault(mode, []).extend(float(e[metric]) for e in entries if metric in e)
    return out


def summary_json(cells: list[Cell], comparisons: Sequence[ComparisonResult] = ()) -> dict[str, Any]:
    """Cells with their statistics, per-run rows, the comparisons and the missing runs, as plain JSON."""
    result: dict[str, Any] = {"cells": [], "runs": [], "comparisons": [r.to_json() for r in comparisons], "missing": []}
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
    """Write ``summary.md``, ``summary.csv``, ``summary.json`` and the plots (with ``compare``, the forest plot
    ``summary_forest.png``) into ``output_dir`` (default the
    sweep's ``output_root``); return the markdown. Another ``output_dir`` also keeps the complete runs'
    records (``save_records``), and the records already kept there count as complete runs."""
    if output_dir is not None:
        restore_records(sweep, output_dir)
        save_records(sweep, output_dir)
    output_dir = Path(output_dir or sweep.output_root)
    cells = collect(sweep)
    comparisons = compare(sweep, cells)
    output_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(sweep, cells, comparisons)
    data = summary_json(cells, comparisons)
    (output_dir / "summary.md").write_text(text)
    (output_dir / "summary.json").write_text(json.dumps(data, indent=2) + "\n")
    write_csv(output_dir / "summary.csv", data["runs"])
    plot(sweep, cells, data, output_dir)
    if comparisons:
        plot_forest(comparisons, output_dir / "summary_forest.png", f"Sweep {sweep.path.name}")
    return text
