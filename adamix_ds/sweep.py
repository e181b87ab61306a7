"""Seed sweeps over ``launchers/train.py``: a YAML grid expanded into runs, run locally or as one Slurm array.

A sweep file::

    output_root: outputs/sweeps/glue      # optional; default outputs/sweeps/<file stem>
    args:                                  # launcher flags common to every run
      num_train_epochs: 5
    grid:                                  # flag -> values; the runs are the cross product
      learning_rate: [3.0e-4, 1.0e-3]
      task_name:                           # a mapping sets the axis's flag and flags that go with it
        - {task_name: rte, max_seq_length: 128}
        - {task_name: sst2, max_seq_length: 64, max_train_samples: 4000}
    seeds: [1, 2, 3]
    groups:                                # optional: each group is one more value of a "group" axis
      adapter: {method: adapter}
      adamix: {method: adamix, eval_modes: all}
      no-consistency: {method: adamix, consistency_weight: 0}
    compare:                               # optional: what summarize tests, A against B (the claim: A beats B)
      - [adamix, adapter]                  # the runs' own metrics, group against group
      - [adamix:merged, adamix:random]     # two inference routings of the same runs (eval_modes.json)
      - {a: no-consistency, b: adapter, claim: AdaMix beats its baseline, protocol: equal passes}

Run ``r`` gets the output directory ``<output_root>/<task>/<group or method>/<other axes>/seed-<s>``, with
the other grid axes written ``flag-value`` and joined by ``_`` (left out when there are none). Flags take
the launcher's names (``--`` optional); a value ``null`` leaves the launcher's default. Every run is checked
with the launcher's own argument parser before anything starts, so a sweep never fails half-way on a value
the launcher refuses. Relative paths (``output_root``, ``data_dir``, ...) are relative to the directory the
sweep command runs in, locally and under Slurm alike.

A ``compare`` side is a group (the method where the sweep has no groups), or ``GROUP:MODE`` with ``MODE`` one of
the launcher's inference routings and merges (``merged``, ``random``, ``fixed``, ``ensemble``, ``greedy_soup``,
``fisher``, ``best_expert``; ``random`` and ``fixed`` stand for the mean over draws and experts). Each comparison is
made within every task and grid point; ``adamix_ds.summary`` computes it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adamix_ds.config import EVAL_MODES
from adamix_ds.training.arguments import REPO_ROOT, RunArguments, build_parser, parse_args
from adamix_ds.training.checkpoint import CHECKPOINTS, LATEST
from adamix_ds.training.eval_modes import EVAL_MODES_FILE
from adamix_ds.training.merges import MERGE_MODES
from adamix_ds.training.runtime import free_port

TRAIN_SCRIPT = REPO_ROOT / "launchers" / "train.py"
ARRAY_SCRIPT = REPO_ROOT / "launchers" / "slurm" / "sweep.sbatch"
METRICS_FILE = "metrics.json"
RUN_CONFIG_FILE = "run_config.json"
# Routings scored after training from a run's saved experts (launchers/evaluate.py --output_file
# <run>/random_routing.json): they belong to the run's record as much as eval_modes.json does.
LATER_ROUTINGS_FILE = "random_routing.json"
# What a finished run's results are, without its checkpoints and adapters: a summary needs these files only.
RECORD_FILES = (METRICS_FILE, EVAL_MODES_FILE, LATER_ROUTINGS_FILE, RUN_CONFIG_FILE)
RECORDS = "runs"
LAUNCHERS = ("deepspeed", "torchrun", "python")
SWEEP_KEYS = ("output_root", "args", "grid", "seeds", "groups", "compare")
COMPARE_KEYS = ("a", "b", "claim", "protocol")
# What a compare side may name after "GROUP:": the routings every AdaMix run can be scored under.
COMPARE_MODES = EVAL_MODES + MERGE_MODES
# Flags the sweep sets itself: a sweep file that set them would break run names or resumption.
RESERVED_FLAGS = {
    "output_dir": "the sweep names every run's output_dir",
    "seed": "use the seeds list",
    "overwrite_output_dir": "the sweep resumes interrupted runs and restarts only runs without a checkpoint",
    "resume_from_checkpoint": "the sweep resumes from each run's own checkpoints",
    "local_rank": "the distributed launcher sets it",
}


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep.

    Attributes:
        index: position in the sweep (the Slurm array task id).
        name: ``<task>/<group or method>/<other axes>/seed-<s>``, also the run's folder under ``output_root``.
        output_dir: the launcher's ``--output_dir``.
        args: the launcher's flags for this run, ``--output_dir`` and ``--seed`` included.
        cell: the values that define its table cell: ``task``, ``group`` (the group name, or the method)
            and every other grid axis; runs that differ only in seed share a cell.
        seed: the run's seed.
    """

    index: int
    name: str
    output_dir: Path
    args: tuple[str, ...]
    cell: dict[str, str]
    seed: int

    @property
    def metrics_file(self) -> Path:
        return self.output_dir / METRICS_FILE

    def is_complete(self) -> bool:
        """True when the launcher wrote this run's final ``metrics.json``."""
        return read_metrics(self.metrics_file) is not None

    def launch_args(self) -> list[str]:
        """The flags for starting the run now: it resumes from its own checkpoint when it has one; a folder
        left without any (a run that died before its first checkpoint) is started afresh."""
        args = list(self.args)
        started = self.output_dir.is_dir() and any(self.output_dir.iterdir())
        if started and not (self.output_dir / CHECKPOINTS / LATEST).is_file():
            args.append("--overwrite_output_dir")
        return args


@dataclass(frozen=True)
class Side:
    """One side of a comparison: a group's runs, scored as the runs scored themselves (``mode`` None) or under one
    inference routing of ``COMPARE_MODES``."""

    group: str
    mode: str | None = None

    def __str__(self) -> str:
        return f"{self.group}:{self.mode}" if self.mode else self.group


@dataclass(frozen=True)
class Comparison:
    """``a`` against ``b`` (the claim: ``a`` beats ``b``), with the sweep file's words for the claim and protocol."""

    a: Side
    b: Side
    claim: str | None = None
    protocol: str | None = None

    @property
    def same_runs(self) -> bool:
        """True when both sides score the same runs (two routings of one group): they pair, and only so."""
        return self.a.group == self.b.group


@dataclass
class Sweep:
    """A sweep file, expanded and checked: ``runs`` in a stable order (grid points, then groups, then seeds)."""

    path: Path
    output_root: Path
    axes: list[str]
    runs: list[SweepRun] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        return self.output_root / "logs"

    def log_file(self, run: SweepRun) -> Path:
        return self.log_dir / (run.name.replace("/", "__") + ".log")


def read_metrics(path: Path) -> dict[str, Any] | None:
    """A run's ``metrics.json``, or ``None`` while it is missing, incomplete or unreadable."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and isinstance(metrics.get("final"), dict) else None


def _flag_name(raw: object, where: str, known: set[str]) -> str:
    name = str(raw).removeprefix("--").replace("-", "_")
    if name not in known:
        raise ValueError(f"{where}: unknown launcher flag {raw!r} (see python launchers/train.py --help)")
    if name in RESERVED_FLAGS:
        raise ValueError(f"{where}: flag {raw!r} is set by the sweep: {RESERVED_FLAGS[name]}")
    return name


def _flag_mapping(value: object, where: str, known: set[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping of launcher flags to values, got {type(value).__name__}")
    flags = {}
    for raw, item in value.items():
        if isinstance(item, (list, dict)):
            raise ValueError(f"{where}.{raw}: a flag takes one value, got {item!r} (put alternatives in grid)")
        flags[_flag_name(raw, f"{where}.{raw}", known)] = item
    return flags


def _argv(flags: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for name, value in flags.items():
        if value is not None:
            argv += [f"--{name}", str(value)]
    return argv


def _path_part(value: object) -> str:
    text = str(value).strip("/").replace(os.sep, "-").replace(" ", "-")
    return text or "none"


def load_sweep(path: str | os.PathLike[str]) -> Sweep:
    """Read, expand and check a sweep file; ``ValueError`` names the first bad entry (nothing has run)."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ValueError(f"sweep file {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"sweep file {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"sweep file {path}: expected a mapping with keys {', '.join(SWEEP_KEYS)}")
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}: allowed {', '.join(SWEEP_KEYS)}")
    known = {action.dest for action in build_parser()._actions}

    common = _flag_mapping(spec.get("args"), "args", known)
    grid_spec = spec.get("grid") or {}
    if not isinstance(grid_spec, dict):
        raise ValueError(f"{path}: grid must be a mapping of flag -> list of values")
    # Each grid value as the flags it sets: a plain value sets the axis's flag; a mapping sets the axis's
    # flag and others that go with it (per-task sequence lengths, say).
    grid: dict[str, list[dict[str, Any]]] = {}
    for raw, values in grid_spec.items():
        name = _flag_name(raw, f"grid.{raw}", known)
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: grid.{raw} must be a non-empty list of values, got {values!r}")
        points = []
        for value in values:
            flags = _flag_mapping(value, f"grid.{raw}[]", known) if isinstance(value, dict) else {name: value}
            if name not in flags:
                raise ValueError(f"{path}: grid.{raw}: the mapping {value!r} must set {raw} itself")
            points.append(flags)
        if len({_path_part(p[name]) for p in points}) != len(points):
            raise ValueError(f"{path}: grid.{raw} has repeated values: {[p[name] for p in points]!r}")
        grid[name] = points
    seeds = spec.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError(f"{path}: seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{path}: seeds has repeated values: {seeds!r}")
    groups_spec = spec.get("groups")
    if groups_spec is not None and (not isinstance(groups_spec, dict) or not groups_spec):
        raise ValueError(f"{path}: groups must be a non-empty mapping of group name -> launcher flags")
    groups = {str(g): _flag_mapping(flags, f"groups.{g}", known) for g, flags in (groups_spec or {}).items()}
    for name in groups:
        if name != _path_part(name):
            raise ValueError(f"{path}: groups.{name}: a group name becomes a folder name: allowed letters, digits, '-', '_', '.'")
    gridded = [flag for points in grid.values() for p in points for flag in p]
    overlap = sorted(set(gridded) & ({flag for flags in groups.values() for flag in flags} | set(common)))
    if overlap:
        raise ValueError(f"{path}: {overlap[0]} is set by the grid and by args or a group: set it in one place")
    output_root = Path(spec.get("output_root") or Path("outputs") / "sweeps" / path.stem)

    sweep = Sweep(path=path, output_root=output_root, axes=(["group"] if groups else []) + list(grid))
    group_items = list(groups.items()) or [(None, {})]
    seen: dict[str, str] = {}
    # Grid points outermost, then groups, then seeds: a sweep stopped part-way has whole comparisons (every
    # group and seed of the first points) rather than one group everywhere.
    for values, (group, group_flags) in itertools.product(itertools.product(*grid.values()), group_items):
        point = {name: flags[name] for name, flags in zip(grid, values, strict=True)}
        flags = {**common, **group_flags, **{k: v for linked in values for k, v in linked.items()}}
        for seed in seeds:
            argv = _argv({**flags, "seed": seed})
            where = f"{path}: run {group + ' ' if group else ''}{' '.join(f'{k}={v}' for k, v in point.items())} seed={seed}".rstrip()
            try:
                parsed = parse_args([*argv, "--output_dir", "unused"])
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
            run = _make_run(len(sweep.runs), output_root, argv, parsed, group, point, seed)
            if run.name in seen:
                raise ValueError(f"{where}: same output folder as run {seen[run.name]}: {run.name}")
            seen[run.name] = where
            sweep.runs.append(run)
    sweep.comparisons = _comparisons(spec.get("compare"), path, list(dict.fromkeys(run.cell["group"] for run in sweep.runs)))
    return sweep


def _side(raw: object, where: str, groups: list[str]) -> Side:
    group, _, mode = str(raw).partition(":")
    if group not in groups:
        raise ValueError(f"{where}: unknown group {group!r}: allowed {', '.join(groups)}")
    if ":" in str(raw) and mode not in COMPARE_MODES:
        raise ValueError(
            f"{where}: unknown routing {mode!r} in {raw!r}: allowed GROUP or GROUP:MODE, MODE one of {', '.join(COMPARE_MODES)}"
        )
    return Side(group, mode or None)


def _comparisons(spec: object, path: Path, groups: list[str]) -> list[Comparison]:
    """The sweep file's ``compare`` list, each side checked against the sweep's groups (or methods)."""
    if spec is None:
        return []
    if not isinstance(spec, list):
        raise ValueError(f"{path}: compare must be a list of [A, B] pairs or {{a: A, b: B, claim: ..., protocol: ...}} mappings")
    comparisons = []
    for index, entry in enumerate(spec):
        where = f"{path}: compare[{index}]"
        if isinstance(entry, list) and len(entry) == 2:
            entry = dict(zip("ab", entry, strict=True))
        if not isinstance(entry, dict) or not {"a", "b"} <= set(entry):
            raise ValueError(f"{where} is {entry!r}: allowed [A, B] or a mapping with a, b and optionally claim, protocol")
        unknown = sorted(set(entry) - set(COMPARE_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r}: allowed {', '.join(COMPARE_KEYS)}")
        a, b = _side(entry["a"], where, groups), _side(entry["b"], where, groups)
        if a == b:
            raise ValueError(f"{where}: compares {a} with itself")
        words = {k: str(entry[k]) for k in ("claim", "protocol") if entry.get(k) is not None}
        comparisons.append(Comparison(a, b, **words))
    return comparisons


def select_runs(sweep: Sweep, only: Sequence[str]) -> Sweep:
    """``sweep`` with the runs that match every ``KEY=VALUE`` of ``only`` (all of them when it is empty).

    A key is a cell key (``task``, ``group``, any other grid axis) or ``seed``; ``KEY=A,B`` (or the key given
    twice) matches either value, written as in the run's folder name (``task=rte``, ``seed=2``). The runs keep
    their index, so a selection submitted to Slurm keeps its array task ids. ``ValueError`` names a malformed
    filter, an unknown key, or filters that match no run.
    """
    keys = ["seed", *sweep.runs[0].cell]
    wanted: dict[str, set[str]] = {}
    for item in only:
        key, sign, values = item.partition("=")
        if not sign or not key or not values:
            raise ValueError(f"--only {item!r} is invalid: allowed KEY=VALUE[,VALUE...]")
        if key not in keys:
            raise ValueError(f"--only {item!r}: unknown key {key!r}: allowed {', '.join(keys)}")
        wanted.setdefault(key, set()).update(values.split(","))
    runs = [run for run in sweep.runs if all({**run.cell, "seed": str(run.seed)}[key] in values for key, values in wanted.items())]
    if not runs:
        raise ValueError(f"--only {' '.join(only)} matches no run of {sweep.path}")
    return dataclasses.replace(sweep, runs=runs)


def _make_run(
    index: int, output_root: Path, argv: list[str], parsed: RunArguments, group: str | None, point: dict[str, Any], seed: int
) -> SweepRun:
    task = parsed.data.task_name.lower()
    # The task and the group (or, without groups, the method) have folders of their own.
    named = {"task_name"} if group is not None else {"task_name", "method"}
    other = {k: v for k, v in point.items() if k not in named}
    cell = {"task": task, "group": group or parsed.adamix.method, **{k: str(v) for k, v in other.items()}}
    parts = [task, cell["group"]]
    if other:
        parts.append("_".join(f"{k}-{_path_part(v)}" for k, v in other.items()))
    parts.append(f"seed-{seed}")
    name = "/".join(parts)
    output_dir = output_root / name
    return SweepRun(index, name, output_dir, (*argv, "--output_dir", str(output_dir)), cell, seed)


def launcher_command(launcher: str, ranks: int, args: Sequence[str]) -> list[str]:
    """The command that starts ``launchers/train.py`` with ``args`` on ``ranks`` processes."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher={launcher!r} is invalid: allowed {', '.join(LAUNCHERS)}")
    if ranks < 1:
        raise ValueError(f"ranks={ranks} is invalid: allowed an integer >= 1")
    if launcher == "python":
        if ranks != 1:
            raise ValueError(f"ranks={ranks} needs --launcher deepspeed or torchrun: python starts one process")
        return [sys.executable, str(TRAIN_SCRIPT), *args]
    port = ["--master_port", str(free_port())]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), *port, str(TRAIN_SCRIPT), *args]
    deepspeed = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    return [deepspeed, "--num_gpus", str(ranks), *port, str(TRAIN_SCRIPT), *args]


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _headline(metrics: dict[str, Any]) -> str:
    final = metrics["final"]
    keys = [k for k in final if k.startswith(("eval_", "test_")) and not k.endswith("loss")][:2]
    return ", ".join(f"{k}={final[k]:.4f}" for k in keys)


def run_sweep(sweep: Sweep, launcher: str = "deepspeed", ranks: int = 1, print_fn: Callable[[str], None] | None = None) -> list[SweepRun]:
    """Run every incomplete run of ``sweep`` one after another; return the runs that failed.

    Complete runs are skipped, interrupted ones resume from their checkpoints. Each run's output goes to
    ``<output_root>/logs/<name>.log``; one progress line per run (done / total, ETA).
    """
    launcher_command(launcher, ranks, [])  # a bad launcher or rank count fails before the first run
    print_fn = print_fn or functools.partial(print, flush=True)  # progress shows up at once in a log file
    sweep.log_dir.mkdir(parents=True, exist_ok=True)
    total = len(sweep.runs)
    pending = [run for run in sweep.runs if not run.is_complete()]
    print_fn(f"sweep {sweep.path}: {total} runs, {total - len(pending)} complete, {len(pending)} to run -> {sweep.output_root}")
    failed: list[SweepRun] = []
    durations: list[float] = []
    for done, run in enumerate(pending, start=total - len(pending) + 1):
        start = time.perf_counter()
        log = sweep.log_file(run)
        with log.open("a") as handle:
            handle.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(launcher_command(launcher, ranks, run.launch_args()))}\n")
            handle.flush()
            code = subprocess.run(launcher_command(launcher, ranks, run.launch_args()), stdout=handle, stderr=subprocess.STDOUT).returncode
        durations.append(time.perf_counter() - start)
        remaining = total - done
        eta = f"ETA {_duration(sum(durations) / len(durations) * remaining)}" if remaining else "sweep finished"
        metrics = read_metrics(run.metrics_file)
        if code == 0 and metrics is not None:
            print_fn(f"[{done}/{total}] done {run.name} in {_duration(durations[-1])}: {_headline(metrics)} · {eta}")
        else:
            failed.append(run)
            print_fn(f"[{done}/{total}] FAILED {run.name} (exit {code}; log {log}) · {eta}")
    return failed


def _copy_record(source: Path, target: Path) -> None:
    """Copy the ``RECORD_FILES`` that ``source`` has into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def save_records(sweep: Sweep, folder: str | os.PathLike[str]) -> int:
    """Copy every complete run's ``RECORD_FILES`` to ``folder/runs/<run name>/``; return how many runs.

    A folder of records (kilobytes, where the runs' outputs are checkpoints) is what a study keeps, in git,
    say, to continue on another machine: ``restore_records`` puts them back."""
    saved = 0
    for run in sweep.runs:
        target = Path(folder) / RECORDS / run.name
        if run.is_complete() and run.output_dir.resolve() != target.resolve():
            _copy_record(run.output_dir, target)
            saved += 1
    return saved


def restore_records(sweep: Sweep, folder: str | os.PathLike[str]) -> int:
    """Copy the records ``save_records`` kept in ``folder`` into the output folders of the runs that are not
    complete here, which then count as complete (skipped, summarised); return how many runs."""
    restored = 0
    for run in sweep.runs:
        record = Path(folder) / RECORDS / run.name
        if not run.is_complete() and read_metrics(record / METRICS_FILE) is not None:
            _copy_record(record, run.output_dir)
            restored += 1
    return restored


def task_args(sweep: Sweep, index: int) -> list[str]:
    """The launcher flags of array task ``index``, or ``[]`` when that run is already complete."""
    if not 0 <= index < len(sweep.runs):
        raise ValueError(f"index={index} is out of range: allowed 0..{len(sweep.runs) - 1}")
    run = sweep.runs[index]
    return [] if run.is_complete() else run.launch_args()


def submit_sweep(
    sweep: Sweep,
    max_parallel: int | None = None,
    ranks_per_node: int | None = None,
    sbatch_options: Sequence[str] = (),
    wait: bool = False,
) -> int:
    """Submit the sweep's incomplete runs as ONE Slurm array job (``--array=0-N%K``); return its job id.

    Each array task runs ``launchers/slurm/sweep.sbatch``, which asks this module for its run's flags and
    starts ``launchers/slurm/train.sbatch`` with them: the same launcher command as a local run, with its
    checkpoint-and-requeue on the time-limit signal. Complete runs end at once; ``wait`` blocks until
    every task has ended (``sbatch --wait``).
    """
    if shutil.which("sbatch") is None:
        raise ValueError("sbatch not found: submit needs a Slurm client (use 'run' to run the sweep here)")
    if max_parallel is not None and max_parallel < 1:
        raise ValueError(f"max_parallel={max_parallel} is invalid: allowed an integer >= 1")
    indices = [run.index for run in sweep.runs if not run.is_complete()]
    if not indices:
        raise ValueError(f"every run of {sweep.path} is complete: nothing to submit")
    sweep.log_dir.mkdir(parents=True, exist_ok=True)
    array = ",".join(str(i) for i in indices) if len(indices) != indices[-1] - indices[0] + 1 else f"{indices[0]}-{indices[-1]}"
    if max_parallel is not None:
        array += f"%{max_parallel}"
    env = {**os.environ, "ADAMIX_REPO": str(REPO_ROOT), "PYTHON": os.environ.get("PYTHON", sys.executable)}
    if ranks_per_node is not None:
        env["PROCS_PER_NODE"] = str(ranks_per_node)
    command = [
        "sbatch",
        "--parsable",
        f"--array={array}",
        f"--job-name=adamix-{sweep.path.stem}",
        f"--output={sweep.log_dir}/slurm-%A_%a.out",
        *(["--wait"] if wait else []),
        *sbatch_options,
        str(ARRAY_SCRIPT),
        str(sweep.path),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0 and not (wait and completed.stdout.strip()):
        raise RuntimeError(f"sbatch failed (exit {completed.returncode}): {' '.join(completed.stderr.split())}")
    return int(completed.stdout.strip().splitlines()[0].split(";")[0])
