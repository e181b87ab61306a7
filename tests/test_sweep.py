"""The sweep runner (``launchers/sweep.py``): expansion and checking of sweep files, skip/resume, summary
maths on fixtures, a real local sweep of tiny MiniLM runs with every eval mode, and ``launchers/evaluate.py``."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from scipy import stats

from adamix_ds.summary import Stat, collect, compare, read_eval_modes, summarize, t_tests, verdict
from adamix_ds.sweep import Side, load_sweep, select_runs, task_args

from conftest import REPO_ROOT, subprocess_env, tiny_rte_sweep_args

SWEEP = str(REPO_ROOT / "launchers" / "sweep.py")
EVALUATE = str(REPO_ROOT / "launchers" / "evaluate.py")


def _write(tmp_path: Path, spec: dict, name: str = "sweep.yaml") -> Path:
    spec.setdefault("output_root", str(tmp_path / "out"))
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _spec(**overrides) -> dict:
    spec = {
        "args": {"task_name": "rte", "max_steps": 2},
        "grid": {"learning_rate": [1e-3, 3e-3]},
        "seeds": [1, 2],
        "groups": {"adapter": {"method": "adapter"}, "adamix": {"method": "adamix", "eval_modes": "all"}},
    }
    spec.update(overrides)
    return spec


def test_expansion_names_folders_and_flags(tmp_path):
    sweep = load_sweep(_write(tmp_path, _spec()))
    assert len(sweep.runs) == 8 and sweep.axes == ["group", "learning_rate"]
    first = sweep.runs[0]
    assert first.name == "rte/adapter/learning_rate-0.001/seed-1"
    assert first.output_dir == tmp_path / "out" / first.name
    assert first.cell == {"task": "rte", "group": "adapter", "learning_rate": "0.001"}
    assert list(first.args) == [
        "--task_name", "rte", "--max_steps", "2", "--method", "adapter", "--learning_rate", "0.001", "--seed", "1",
        "--output_dir", str(first.output_dir),
    ]  # fmt: skip
    assert [r.name for r in sweep.runs[-2:]] == ["rte/adamix/learning_rate-0.003/seed-1", "rte/adamix/learning_rate-0.003/seed-2"]
    assert "--eval_modes" in sweep.runs[-1].args and "--eval_modes" not in first.args
    assert [r.index for r in sweep.runs] == list(range(8))


def test_without_groups_the_method_names_the_folder_and_linked_values_set_several_flags(tmp_path):
    spec = {
        "args": {"max_steps": 2, "--bottleneck_dim": 8},
        "grid": {
            "method": ["adamix", "lora"],
            "task_name": [{"task_name": "rte", "max_seq_length": 128}, {"task_name": "sst2", "max_seq_length": 64}],
        },
        "seeds": [3],
    }
    sweep = load_sweep(_write(tmp_path, spec))
    assert [r.name for r in sweep.runs] == ["rte/adamix/seed-3", "sst2/adamix/seed-3", "rte/lora/seed-3", "sst2/lora/seed-3"]
    sst2 = sweep.runs[1].args
    assert sst2[sst2.index("--max_seq_length") + 1] == "64" and sst2[sst2.index("--bottleneck_dim") + 1] == "8"
    assert sweep.runs[1].cell == {"task": "sst2", "group": "adamix"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"grid": {"learning_rat": [1e-3]}}, "grid.learning_rat: unknown launcher flag 'learning_rat'"),
        ({"grid": {"learning_rate": []}}, "grid.learning_rate must be a non-empty list"),
        ({"seeds": []}, "seeds must be a non-empty list"),
        ({"args": {"seed": 3}}, "flag 'seed' is set by the sweep"),
        ({"args": {"task_name": "rte", "output_dir": "x"}}, "flag 'output_dir' is set by the sweep"),
        ({"groups": {"adamix": {"method": "adamix", "num_experts": 0}}}, "run adamix learning_rate=0.001 seed=1: num_experts=0 is invalid"),
        ({"args": {"task_name": "nope"}}, "unknown task 'nope'"),
        ({"grid": {"learning_rate": [1e-3, 1e-3]}}, "grid.learning_rate has repeated values"),
        ({"groups": {"a": {"learning_rate": 1e-3}}}, "learning_rate is set by the grid and by args or a group"),
        ({"colour": "red"}, "unknown key 'colour'"),
        ({"compare": [["adamix", "adaptor"]]}, "compare[0]: unknown group 'adaptor': allowed adapter, adamix"),
        (
            {"compare": [["adamix:merged", "adamix:best"]]},
            "compare[0]: unknown routing 'best' in 'adamix:best': allowed GROUP or GROUP:MODE",
        ),
    ],
)
def test_bad_sweep_files_fail_before_anything_runs_with_one_line(tmp_path, change, message):
    path = _write(tmp_path, _spec(**change))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_sweep(path)
    completed = subprocess.run([sys.executable, SWEEP, "run", str(path)], capture_output=True, text=True, env=subprocess_env())
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.strip().splitlines()[-1].startswith("sweep.py: error: ") and message.split(":")[0] in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1, completed.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("compare", "message"),
    [
        ({"a": "adamix"}, "compare[0] is {'a': 'adamix'}: allowed [A, B] or a mapping with a, b"),
        (["adamix", "adapter", "lora"], "allowed [A, B] or a mapping"),
        ({"a": "adamix", "b": "adapter", "claims": "x"}, "compare[0]: unknown key 'claims': allowed a, b, claim, protocol"),
        (["adamix:merged", "adamix:merged"], "compare[0]: compares adamix:merged with itself"),
    ],
)
def test_bad_compare_entries_name_what_is_allowed(tmp_path, compare, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_sweep(_write(tmp_path, _spec(compare=[compare])))


def test_compare_sides_are_groups_or_the_methods_without_groups(tmp_path):
    spec = _spec(compare=[["adamix", "adapter"], {"a": "adamix:random", "b": "adamix:merged", "claim": "c", "protocol": "P"}])
    first, second = load_sweep(_write(tmp_path, spec)).comparisons
    assert (first.a, first.b, first.claim, first.same_runs) == (Side("adamix"), Side("adapter"), None, False)
    assert (second.a, second.b, second.claim, second.protocol, second.same_runs) == (
        Side("adamix", "random"),
        Side("adamix", "merged"),
        "c",
        "P",
        True,
    )
    methods = {
        "args": {"task_name": "rte", "max_steps": 2},
        "grid": {"method": ["adamix", "lora"]},
        "seeds": [1],
        "compare": [["adamix", "lora"]],
    }
    assert load_sweep(_write(tmp_path, methods, "methods.yaml")).comparisons[0].b == Side("lora")


def test_launch_args_resume_a_checkpointed_run_and_restart_one_without_checkpoint(tmp_path):
    sweep = load_sweep(_write(tmp_path, _spec()))
    fresh, checkpointed, dead, complete = sweep.runs[:4]
    (checkpointed.output_dir / "checkpoints").mkdir(parents=True)
    (checkpointed.output_dir / "checkpoints" / "latest").write_text("step-2\n")
    dead.output_dir.mkdir(parents=True)
    (dead.output_dir / "run_config.json").write_text("{}")
    complete.output_dir.mkdir(parents=True)
    (complete.output_dir / "metrics.json").write_text(json.dumps({"final": {"eval_accuracy": 0.5}, "train_runtime": 1.0}))
    assert fresh.launch_args() == list(fresh.args) == task_args(sweep, 0)
    assert checkpointed.launch_args() == list(checkpointed.args)
    assert dead.launch_args() == [*dead.args, "--overwrite_output_dir"]
    assert complete.is_complete() and task_args(sweep, 3) == []
    with pytest.raises(ValueError, match="index=8 is out of range"):
        task_args(sweep, 8)


def test_only_selects_runs_by_cell_and_seed_and_keeps_their_index(tmp_path):
    sweep = load_sweep(_write(tmp_path, _spec()))
    chosen = select_runs(sweep, ["group=adamix", "seed=2", "learning_rate=0.001,0.003"])
    assert [r.name for r in chosen.runs] == ["rte/adamix/learning_rate-0.001/seed-2", "rte/adamix/learning_rate-0.003/seed-2"]
    assert [r.index for r in chosen.runs] == [3, 7] and chosen.output_root == sweep.output_root
    assert select_runs(sweep, ["seed=1", "seed=2", "task=rte"]).runs == select_runs(sweep, []).runs == sweep.runs


def test_run_only_launches_the_selection_and_summarises_the_whole_sweep(tmp_path):
    sweep = load_sweep(_write(tmp_path, _spec()))
    for run in sweep.runs:
        if run.cell["group"] == "adapter":
            _fake_run(run, 0.6, 0.6, 1.0)
    command = [sys.executable, SWEEP, "run", str(sweep.path), "--only", "group=adapter", "--launcher", "python"]
    completed = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "4 runs, 4 complete, 0 to run" in completed.stdout  # the adamix runs, not selected, did not start
    assert not any(run.output_dir.exists() for run in sweep.runs if run.cell["group"] == "adamix")
    assert "rte/adamix/learning_rate-0.003/seed-2" in completed.stdout.split("Missing or failed runs")[1]


@pytest.mark.parametrize(
    ("only", "message"),
    [
        ("group", "--only 'group' is invalid: allowed KEY=VALUE[,VALUE...]"),
        ("colour=red", "--only 'colour=red': unknown key 'colour': allowed seed, task, group, learning_rate"),
        ("seed=9", "--only seed=9 matches no run of"),
    ],
)
def test_bad_only_filters_exit_2_with_one_line_before_anything_runs(tmp_path, only, message):
    path = _write(tmp_path, _spec())
    completed = subprocess.run(
        [sys.executable, SWEEP, "run", str(path), "--only", only], capture_output=True, text=True, env=subprocess_env()
    )
    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"sweep.py: error: {message}"), completed.stderr
    assert not (tmp_path / "out").exists()


def _fake_run(run, accuracy: float, best: float, runtime: float, modes: dict | None = None, **losses: float | None) -> None:
    run.output_dir.mkdir(parents=True, exist_ok=True)
    metrics = {"final": {"eval_accuracy": accuracy, "eval_loss": 0.7, "step": 2}, "best": {"eval_accuracy": best, "step": 1}}
    (run.output_dir / "metrics.json").write_text(json.dumps({**metrics, "train_runtime": runtime, **losses}))
    if modes is not None:
        (run.output_dir / "eval_modes.json").write_text(json.dumps(modes))


def test_summary_mean_sample_std_n_and_missing_runs(tmp_path):
    sweep = load_sweep(_write(tmp_path, _spec()))
    runs = {r.name: r for r in sweep.runs}
    _fake_run(runs["rte/adapter/learning_rate-0.001/seed-1"], 0.60, 0.62, 10.0, train_task_loss=0.5, holdout_loss=None)
    _fake_run(runs["rte/adapter/learning_rate-0.001/seed-2"], 0.70, 0.71, 20.0, train_task_loss=0.7, holdout_loss=None)
    modes = {
        "merged": {"eval_accuracy": 0.65},
        "fixed": [{"down": d, "up": 0, "eval_accuracy": 0.6} for d in range(4)],
        "random": [{"draw": d, "eval_accuracy": 0.55 + 0.01 * d} for d in range(3)],
    }
    _fake_run(runs["rte/adamix/learning_rate-0.001/seed-1"], 0.65, 0.66, 30.0, modes)
    (runs["rte/adamix/learning_rate-0.001/seed-2"].output_dir).mkdir(parents=True)
    (runs["rte/adamix/learning_rate-0.001/seed-2"].output_dir / "metrics.json").write_text("{truncated")

    cells = collect(sweep)
    assert [len(c.missing) for c in cells] == [0, 1, 2, 2]
    text = summarize(sweep)
    # mean 65.00, sample std sqrt(((60-65)^2 + (70-65)^2) / 1) = 7.07
    # Losses unscaled; a run without them (or with null, no held-out rows) leaves a dash.
    assert "| adapter learning_rate=0.001 | 65.00 ± 7.07 (n=2) | 66.50 ± 6.36 (n=2) | 0.6000 ± 0.1414 (n=2) | 15 s |" in text
    assert "| adamix learning_rate=0.001 | 65.00 (n=1) | 66.00 (n=1) | — | 30 s |" in text
    assert "| cell | merged | fixed (mean) | fixed (best on this split) | random (mean) |" in text
    assert "| adamix learning_rate=0.001 | 65.00 (n=1) | 60.00 (n=1) | 60.00 (n=1) | 56.00 (n=1) |" in text
    assert "`rte/adamix/learning_rate-0.001/seed-2`" in text and "`rte/adapter/learning_rate-0.003/seed-1`" in text
    data = json.loads((sweep.output_root / "summary.json").read_text())
    adapter = data["cells"][0]["stats"]["eval_accuracy"]
    assert adapter["n"] == 2 and adapter["mean"] == pytest.approx(0.65) and adapter["std"] == pytest.approx(math.sqrt(0.005))
    by_mode = data["cells"][1]["eval_modes"]
    assert by_mode["merged"] == [0.65] and by_mode["fixed"] == [0.6] * 4 and by_mode["random"] == pytest.approx([0.55, 0.56, 0.57])
    assert len(data["missing"]) == 5
    rows = (sweep.output_root / "summary.csv").read_text().splitlines()
    assert len(rows) == 9 and rows[0].startswith("name,task,group,learning_rate,seed,complete")
    for plot in ("summary_bars.png", "summary_eval_modes.png"):
        assert (sweep.output_root / plot).stat().st_size > 1000
    assert Stat.of([0.5]).format(100) == "50.00 (n=1)"


def test_plots_leave_out_tasks_without_a_complete_run(tmp_path):
    # A study in progress: MRPC has no finished run yet, and the budget axis is swept.
    grid = {"task_name": ["rte", "mrpc"], "num_train_epochs": [1, 2]}
    sweep = load_sweep(_write(tmp_path, _spec(args={"max_seq_length": 32}, grid=grid, seeds=[1])))
    runs = {r.name: r for r in sweep.runs}
    for epochs, accuracy in ((1, 0.6), (2, 0.7)):
        _fake_run(runs[f"rte/adapter/num_train_epochs-{epochs}/seed-1"], accuracy, accuracy, 10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns about a legend on an empty panel
        text = summarize(sweep)
    assert "`mrpc/adapter/num_train_epochs-1/seed-1`" in text
    for plot in ("summary_bars.png", "summary_budget.png"):
        assert (sweep.output_root / plot).stat().st_size > 1000


def test_records_carry_complete_runs_to_another_machine(tmp_path):
    spec = _spec(grid={"learning_rate": [1e-3]}, groups={"adamix": {"method": "adamix", "eval_modes": "all"}})
    sweep = load_sweep(_write(tmp_path, spec))
    first, second = sweep.runs
    _fake_run(first, 0.60, 0.62, 10.0, modes={"merged": {"eval_accuracy": 0.6}})
    (second.output_dir / "checkpoints").mkdir(parents=True)  # started, not finished: no record
    kept = tmp_path / "kept"
    summarize(sweep, kept)
    assert sorted(p.name for p in (kept / "runs" / first.name).iterdir()) == ["eval_modes.json", "metrics.json"]
    assert not (kept / "runs" / second.name).exists() and (kept / "summary.md").is_file()

    # Another machine, a sweep with seed 1 only: its one run is complete from the records, nothing launches.
    fresh = load_sweep(_write(tmp_path, {**spec, "seeds": [1], "output_root": str(tmp_path / "elsewhere")}, "seed1.yaml"))
    unrelated = tmp_path / "unrelated"  # a second --records folder, of another study
    (unrelated / "runs").mkdir(parents=True)
    command = [sys.executable, SWEEP, "run", str(fresh.path), "--records", str(unrelated), "--records", str(kept), "--launcher", "python"]
    completed = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert f"0 run(s) complete from the records in {unrelated}" in completed.stdout
    assert f"1 run(s) complete from the records in {kept}" in completed.stdout and "1 runs, 1 complete, 0 to run" in completed.stdout
    assert (fresh.runs[0].output_dir / "eval_modes.json").read_text() == (first.output_dir / "eval_modes.json").read_text()
    assert "60.00 (n=1)" in summarize(fresh, kept) and len(list((kept / "runs").rglob("metrics.json"))) == 1


COMPARED = {
    # seed: (adapter, adamix, adamix's random draws); one learning rate, so one setting
    1: (0.60, 0.66, [0.61, 0.63]),
    2: (0.70, 0.71, [0.71, 0.71]),
    3: (0.65, 0.69, [0.64, 0.68]),
}


def _compared_sweep(tmp_path: Path, name: str = "sweep.yaml", **spec):
    compare = [
        {"a": "adamix", "b": "adapter", "claim": "AdaMix beats its baseline", "protocol": "P"},
        {"a": "adamix:merged", "b": "adamix:random", "claim": "Merged beats random routing"},
        ["adamix", "lonely"],
    ]
    groups = {
        "adapter": {"method": "adapter"},
        "adamix": {"method": "adamix", "eval_modes": "all"},
        "lonely": {"method": "adapter", "bottleneck_dim": 8},
    }
    sweep = load_sweep(
        _write(tmp_path, _spec(grid={"learning_rate": [1e-3]}, seeds=[1, 2, 3], groups=groups, compare=compare, **spec), name)
    )
    for run in sweep.runs:
        adapter, adamix, draws = COMPARED[run.seed]
        if run.cell["group"] == "adapter":
            _fake_run(run, adapter, adapter + 0.01, 1.0)
        elif run.cell["group"] == "adamix":
            modes = {"merged": {"eval_accuracy": adamix}, "random": [{"draw": d, "eval_accuracy": v} for d, v in enumerate(draws)]}
            _fake_run(run, adamix, adamix, 2.0, modes)
        elif run.seed == 1:  # one run of this group: nothing to test it with
            _fake_run(run, 0.5, 0.5, 1.0)
    return sweep


def test_comparisons_welch_and_paired_tests_with_their_intervals(tmp_path):
    sweep = _compared_sweep(tmp_path)
    results = compare(sweep, collect(sweep))
    assert [(str(r.comparison.a), str(r.comparison.b), r.metric) for r in results] == [
        ("adamix", "adapter", "eval_accuracy"), ("adamix", "adapter", "best_eval_accuracy"),
        ("adamix:merged", "adamix:random", "eval_accuracy"),
        ("adamix", "lonely", "eval_accuracy"), ("adamix", "lonely", "best_eval_accuracy"),
    ]  # fmt: skip
    groups, _, routings, lonely, _ = results

    # Welch by its textbook formulas: t = d / se, Welch–Satterthwaite df, d ± t(0.975, df) · se.
    a, b = [v[1] for v in COMPARED.values()], [v[0] for v in COMPARED.values()]
    va, vb = (Stat.of(x).std ** 2 / len(x) for x in (a, b))
    d, se = Stat.of(a).mean - Stat.of(b).mean, math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    welch = groups.welch
    assert (welch.difference, welch.t, welch.df) == pytest.approx((d, d / se, df))
    assert welch.p == pytest.approx(2 * stats.t.sf(abs(d / se), df))
    assert (welch.low, welch.high) == pytest.approx((d - stats.t.ppf(0.975, df) * se, d + stats.t.ppf(0.975, df) * se))
    # Paired over the three seeds: the differences' mean over their standard error, n - 1 df.
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    se_pairs = Stat.of(diffs).std / math.sqrt(3)
    paired = groups.paired
    assert (paired.difference, paired.t, paired.df) == pytest.approx((Stat.of(diffs).mean, Stat.of(diffs).mean / se_pairs, 2))
    assert groups.test is welch and groups.n == "3 / 3" and groups.verdict.endswith("A ahead in 3/3 seeds")

    # Two routings of the same runs are not independent samples: paired only, and the verdict reads it.
    assert routings.welch is None and routings.test is routings.paired and routings.n == "3"
    random_means = [sum(v[2]) / 2 for v in COMPARED.values()]
    assert routings.paired.difference == pytest.approx(Stat.of([x - y for x, y in zip(a, random_means, strict=True)]).mean)
    assert routings.verdict == "not shown (CI spans 0); A ahead in 2/3 seeds, level in 1"

    # One run on a side: the difference of the means, no test, and no NaN in the JSON.
    assert lonely.welch is None and lonely.test is None and lonely.difference == pytest.approx(Stat.of(a).mean - 0.5)
    assert lonely.verdict == "not tested (under 2 runs a side); A ahead in 1/1 seeds"
    assert lonely.to_json()["paired"] is None


def test_values_without_spread_have_no_t_test_rather_than_p_zero():
    # Every pair differs by exactly 0.25 (binary fractions): scipy's t would be infinite and its p 0.
    welch, paired = t_tests({1: 0.5, 2: 0.75}, {1: 0.25, 2: 0.5}, same_runs=True)
    assert welch is None and paired.difference == 0.25 and math.isnan(paired.t) and math.isnan(paired.p) and math.isnan(paired.low)
    welch, _ = t_tests({1: 0.5, 2: 0.5}, {1: 0.5, 2: 0.5}, same_runs=False)
    assert welch.difference == 0 and math.isnan(welch.p)


def test_summarize_writes_the_comparisons_and_their_forest_plot(tmp_path):
    sweep = _compared_sweep(tmp_path)
    text = summarize(sweep)
    section = text.split("## Comparisons (A − B; the claim: A beats B)")[1]
    assert (
        "| AdaMix beats its baseline | P | rte learning_rate=0.001 | adamix − adapter | eval_accuracy | 68.67 ± 2.52 (n=3) | 65.00 ± 5.00 (n=3) |"
        in section
    )
    assert "| Merged beats random routing |  | rte learning_rate=0.001 | adamix:merged − adamix:random | eval_accuracy |" in section
    data = json.loads((sweep.output_root / "summary.json").read_text())
    assert "NaN" not in json.dumps(data["comparisons"])  # a test without spread, or no test, is null
    first = data["comparisons"][0]
    assert (first["a"], first["b"], first["test"], first["claim"]) == ("adamix", "adapter", "Welch", "AdaMix beats its baseline")
    assert first["a_values"] == {"1": 0.66, "2": 0.71, "3": 0.69} and first["paired"]["n"] == 3
    assert (sweep.output_root / "summary_forest.png").stat().st_size > 1000


def test_verdict_groups_the_comparisons_of_several_sweeps_by_claim(tmp_path):
    first = _compared_sweep(tmp_path, "first.yaml", output_root=str(tmp_path / "first"))
    second = _compared_sweep(tmp_path, "second.yaml", output_root=str(tmp_path / "second"))
    text = verdict([first, second], tmp_path / "verdict")
    rows = [line.split(" | ") for line in text.splitlines()[2:]]
    assert [(row[0].lstrip("| "), row[1].split(":")[0]) for row in rows] == [
        ("AdaMix beats its baseline", "first"), ("AdaMix beats its baseline", "first"),
        ("AdaMix beats its baseline", "second"), ("AdaMix beats its baseline", "second"),
        ("Merged beats random routing", "first"), ("Merged beats random routing", "second"),
        ("", "first"), ("", "first"), ("", "second"), ("", "second"),
    ]  # fmt: skip
    assert rows[0][4:9] == ["+3.67 [-6.71, +14.05]", "Welch", "0.340", "0.128", "3 / 3"]
    assert json.loads((tmp_path / "verdict" / "verdict.json").read_text())[4]["test"] == "paired"
    assert (tmp_path / "verdict" / "verdict_forest.png").stat().st_size > 1000


def test_summarize_cli_several_sweeps_and_their_outputs(tmp_path):
    first = _compared_sweep(tmp_path, "first.yaml", output_root=str(tmp_path / "first"))
    second = _compared_sweep(tmp_path, "second.yaml", output_root=str(tmp_path / "second"))
    command = [sys.executable, SWEEP, "summarize", str(first.path), str(second.path)]
    bad = subprocess.run([*command, "--output", str(tmp_path / "one")], capture_output=True, text=True, env=subprocess_env())
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "sweep.py: error: --output is given 1 time(s) for 2 sweep file(s): give it once per sweep file, in their order, or not at all"
    ]
    outputs = ["--output", str(tmp_path / "kept1"), "--output", str(tmp_path / "kept2"), "--verdict", str(tmp_path / "verdict")]
    completed = subprocess.run([*command, *outputs], capture_output=True, text=True, env=subprocess_env())
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.count("## Comparisons") == 2 and f"# Verdict ({tmp_path / 'verdict'})" in completed.stdout
    assert (tmp_path / "kept2" / "summary_forest.png").is_file() and (tmp_path / "verdict" / "verdict.md").is_file()


def test_routings_scored_later_join_the_record_and_merged_comes_from_the_final_decode(tmp_path):
    sweep = load_sweep(_write(tmp_path, _spec(grid={"learning_rate": [1e-3]}, seeds=[1], groups={"adamix": {"method": "adamix"}})))
    run = sweep.runs[0]
    _fake_run(run, 0.7, 0.7, 1.0, {"fisher": {"eval_accuracy": 0.72}})
    config = {"arguments": {"adamix": {"eval_mode": "merged", "merge": "uniform"}}}
    (run.output_dir / "run_config.json").write_text(json.dumps(config))
    (run.output_dir / "random_routing.json").write_text(
        json.dumps({"random": [{"draw": 0, "eval_accuracy": 0.6}], "fisher": {"eval_accuracy": 0}})
    )
    modes = read_eval_modes(run)
    assert modes["fisher"] == {"eval_accuracy": 0.72} and modes["random"][0]["eval_accuracy"] == 0.6  # eval_modes.json wins
    assert modes["merged"] == {"eval_accuracy": 0.7, "eval_loss": 0.7}
    config["arguments"]["adamix"]["eval_mode"] = "fixed"  # its final evaluation is not the merge's
    (run.output_dir / "run_config.json").write_text(json.dumps(config))
    assert "merged" not in read_eval_modes(run)
    summarize(sweep, tmp_path / "kept")
    assert (tmp_path / "kept" / "runs" / run.name / "random_routing.json").is_file()


@pytest.mark.slow
def test_real_local_sweep_skips_complete_runs_and_merged_equals_the_runs_final_eval(tmp_path):
    spec = _spec(
        args=tiny_rte_sweep_args(max_steps=2),
        grid={"learning_rate": [1e-3]},
        groups={"adapter": {"method": "adapter"}, "adamix": {"method": "adamix", "eval_modes": "all", "random_draws": 3}},
    )
    path = _write(tmp_path, spec)
    command = [sys.executable, SWEEP, "run", str(path), "--launcher", "python"]
    completed = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    progress = [line for line in completed.stdout.splitlines() if re.match(r"\[\d+/\d+\] ", line)]
    assert [line.split()[0] for line in progress] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"] and "ETA" in progress[0]
    assert "| adamix learning_rate=0.001 |" in completed.stdout and "none" in completed.stdout.split("Missing or failed runs")[1]

    again = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert again.returncode == 0 and "4 runs, 4 complete, 0 to run" in again.stdout, again.stdout + again.stderr

    sweep = load_sweep(path)
    adamix = sweep.runs[2]
    final = json.loads(adamix.metrics_file.read_text())["final"]
    modes = json.loads((adamix.output_dir / "eval_modes.json").read_text())
    assert modes["merged"] == {k: v for k, v in final.items() if k.startswith("eval_")}
    assert [(e["down"], e["up"]) for e in modes["fixed"]] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert [e["draw"] for e in modes["random"]] == [0, 1, 2] and set(modes) == {"merged", "ensemble", "fixed", "random"}

    # A launcher run that evaluates with one routing trains the same experts and scores what the all-modes
    # evaluation scored for that routing (its only evaluation is the first: random draw 0).
    for mode, expected in (
        (["--eval_mode", "fixed", "--eval_expert", "2"], modes["fixed"][2]),
        (["--eval_mode", "random"], modes["random"][0]),
    ):
        single = tmp_path / "single" / mode[1]
        args = list(adamix.args)
        del args[args.index("--eval_modes") : args.index("--eval_modes") + 2]
        args[args.index("--output_dir") + 1] = str(single)
        completed = subprocess.run(
            [sys.executable, str(REPO_ROOT / "launchers" / "train.py"), *args, *mode], capture_output=True, text=True, env=subprocess_env()
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        final_single = json.loads((single / "metrics.json").read_text())["final"]
        assert {k: v for k, v in final_single.items() if k.startswith("eval_")} == {
            k: v for k, v in expected.items() if k.startswith("eval_")
        }

    # The standalone command, from the saved experts and the run's own settings, gives the same numbers.
    output = tmp_path / "modes.json"
    standalone = [sys.executable, EVALUATE, "--adapter_name_or_path", str(adamix.output_dir / "experts"), "--random_draws", "3"]
    completed = subprocess.run([*standalone, "--output_file", str(output)], capture_output=True, text=True, env=subprocess_env())
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert json.loads(output.read_text()) == modes

    bad = subprocess.run([*standalone, "--eval_modes", "merged,best"], capture_output=True, text=True, env=subprocess_env())
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "evaluate.py: error: eval_modes='merged,best' is invalid: allowed 'all' or a comma-separated list of merged, random, fixed, ensemble, greedy_soup, fisher, best_expert"
    ]


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "launchers" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_expand_and_pass_the_launchers_checks(path):
    sweep = load_sweep(path)
    assert sweep.runs and len({r.name for r in sweep.runs}) == len(sweep.runs)
