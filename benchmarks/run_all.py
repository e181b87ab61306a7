"""Regenerate every benchmark table and plot, and assemble ``benchmarks/RESULTS.md``.

    python benchmarks/run_all.py          # what `make bench` runs (about 10 minutes on 2 idle CPU cores)
    python benchmarks/run_all.py --fast --out-dir /tmp/bench --plot-dir /tmp/bench --results-md /tmp/bench/RESULTS.md

Runs ``flops.py``, ``throughput.py``, ``zero_memory.py``, ``decode_speed.py`` and ``prediction.py`` one after another, each in its own process
(so one's memory and threads cannot disturb another's timings), then writes RESULTS.md: a header with
the machine, versions and date, each script's section, and the ``## Fused adapter kernel`` section
(written by ``kernel_bench.py`` on a GPU) and ``## Measured training runs`` carried over unchanged. Exits 1 if any script failed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import BENCH_DIR, RESULTS_DIR, cli, environment, markdown_table

SCRIPTS = ("flops", "throughput", "zero_memory", "decode_speed", "prediction")
# Scripts that draw a plot take --plot-dir.
PLOTTING = ("flops", "throughput")
# Sections that no script here writes, carried over unchanged: the GPU kernel benchmark (kernel_bench.py on a GPU)
# and the measured training runs (summaries of launchers/sweeps/*.yaml, hours of machine time).
KEPT_HEADINGS = ("## Fused adapter kernel", "## Measured training runs")


def kept_sections(results_md: str) -> list[str]:
    """The ``KEPT_HEADINGS`` sections of an existing RESULTS.md (each up to the next level-2 heading), in that order."""
    kept = []
    for heading in KEPT_HEADINGS:
        match = re.search(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", results_md, flags=re.MULTILINE | re.DOTALL)
        if match:
            kept.append(match.group(0).rstrip())
    return kept


def assemble(environment_info: dict[str, Any], timings: dict[str, float], sections: list[str], kept: list[str]) -> str:
    """The whole RESULTS.md."""
    machine = [
        ["date", environment_info["date"]],
        ["CPU", f"{environment_info['cpu']} ({environment_info['cpu_cores']} cores, {environment_info['torch_threads']} torch threads)"],
        ["memory", f"{environment_info['memory_gb']} GiB"],
        ["GPU", environment_info["gpu"] or "none"],
        *[[name, environment_info[name]] for name in ("python", "torch", "deepspeed", "transformers", "peft")],
        *[[f"`{name}.py` wall time", f"{seconds:.0f} s"] for name, seconds in timings.items()],
    ]
    parts = [
        "# Benchmark results",
        "",
        "Regenerate everything below (except the GPU kernel section) with `make bench`, i.e. `python benchmarks/run_all.py`; "
        "each script also runs alone (`python benchmarks/<name>.py --help`). Numbers in JSON: `benchmarks/results/`.",
        "",
        markdown_table(["", "this run"], machine),
        "",
        *[section.rstrip() + "\n" for section in sections],
    ]
    parts += [section + "\n" for section in kept]
    return "\n".join(parts)


def run_all(
    fast: bool = False, out_dir: Path = RESULTS_DIR, plot_dir: Path = BENCH_DIR, results_md: Path = BENCH_DIR / "RESULTS.md"
) -> dict[str, Any]:
    """Run every benchmark script and write RESULTS.md.

    Args:
        fast: run each script with --fast.
        out_dir: where the scripts write their JSON and markdown sections.
        plot_dir: where the scripts write their PNG plots.
        results_md: the RESULTS.md to (re)write; its ``KEPT_HEADINGS`` sections are kept.
    """
    timings: dict[str, float] = {}
    failures = []
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for name in SCRIPTS:
        command = [sys.executable, str(BENCH_DIR / f"{name}.py"), "--out-dir", str(out_dir)]
        command += ["--plot-dir", str(plot_dir)] if name in PLOTTING else []
        command += ["--fast"] if fast else []
        section = Path(out_dir) / f"{name}.md"
        section.unlink(missing_ok=True)  # a crashed script must not leave an old section behind
        print(f"$ {' '.join(command)}", flush=True)
        start = time.perf_counter()
        completed = subprocess.run(command)
        timings[name] = time.perf_counter() - start
        if completed.returncode != 0:
            failures.append(f"{name}.py exited with status {completed.returncode}")
        if not section.is_file():
            section.write_text(f"## {name}\n\n**`benchmarks/{name}.py` failed (status {completed.returncode}) before writing results.**\n")
    sections = [(Path(out_dir) / f"{name}.md").read_text() for name in SCRIPTS]
    previous = results_md.read_text() if results_md.is_file() else ""
    results_md.write_text(assemble(environment(), timings, sections, kept_sections(previous)))
    print(f"wrote {results_md} ({sum(timings.values()):.0f} s)")
    return {"timings": timings, "failures": failures}


if __name__ == "__main__":
    sys.exit(cli(run_all))
