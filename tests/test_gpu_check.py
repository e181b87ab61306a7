"""``benchmarks/gpu_check.sh`` (``make gpu-check``) on a machine without a GPU: one line, exit 0, nothing written."""

from __future__ import annotations

import subprocess

import pytest
import torch

from conftest import REPO_ROOT, subprocess_env


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present, so the check would run")
def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    env = subprocess_env()
    env["REPORT"] = str(tmp_path / "report.md")
    completed = subprocess.run(["make", "-s", "gpu-check"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert (completed.stdout + completed.stderr).strip().splitlines() == ["gpu_check: no CUDA GPU on this machine: nothing to check"]
    assert not (tmp_path / "report.md").exists()
