"""A one-node Slurm cluster on localhost for tests: munge, slurmctld and slurmd, stopped by pid.

Needs root and Debian's ``slurmd slurmctld slurm-client munge`` packages (``make test`` installs them).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from conftest import free_port

MUNGE_RUN = Path("/run/munge")


def _munge_works() -> bool:
    try:
        token = subprocess.run(["munge", "-n"], capture_output=True, timeout=10, check=True).stdout
        return subprocess.run(["unmunge"], input=token, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _stop(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


class LocalSlurm:
    """Start with ``start()``, submit jobs with ``env`` (``SLURM_CONF`` set), end with ``stop()``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.conf = state_dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._started_munge = False

    def _write_config(self) -> None:
        host = socket.gethostname()
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 * 9 // 10
        d = self.state_dir
        (d / "slurmd").mkdir(parents=True, exist_ok=True)
        (d / "slurmctld").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=local",
                    f"SlurmctldHost={host}",
                    "AuthType=auth/munge",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "ReturnToService=2",
                    "SlurmUser=root",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    f"SlurmctldPidFile={d}/slurmctld.pid",
                    f"SlurmdPidFile={d}/slurmd.pid",
                    f"SlurmdSpoolDir={d}/slurmd",
                    f"StateSaveLocation={d}/slurmctld",
                    f"SlurmctldLogFile={d}/slurmctld.log",
                    f"SlurmdLogFile={d}/slurmd.log",
                    f"NodeName={host} CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN",
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def start(self) -> None:
        """Bring the cluster up and wait until its node is idle."""
        if not _munge_works():
            MUNGE_RUN.mkdir(parents=True, exist_ok=True)
            subprocess.run(["chown", "munge:munge", str(MUNGE_RUN)], check=True)
            subprocess.run(["munged", "--force"], check=True, capture_output=True)
            self._started_munge = True
            if not _munge_works():
                raise RuntimeError("munged started but munge -n | unmunge fails")
        self._write_config()
        subprocess.run(["slurmctld"], env=self.env, check=True)
        subprocess.run(["slurmd"], env=self.env, check=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"slurm node never became idle (state {state!r}); see {self.state_dir}")

    def stop(self) -> None:
        """Stop the daemons this cluster started, by the pids they wrote."""
        _stop(self.state_dir / "slurmd.pid")
        _stop(self.state_dir / "slurmctld.pid")
        if self._started_munge:
            _stop(MUNGE_RUN / "munged.pid")

    def submit(self, script: Path, script_args: list[str], sbatch_options: list[str], cwd: Path, extra_env: dict[str, str]) -> int:
        """``sbatch [options] script [args]`` and return the job id."""
        completed = subprocess.run(
            ["sbatch", "--parsable", *sbatch_options, str(script), *script_args],
            env={**self.env, **extra_env},
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        )
        return int(completed.stdout.strip().split(";")[0])

    def signal_steps(self, job_id: int, signal_name: str) -> None:
        """Send a signal to every job step (not the batch shell), as ``--signal`` does at the time limit."""
        subprocess.run(["scancel", f"--signal={signal_name}", str(job_id)], env=self.env, check=True)

    def job_field(self, job_id: int | str, name: str) -> str:
        """One ``Name=value`` field of ``scontrol show job`` (``JobState``, ``Restarts``, ...)."""
        out = subprocess.run(["scontrol", "show", "job", str(job_id)], env=self.env, capture_output=True, text=True).stdout
        for token in out.split():
            if token.startswith(f"{name}="):
                return token.split("=", 1)[1]
        return "UNKNOWN"

    def wait(self, job_id: int, timeout: float) -> str:
        """Wait until the job ends; return its final state."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}:
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.job_field(job_id, 'JobState')} after {timeout} s")
