#!/usr/bin/env python
"""Seed sweeps of launchers/train.py: run them here, submit them as one Slurm array, summarise them.

    python launchers/sweep.py run launchers/sweeps/quality_core.yaml                 # one run after another, here
    python launchers/sweep.py run SWEEP.yaml --launcher torchrun --ranks 2            # each run on 2 ranks
    python launchers/sweep.py submit SWEEP.yaml --max_parallel 8 -- --gpus-per-node 1 # ONE array job; sbatch options after --
    python launchers/sweep.py summarize SWEEP.yaml                                     # summary.{md,csv,json} + plots
    python launchers/sweep.py summarize SWEEP.yaml --output benchmarks/quality/core     # ... + the runs' records there
    python launchers/sweep.py summarize A.yaml B.yaml --output DIR_A --output DIR_B --verdict DIR  # + one verdict table
    python launchers/sweep.py run SWEEP.yaml --records benchmarks/quality/core          # those records count as done
    python launchers/sweep.py run SWEEP.yaml --only group=adamix --only seed=2,3         # some runs of the sweep

The sweep file format is documented in adamix_ds/sweep.py. Complete runs are skipped and interrupted ones
resume, so every command can be repeated. A study that spans machines keeps the records of its finished runs
(metrics.json, eval_modes.json, random_routing.json, run_config.json: kilobytes) where ``summarize --output`` writes them, and
``run``/``submit --records`` (one or more folders) put them back so that those runs count as complete. A bad sweep file stops
before anything runs: one line, exit 2.

``summarize`` also tests the comparisons a sweep file names (``compare``: mean difference, Welch's and the paired
t-test, 95% intervals) and draws them as a forest plot; ``--verdict DIR`` puts the comparisons of every sweep given in
one table (``verdict.md``/``.json``) and one forest plot (``verdict_forest.png``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

# As in train.py: passive OpenMP waits before torch is imported (the runs share the machine's cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from adamix_ds.summary import summarize, verdict
from adamix_ds.sweep import LAUNCHERS, Sweep, load_sweep, restore_records, run_sweep, select_runs, submit_sweep, task_args
from adamix_ds.training import dist_env, usage_errors

RECORDS_HELP = "a folder of runs' records (summarize --output), repeatable: those runs count as complete"
ONLY_HELP = "only the runs whose task, group, other grid axis or seed is VALUE (KEY=VALUE[,VALUE...]), repeatable: all must match"


def build_parser() -> argparse.ArgumentParser:
    """The ``run``, ``submit``, ``summarize`` and ``task-args`` commands."""
    parser = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run every incomplete run here, one after another")
    run.add_argument("sweep", help="the sweep file (YAML)")
    run.add_argument("--launcher", choices=LAUNCHERS, default="deepspeed", help="how each run is started")
    run.add_argument("--ranks", type=int, default=1, help="processes per run (deepspeed --num_gpus / torchrun --nproc_per_node)")
    run.add_argument("--records", action="append", default=[], help=RECORDS_HELP)
    run.add_argument("--only", action="append", default=[], metavar="KEY=VALUE", help=ONLY_HELP)
    submit = commands.add_parser("submit", help="submit the incomplete runs as one Slurm array job")
    submit.add_argument("sweep", help="the sweep file (YAML)")
    submit.add_argument("--max_parallel", type=int, default=None, help="at most K array tasks at once (--array=...%%K)")
    submit.add_argument("--ranks_per_node", type=int, default=None, help="ranks per run (default: the node's GPUs, or 1)")
    submit.add_argument("--wait", action="store_true", help="return when every task has ended (sbatch --wait)")
    submit.add_argument("--records", action="append", default=[], help=RECORDS_HELP)
    submit.add_argument("--only", action="append", default=[], metavar="KEY=VALUE", help=ONLY_HELP)
    submit.add_argument("sbatch_options", nargs="*", help="extra sbatch options, after --")
    summary = commands.add_parser("summarize", help="write summary.md/.csv/.json and plots (under output_root, or --output)")
    summary.add_argument("sweep", nargs="+", help="the sweep file(s) (YAML)")
    summary.add_argument(
        "--output",
        action="append",
        default=[],
        help="write the summary files, and the complete runs' records, here instead of output_root: once per sweep file, in their order",
    )
    summary.add_argument(
        "--verdict", default=None, metavar="DIR", help="also write every sweep's comparisons as one table and forest plot here"
    )
    task = commands.add_parser("task-args", help="write one run's launcher flags, one per line (used by the Slurm array)")
    task.add_argument("sweep", help="the sweep file (YAML)")
    task.add_argument("--index", type=int, required=True, help="the run's index (SLURM_ARRAY_TASK_ID)")
    # A file, not stdout: libraries print warnings on stdout while they are imported.
    task.add_argument("--output", required=True, help="the file to write (empty when the run is complete)")
    return parser


def _summarize(sweeps: list[Sweep], outputs: list[str], verdict_dir: str | None) -> int:
    """Summarise each sweep (into its --output, or its output_root), then the verdict of all of them."""
    if outputs and len(outputs) != len(sweeps):
        raise ValueError(
            f"--output is given {len(outputs)} time(s) for {len(sweeps)} sweep file(s): give it once per sweep file, in their order, or not at all"
        )
    for sweep, output in itertools.zip_longest(sweeps, outputs):
        print(summarize(sweep, output), end="")
    if verdict_dir is not None:
        print(f"# Verdict ({verdict_dir})\n\n{verdict(sweeps, verdict_dir)}", end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    with usage_errors(dist_env(), prog="sweep.py"):
        options = build_parser().parse_args(argv)
        if options.command == "summarize":
            return _summarize([load_sweep(path) for path in options.sweep], options.output, options.verdict)
        sweep = load_sweep(options.sweep)
        if options.command == "task-args":
            Path(options.output).write_text("".join(arg + "\n" for arg in task_args(sweep, options.index)))
            return 0
        selected = select_runs(sweep, options.only)
        for records in options.records:
            print(f"{restore_records(sweep, records)} run(s) complete from the records in {records}")
        if options.command == "submit":
            job = submit_sweep(selected, options.max_parallel, options.ranks_per_node, options.sbatch_options, options.wait)
            print(f"submitted array job {job}: {len(selected.runs)} runs; logs in {sweep.log_dir}")
            return 0
        failed = run_sweep(selected, options.launcher, options.ranks)
    print(summarize(sweep), end="")  # the whole sweep: a selection's summary would list the rest as missing
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
