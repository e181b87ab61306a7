"""``benchmarks/gpu_check.sh`` (``make gpu-check``) without a GPU: valid shell, one line and exit 0, nothing written,
and step limits that fit its 8 minutes. What it checks on a GPU (NCCL, bf16 on the device, the fused kernel) only a
GPU run shows; ``GPU_CHECK_ON_CPU=1`` runs its journey on a CPU rank by hand (several minutes: not a test)."""

from __future__ import annotations

import re
import subprocess

import pytest
import torch

from conftest import REPO_ROOT, subprocess_env

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.sh"


def test_the_script_is_valid_bash():
    completed = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr


def test_the_step_limits_fit_the_budget_and_8_minutes():
    text = SCRIPT.read_text()
    limits = [int(seconds) for seconds in re.findall(r"^ *step \w+ (\d+)$", text, flags=re.MULTILINE)]
    budget = int(re.search(r"^BUDGET_S=\$\(\((\d+) \* SCALE\)\)$", text, flags=re.MULTILINE).group(1))
    assert len(limits) == 10
    # A step that ignores its TERM is killed 10 s after its limit (timeout -k 10).
    assert sum(limits) <= budget and budget + 10 <= 8 * 60


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present, so the check would run")
def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    env = subprocess_env()
    env["RESULTS_DIR"] = str(tmp_path / "results")
    completed = subprocess.run(["make", "-s", "gpu-check"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert (completed.stdout + completed.stderr).strip().splitlines() == ["gpu_check: no CUDA GPU on this machine: nothing to check"]
    assert not (tmp_path / "results").exists()
