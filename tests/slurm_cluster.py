"""Real Slurm clusters on this machine for tests, each with its own munged; every daemon is stopped by its pid.

``LocalSlurm``: one node on localhost. ``TwoNodeSlurm``: nodes ``n1`` and ``n2``, each in its own network, UTS and
mount namespace with a veth address on a private subnet that exists only inside those namespaces (nothing is
routed anywhere else); slurmctld runs on ``n1``. Both need root and Debian's ``slurmd slurmctld slurm-client
munge`` packages (``make test`` installs them); the two-node cluster also needs ``ip netns`` (iproute2).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import free_port

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _stop(pids: list[int | None]) -> None:
    """SIGTERM every process of ``pids`` (``None``: never started) at once, SIGKILL those still there after 5 s."""
    running = []
    for pid in pids:
        try:
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
                running.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.time() + 5
    while running and time.time() < deadline:
        time.sleep(0.1)
        running = [pid for pid in running if _alive(pid)]
    for pid in running:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Munge:
    """A munged of its own (key, socket, pid file in ``directory``): clusters never share one, so a test that ends
    never stops the daemon another test's cluster still authenticates with."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "munge.socket"
        self.pid_file = directory / "munged.pid"

    def start(self) -> None:
        """Write a fresh key, start munged and check that a credential round-trips."""
        self.directory.mkdir(parents=True, exist_ok=True)
        key = self.directory / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        d = self.directory
        subprocess.run(
            ["munged", "--force", f"--key-file={key}", f"--socket={self.socket}", f"--pid-file={self.pid_file}",
             f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"],
            check=True, capture_output=True,
        )  # fmt: skip
        token = subprocess.run(["munge", "-n", "-S", str(self.socket)], capture_output=True, timeout=10, check=True).stdout
        if subprocess.run(["unmunge", "-S", str(self.socket)], input=token, capture_output=True, timeout=10).returncode != 0:
            raise RuntimeError(f"munged started but munge -n | unmunge fails; see {d / 'munged.log'}")

    def pid(self) -> int | None:
        """munged's pid; None when it never started."""
        return _pid(self.pid_file)


@dataclass(frozen=True)
class Node:
    """A slurm.conf node: its name, the address its daemons are reached at (None: the name) and its CPUs."""

    name: str
    addr: str | None
    cpus: int


class SlurmCluster:
    """What both clusters share: the configuration, munged, the wait for idle nodes, jobs and their states.

    ``start()`` brings it up (``stop()`` undoes whatever part of it started, also after a failed start); clients run
    through ``client()``, with ``env`` (``SLURM_CONF`` set).
    """

    def __init__(
        self, state_dir: Path, nodes: list[Node], controller: str, ports: tuple[int, int], first_job_id: int, gpus_per_node: int = 0
    ) -> None:
        self.state_dir = state_dir
        self.first_job_id = first_job_id
        self.nodes = nodes
        self.controller = controller
        self.ports = ports
        self.gpus_per_node = gpus_per_node
        self.conf = state_dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.munge = Munge(state_dir / "munge")

    def client(self, argv: list[str]) -> list[str]:
        """The command line that runs the Slurm client command ``argv`` where it reaches slurmctld."""
        return argv

    def _start_daemons(self) -> None:
        raise NotImplementedError

    def _daemon_pids(self) -> list[int | None]:
        files = [self.state_dir / f"slurmd-{node.name}.pid" for node in self.nodes] + [self.state_dir / "slurmctld.pid"]
        return [_pid(path) for path in files] + [self.munge.pid()]

    def _stop_daemons(self) -> None:
        _stop(self._daemon_pids())

    def _write_config(self) -> None:
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 * 9 // 10
        d = self.state_dir
        (d / "slurmctld").mkdir(parents=True, exist_ok=True)
        gres = f" Gres=gpu:{self.gpus_per_node}" if self.gpus_per_node else ""
        lines = [
            "ClusterName=local",
            f"SlurmctldHost={self.controller}",
            "AuthType=auth/munge",
            # cred_expire is also how long a requeued job waits before it may start again (default 120 s).
            f"AuthInfo=socket={self.munge.socket},cred_expire=10",
            "ProctrackType=proctrack/linuxproc",
            # Binds each task to the CPUs Slurm gave it, so that a test sees what a step really has.
            "TaskPlugin=task/affinity",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "SlurmUser=root",
            # Pending jobs (a requeued one among them) start within seconds, not at the next 60 s scheduling pass.
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            # Job ids pick train.sbatch's rendezvous port and with it the names of DeepSpeed's shared-memory buffers:
            # the clusters number their jobs apart, so that two of them running at once never share one.
            f"FirstJobId={self.first_job_id}",
            f"SlurmctldPort={self.ports[0]}",
            f"SlurmdPort={self.ports[1]}",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd-%n.pid",
            f"SlurmdSpoolDir={d}/slurmd-%n",
            f"StateSaveLocation={d}/slurmctld",
            f"SlurmctldLogFile={d}/slurmctld.log",
            f"SlurmdLogFile={d}/slurmd-%n.log",
            *(["GresTypes=gpu"] if self.gpus_per_node else []),
            *(
                f"NodeName={node.name}{f' NodeAddr={node.addr}' if node.addr else ''} CPUs={node.cpus} RealMemory={memory_mb}{gres} State=UNKNOWN"
                for node in self.nodes
            ),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        for node in self.nodes:
            (d / f"slurmd-{node.name}").mkdir(exist_ok=True)
        if self.gpus_per_node:
            # Plain files stand for the GPUs: Slurm allocates and counts them (SLURM_GPUS_ON_NODE), nothing opens them.
            devices = d / "gpus"
            devices.mkdir(exist_ok=True)
            for index in range(self.gpus_per_node):
                (devices / f"gpu{index}").touch()
            (d / "gres.conf").write_text(f"Name=gpu File={devices}/gpu[0-{self.gpus_per_node - 1}]\n")

    def start(self) -> None:
        """Bring the cluster up and wait until every node is idle."""
        self.munge.start()
        self._write_config()
        self._start_daemons()
        deadline = time.time() + 60
        while time.time() < deadline:
            states = self._run(["sinfo", "-h", "-N", "-o", "%T"]).stdout.split()
            if states == ["idle"] * len(self.nodes):
                return
            time.sleep(0.5)
        raise RuntimeError(f"slurm nodes never all became idle (states {states}); see {self.state_dir}")

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop the daemons this cluster started (munged too), by the pids they wrote."""
        if (self.state_dir / "slurmctld.pid").exists():
            self._run(["scancel", "--full", "--user=root"])
            deadline = time.time() + 15
            while self._run(["squeue", "-h"]).stdout.strip() and time.time() < deadline:
                time.sleep(0.5)
        self._stop_daemons()

    def _run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.client(argv), env=kwargs.pop("env", self.env), capture_output=True, text=True, **kwargs)

    def submit(self, script: Path, script_args: list[str], sbatch_options: list[str], cwd: Path, extra_env: dict[str, str]) -> int:
        """``sbatch [options] script [args]`` and return the job id."""
        argv = ["sbatch", "--parsable", *sbatch_options, str(script), *script_args]
        completed = self._run(argv, env={**self.env, **extra_env}, cwd=cwd, check=True)
        return int(completed.stdout.strip().split(";")[0])

    def signal_steps(self, job_id: int, signal_name: str) -> None:
        """Send a signal to every job step (not the batch shell), as ``--signal`` does at the time limit."""
        self._run(["scancel", f"--signal={signal_name}", str(job_id)], check=True)

    def job_field(self, job_id: int | str, name: str) -> str:
        """One ``Name=value`` field of ``scontrol show job`` (``JobState``, ``Restarts``, ...)."""
        for token in self._run(["scontrol", "show", "job", str(job_id)]).stdout.split():
            if token.startswith(f"{name}="):
                return token.split("=", 1)[1]
        return "UNKNOWN"

    def wait(self, job_id: int, timeout: float) -> str:
        """Wait until the job ends; return its final state."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in FINAL_STATES:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job_field(job_id, 'JobState')} after {timeout} s")


class LocalSlurm(SlurmCluster):
    """One node on localhost, named by ``hostname`` (slurmd matches its node by it)."""

    def __init__(self, state_dir: Path) -> None:
        host = socket.gethostname()
        super().__init__(state_dir, [Node(host, None, os.cpu_count() or 1)], host, (free_port(), free_port()), first_job_id=1)

    def _start_daemons(self) -> None:
        subprocess.run(["slurmctld"], env=self.env, check=True)
        subprocess.run(["slurmd"], env=self.env, check=True)


class NamespacesUnavailable(RuntimeError):
    """This machine does not let the tests create network namespaces (not root, or no CAP_SYS_ADMIN)."""


class TwoNodeSlurm(SlurmCluster):
    """Nodes ``n1`` and ``n2``, each a network namespace joined to the other by a veth pair on ``10.41.0.0/24``, with
    its own hostname (UTS namespace) and mount namespace; slurmctld and one slurmd on ``n1``, one slurmd on ``n2``.

    The NodeNames resolve to no address (there is no DNS in the namespaces and nothing in ``/etc/hosts``): only
    the NodeAddr reaches a node, so what a job does with a NodeName instead of a NodeAddr fails here.
    """

    SUBNET = "10.41.0"

    def __init__(self, state_dir: Path, cpus_per_node: int, gpus_per_node: int = 0) -> None:
        nodes = [Node(f"n{i}", f"{self.SUBNET}.{i}", cpus_per_node) for i in (1, 2)]
        # Each namespace has ports of its own: Slurm's defaults are free there.
        super().__init__(state_dir, nodes, f"n1({nodes[0].addr})", (6817, 6818), first_job_id=5000, gpus_per_node=gpus_per_node)
        tag = f"adamix{os.getpid()}"
        self.netns = {node.name: f"{tag}-{node.name}" for node in nodes}
        self.veth = {node.name: f"am{os.getpid()}{node.name}" for node in nodes}  # at most 15 characters

    def client(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns['n1']}", *argv]

    def node_command(self, node: str, argv: list[str]) -> list[str]:
        """The command line that runs ``argv`` inside ``node``'s namespaces (network, hostname, mounts)."""
        pid = int((self.state_dir / f"slurmd-{node}.pid").read_text())
        return ["nsenter", f"--target={pid}", "--net", "--uts", "--mount", *argv]

    def _create_network(self) -> None:
        n1, n2 = (node.name for node in self.nodes)
        try:
            subprocess.run(["ip", "netns", "add", self.netns[n1]], check=True, capture_output=True, text=True)
        except FileNotFoundError as error:
            raise NamespacesUnavailable("ip (iproute2) is not installed") from error
        except subprocess.CalledProcessError as error:
            raise NamespacesUnavailable(f"ip netns add failed: {error.stderr.strip()}") from error
        ip = ["ip"]
        commands = [
            [*ip, "netns", "add", self.netns[n2]],
            [*ip, "link", "add", self.veth[n1], "netns", self.netns[n1], "type", "veth", "peer", "name", self.veth[n2], "netns", self.netns[n2]],
        ]  # fmt: skip
        for node in self.nodes:
            ns = ["-n", self.netns[node.name]]
            commands += [
                [*ip, *ns, "addr", "add", f"{node.addr}/24", "dev", self.veth[node.name]],
                [*ip, *ns, "link", "set", "lo", "up"],
                [*ip, *ns, "link", "set", self.veth[node.name], "up"],
            ]
        for command in commands:
            subprocess.run(command, check=True, capture_output=True)

    def _start_daemons(self) -> None:
        self._create_network()
        for node in self.nodes:
            daemons = "slurmctld && slurmd" if node.name == "n1" else "slurmd"
            # unshare --mount: a node's mounts are its own (a test can hide a directory from one node); slave
            # propagation still shows it this machine's mounts.
            subprocess.run(
                ["nsenter", f"--net=/run/netns/{self.netns[node.name]}", "unshare", "--uts", "--mount", "--propagation", "slave",
                 "sh", "-c", f'hostname "$1" && {daemons}', "sh", node.name],
                env=self.env, check=True, capture_output=True,
            )  # fmt: skip

    def _stop_daemons(self) -> None:
        super()._stop_daemons()
        # Whatever a job left in a namespace (a step whose slurmstepd is gone) was started by this cluster.
        pids = [
            subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split() for name in self.netns.values()
        ]
        _stop([int(pid) for listed in pids for pid in listed])
        for name in self.netns.values():
            # Deleting a namespace deletes the veth end in it, and with it the pair.
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
