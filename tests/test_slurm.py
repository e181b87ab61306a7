"""Slurm on a real one-node cluster: the batch script trains on 2 ranks, and on the warning signal before
the time limit it checkpoints, requeues itself and resumes to the end; a sweep runs as one array job."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO_ROOT, SHARED_DATA, subprocess_env, tiny_rte_sweep_args
from slurm_cluster import LocalSlurm

TOTAL_STEPS = 30


@pytest.fixture
def cluster(tmp_path):
    if os.geteuid() != 0 or shutil.which("slurmctld") is None:
        pytest.fail("needs root and Slurm (slurmd, slurmctld, slurm-client, munge); `make test` installs them")
    slurm = LocalSlurm(tmp_path / "slurm")
    slurm.start()
    yield slurm
    slurm.stop()


@pytest.mark.slow
def test_sbatch_trains_checkpoints_on_sigusr1_requeues_and_resumes(cluster, tmp_path):
    output_dir = tmp_path / "run"
    log = tmp_path / "job.out"
    train_args = [
        "--task_name",
        "sst2",
        "--data_dir",
        str(SHARED_DATA / "glue" / "SST-2"),
        "--max_train_samples",
        "480",
        "--max_eval_samples",
        "64",
        "--max_seq_length",
        "32",
        "--per_device_train_batch_size",
        "8",
        "--max_steps",
        str(TOTAL_STEPS),
        "--logging_steps",
        "1",
        "--eval_steps",
        "1000",
        "--output_dir",
        str(output_dir),
    ]
    env = {**subprocess_env(), "PROCS_PER_NODE": "2", "PYTHON": sys.executable, "DS_CONFIG": "ds_configs/zero2.json"}
    job = cluster.submit(
        REPO_ROOT / "launchers" / "slurm" / "train.sbatch", train_args, ["--output", str(log)], cwd=REPO_ROOT, extra_env=env
    )

    # Signal once training is under way, as Slurm does shortly before the time limit.
    deadline = time.time() + 300
    progress = re.compile(rf"\b([1-9]\d*)/{TOTAL_STEPS}\b")
    while not (log.exists() and progress.search(log.read_text(errors="replace"))):
        assert time.time() < deadline, (
            f"no training progress in the job log:\n{log.read_text(errors='replace')[-3000:] if log.exists() else ''}"
        )
        assert cluster.job_field(job, "JobState") in {"PENDING", "RUNNING"}, log.read_text(errors="replace")[-3000:]
        time.sleep(1)
    cluster.signal_steps(job, "USR1")

    state = cluster.wait(job, timeout=600)
    text = log.read_text(errors="replace")
    assert state == "COMPLETED", text[-4000:]
    assert cluster.job_field(job, "Restarts") == "1", text[-4000:]
    assert "requeueing job" in text and "resumed from" in text, text[-4000:]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert 0 < metrics["resumed_from_step"] < TOTAL_STEPS
    assert metrics["world_size"] == 2 and metrics["final"]["step"] == TOTAL_STEPS
    assert (output_dir / "adapter" / "adapter_model.safetensors").stat().st_size > 0


@pytest.mark.slow
def test_sweep_submit_runs_one_array_job_that_completes_and_is_summarised(cluster, tmp_path):
    spec = {
        "output_root": str(tmp_path / "sweep"),
        "args": tiny_rte_sweep_args(max_steps=3),
        "grid": {"method": ["adapter", "adamix"]},
        "seeds": [1, 2],
    }
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    sweep = [sys.executable, str(REPO_ROOT / "launchers" / "sweep.py")]
    env = {**subprocess_env(), **cluster.env}
    submitted = subprocess.run(
        [*sweep, "submit", str(sweep_file), "--max_parallel", "2", "--ranks_per_node", "1", "--wait"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    logs = "\n".join(p.read_text(errors="replace")[-1500:] for p in sorted((tmp_path / "sweep" / "logs").glob("slurm-*.out")))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr + logs
    job = int(re.search(r"submitted array job (\d+): 4 runs", submitted.stdout).group(1))
    assert len(list((tmp_path / "sweep" / "logs").glob(f"slurm-{job}_*.out"))) == 4, logs
    assert all(cluster.job_field(f"{job}_{i}", "JobState") == "COMPLETED" for i in range(4)), logs

    summary = subprocess.run([*sweep, "summarize", str(sweep_file)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert summary.returncode == 0, summary.stderr
    assert "4 runs, 4 complete" in summary.stdout and "| adamix | " in summary.stdout and "(n=2)" in summary.stdout
    for seed in (1, 2):
        metrics = json.loads((tmp_path / "sweep" / "rte" / "adamix" / f"seed-{seed}" / "metrics.json").read_text())
        assert metrics["final"]["step"] == 3 and metrics["world_size"] == 1

    # Submitting a complete sweep again is refused in one line: nothing left to run.
    again = subprocess.run([*sweep, "submit", str(sweep_file)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.strip() == f"sweep.py: error: every run of {sweep_file} is complete: nothing to submit"
