"""Slurm across two real nodes (``TwoNodeSlurm``: network namespaces n1 and n2 on this machine, reached only at their
NodeAddr). ``launchers/slurm/train.sbatch``'s wiring, seen through a stand-in ``PYTHON`` that records what each node's
torchrun would get: the step holds the job's CPUs, ranks follow the allocated GPUs, the rendezvous and gloo use the
NodeAddr, a submit directory that one node does not share is refused. Then the real launcher on the real MiniLM:
one CPU rank per node trains to the end with the metrics of a 2-rank one-node run, its checkpoint continues
elastically on one node, and the time-limit signal checkpoints, requeues and resumes to the uninterrupted metrics
(the signalled two-node job is the two-node run the first test compares: one job for both, to fit the time).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO_ROOT, SHARED_DATA, subprocess_env
from slurm_cluster import NamespacesUnavailable, TwoNodeSlurm

SCRIPT = REPO_ROOT / "launchers" / "slurm" / "train.sbatch"
CPUS = os.cpu_count() or 1
GPUS = 2  # per node: Slurm's gres, plain files (nothing opens them)

# Records, per node, what train.sbatch starts torchrun with and what the step holds; starts nothing.
STANDIN = """#!{python}
import json, os, socket, sys
from pathlib import Path
record = {{"argv": sys.argv[1:], "cpus": len(os.sched_getaffinity(0)), "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME")}}
(Path(os.environ["STANDIN_OUT"]) / (socket.gethostname() + ".json")).write_text(json.dumps(record))
"""
# nvidia-smi -L of a node with more GPUs than Slurm allocates: what the script must not count.
NVIDIA_SMI = '#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo "GPU $i: stand-in"; done\n'

STEPS, SAVE_STEPS = 8, 4
# 64 SST-2 examples on 2 ranks of micro-batch 4: 8 steps an epoch.
TRAIN_ARGS = [
    "--task_name", "sst2", "--data_dir", str(SHARED_DATA / "glue" / "SST-2"), "--max_train_samples", "64",
    "--max_eval_samples", "16", "--max_seq_length", "32", "--per_device_train_batch_size", "4", "--max_steps", str(STEPS),
    "--save_steps", str(SAVE_STEPS), "--save_total_limit", "3", "--logging_steps", "1", "--eval_steps", "1000", "--seed", "3",
]  # fmt: skip
# Three checkpoints kept: the middle one (step 4) outlives the one the signal writes and the last.


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: the two nodes are network namespaces (ip netns)")
    if shutil.which("slurmctld") is None:
        pytest.fail("needs Slurm (slurmd, slurmctld, slurm-client, munge); `make test` installs them")
    slurm = TwoNodeSlurm(tmp_path_factory.mktemp("slurm2"), cpus_per_node=CPUS, gpus_per_node=GPUS)
    try:
        slurm.start()
        yield slurm
    except NamespacesUnavailable as error:
        pytest.skip(f"this machine allows no network namespaces: {error}")
    finally:
        slurm.stop()


@dataclass(frozen=True)
class Job:
    """An ended job: its id, final state and log."""

    id: int
    state: str
    log: str


def _sbatch(cluster: TwoNodeSlurm, log: Path, options: list[str], env: dict[str, str], args: list[str], cwd: Path = REPO_ROOT) -> int:
    """Submit train.sbatch with ``options`` and the launcher ``args``; return the job id."""
    return cluster.submit(SCRIPT, args, ["--output", str(log), *options], cwd=cwd, extra_env={**subprocess_env(), **env})


def _ended(cluster: TwoNodeSlurm, job: int, log: Path, timeout: float) -> Job:
    state = cluster.wait(job, timeout)
    return Job(job, state, log.read_text(errors="replace") if log.exists() else "")


def _standin_job(
    cluster: TwoNodeSlurm, root: Path, options: list[str], env: dict[str, str] | None = None, cwd: Path = REPO_ROOT
) -> tuple[Job, dict[str, dict]]:
    """A two-node train.sbatch job with the stand-in PYTHON: the ended job and the record of each node."""
    out = root / "records"
    out.mkdir(parents=True)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(STANDIN.format(python=sys.executable))
    (bin_dir / "nvidia-smi").write_text(NVIDIA_SMI)
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{subprocess_env()['PATH']}"
    env = {"PYTHON": str(bin_dir / "python"), "PATH": path, "STANDIN_OUT": str(out), **(env or {})}
    job = _sbatch(cluster, root / "job.out", ["--nodes", "2", *options], env, [], cwd)
    return _ended(cluster, job, root / "job.out", timeout=120), {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


def _flag(record: dict, name: str) -> str:
    argv = record["argv"]
    return argv[argv.index(name) + 1]


@pytest.fixture(scope="module")
def defaults(cluster, tmp_path_factory):
    """A two-node job with nothing but the script's own resource requests."""
    return _standin_job(cluster, tmp_path_factory.mktemp("defaults"), [])


@pytest.mark.slow
def test_step_holds_every_cpu_of_the_job_on_each_node_and_too_few_are_refused(cluster, defaults, tmp_path):
    job, records = defaults
    assert job.state == "COMPLETED" and set(records) == {"n1", "n2"}, job.log
    # Whole nodes by default, and the one task per node holds all of their CPUs (not Slurm's default of one).
    assert [records[n]["cpus"] for n in ("n1", "n2")] == [CPUS, CPUS], job.log
    job, records = _standin_job(cluster, tmp_path, [], {"PROCS_PER_NODE": str(CPUS + 1)})
    assert job.state == "FAILED" and records == {}, job.log
    assert f"train.sbatch: error: {CPUS + 1} rank(s) per node on {CPUS} CPU(s) per node: submit with --cpus-per-task" in job.log
    job, records = _standin_job(cluster, tmp_path / "zero", [], {"PROCS_PER_NODE": "0"})
    assert job.state == "FAILED" and records == {}, job.log
    assert "train.sbatch: error: PROCS_PER_NODE=0 is invalid: allowed an integer >= 1" in job.log


@pytest.mark.slow
def test_ranks_per_node_are_the_gpus_slurm_allocated_not_the_nodes(cluster, defaults, tmp_path):
    job, records = defaults
    assert job.state == "COMPLETED", job.log
    # nvidia-smi on PATH lists 8 GPUs; the whole node's allocation holds GPUS of them.
    assert [_flag(records[n], "--nproc_per_node") for n in ("n1", "n2")] == [str(GPUS)] * 2, job.log
    job, records = _standin_job(cluster, tmp_path / "one", ["--oversubscribe", "--cpus-per-task", "1", "--gpus-per-node", "1"])
    assert job.state == "COMPLETED", job.log
    assert [_flag(records[n], "--nproc_per_node") for n in ("n1", "n2")] == ["1", "1"], job.log
    assert [records[n]["cpus"] for n in ("n1", "n2")] == [1, 1], job.log


@pytest.mark.slow
def test_rendezvous_and_gloo_use_the_first_nodes_node_addr(cluster, defaults):
    job, records = defaults
    assert job.state == "COMPLETED", job.log
    head = cluster.nodes[0].addr
    for rank, node in enumerate(("n1", "n2")):
        # NodeName n1 resolves to nothing here: only its NodeAddr reaches it.
        assert _flag(records[node], "--master_addr") == head and _flag(records[node], "--node_rank") == str(rank), job.log
        assert records[node]["gloo_ifname"] == cluster.veth[node], job.log
    assert f"rendezvous n1 ({head}:" in job.log


@pytest.mark.slow
def test_a_submit_directory_that_a_node_does_not_share_is_refused(cluster, tmp_path):
    submit_dir = tmp_path / "submit"
    submit_dir.mkdir()
    # On n2 an empty tmpfs hides the directory: n2 does not share it, as it would not share a node-local disk.
    subprocess.run(cluster.node_command("n2", ["mount", "-t", "tmpfs", "tmpfs", str(submit_dir)]), check=True)
    try:
        job, records = _standin_job(cluster, tmp_path, [], cwd=submit_dir)
    finally:
        subprocess.run(cluster.node_command("n2", ["umount", str(submit_dir)]), check=True)
    assert job.state == "FAILED" and cluster.job_field(job.id, "ExitCode") == "2:0" and records == {}, job.log
    assert f"train.sbatch: error: node n2 does not see {submit_dir}/.adamix-shared-{job.id}, written on n1:" in job.log
    assert "must be on a filesystem shared by every node" in job.log
    assert not list(submit_dir.glob(".adamix-*")), "the probe file outlived the job"


def _submit_run(cluster: TwoNodeSlurm, root: Path, name: str, nodes: int, ranks_per_node: int, extra: list[str] = ()) -> tuple[int, Path]:
    """Submit the launcher through train.sbatch with TRAIN_ARGS and ``extra``; return the job id and its log."""
    log = root / f"{name}.out"
    args = [*TRAIN_ARGS, "--output_dir", str(root / name), *extra]
    return _sbatch(cluster, log, ["--nodes", str(nodes)], _launcher_env(ranks_per_node), args), log


def _launcher_env(ranks_per_node: int) -> dict[str, str]:
    return {"PYTHON": sys.executable, "PROCS_PER_NODE": str(ranks_per_node)}


def _metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())


@dataclass(frozen=True)
class Runs:
    """The launcher runs the tests check, by output_dir, and the two-node job."""

    two_nodes: Path
    one_node: Path
    elastic: Path
    two_node_job: Job


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory) -> Runs:
    """One CPU rank on each of the two nodes, signalled as before the time limit once training is under way; then,
    side by side, one on each node: two ranks on one node with the same flags, uninterrupted, and the two-node run's
    middle checkpoint continued on one rank. One two-node job for two tests keeps them within their time."""
    root = tmp_path_factory.mktemp("runs")
    job, log = _submit_run(cluster, root, "two_nodes", 2, 1)
    # Logged once every rank handles the signal, just before the first step; not tqdm's count, which srun passes
    # on only at the next newline (the step-4 checkpoint's log line), too close to the end of 8 steps.
    training = re.compile(r"\d+ training examples, 2 rank\(s\)")
    deadline = time.time() + 300
    while not training.search(log.read_text(errors="replace") if log.exists() else ""):
        assert time.time() < deadline and cluster.job_field(job, "JobState") in {"PENDING", "RUNNING"}, _tail(log)
        time.sleep(0.2)
    cluster.signal_steps(job, "USR1")
    two_nodes = _ended(cluster, job, log, timeout=600)
    assert two_nodes.state == "COMPLETED", two_nodes.log[-5000:]

    checkpoint = root / "two_nodes" / "checkpoints" / f"step-{SAVE_STEPS}"
    # One rank with accumulation 2 keeps the global batch of 8: the same schedule continues.
    elastic = ["--resume_from_checkpoint", str(checkpoint), "--elastic_resume", "--gradient_accumulation_steps", "2"]
    side_by_side = [_submit_run(cluster, root, "one_node", 1, 2), _submit_run(cluster, root, "elastic", 1, 1, elastic)]
    for job, log in side_by_side:
        ended = _ended(cluster, job, log, timeout=600)
        assert ended.state == "COMPLETED", ended.log[-5000:]
    return Runs(root / "two_nodes", root / "one_node", root / "elastic", two_nodes)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:] if log.exists() else ""


@pytest.mark.slow
def test_two_nodes_train_to_the_end_with_the_metrics_of_two_ranks_on_one_node(runs):
    two, one = _metrics(runs.two_nodes), _metrics(runs.one_node)
    assert two["world_size"] == one["world_size"] == 2 and two["final"]["step"] == STEPS
    # Routing is a function of seed, pass and layer, and a rank's data shard of rank and world size: where the
    # ranks run changes nothing.
    for key in ("final", "best", "train_task_loss"):
        assert two[key] == one[key], key
    assert (runs.two_nodes / "adapter" / "adapter_model.safetensors").stat().st_size > 0


@pytest.mark.slow
def test_the_two_node_checkpoint_continues_elastically_on_one_node(runs):
    metrics = _metrics(runs.elastic)
    assert metrics["world_size"] == 1 and metrics["resumed_from_step"] == SAVE_STEPS and metrics["final"]["step"] == STEPS
    elastic = metrics["elastic_resume"]
    assert (elastic["from_world_size"], elastic["to_world_size"], elastic["step"]) == (2, 1, SAVE_STEPS)


@pytest.mark.slow
def test_time_limit_signal_on_two_nodes_checkpoints_requeues_and_resumes_to_the_uninterrupted_metrics(cluster, runs):
    job = runs.two_node_job
    assert cluster.job_field(job.id, "Restarts") == "1", job.log[-5000:]
    assert "requeueing job" in job.log and "resumed from" in job.log, job.log[-5000:]
    resumed, uninterrupted = _metrics(runs.two_nodes), _metrics(runs.one_node)
    assert 0 < resumed["resumed_from_step"] < STEPS and resumed["world_size"] == 2
    assert resumed["final"] == uninterrupted["final"] and resumed["best"] == uninterrupted["best"]
