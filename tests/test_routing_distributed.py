"""Routing over two real processes (gloo, DDP): same experts on every rank with no communication."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, free_port, subprocess_env


@pytest.mark.slow
def test_two_ranks_route_identically_for_100_steps(tmp_path):
    output = tmp_path / "routing.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO_ROOT / "tests" / "workers" / "routing_worker.py"),
        str(output),
        "100",
    ]
    completed = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["world_size"] == 2
    for seed in ("0", "1"):
        result = report[seed]
        assert result["routes_equal"], f"seed {seed}: ranks routed differently"
        assert result["every_expert_chosen"] and result["every_expert_got_gradient"]
        assert result["unchosen_exact_zero_grad"] and result["unchosen_unchanged"]
    assert report["0"]["routes"] != report["1"]["routes"], "another seed must give other routes"
