#!/usr/bin/env bash
# Every GPU check of this project in one command, for the few minutes a GPU is lent (make gpu-check):
#   1. the fused Triton adapter compiled (fp32, fp16, bf16) against eager PyTorch, forward + backward
#   2. benchmarks/kernel_bench.py, the full shape grid (fused vs eager fwd+bwd, achieved bandwidth vs a device copy)
#   3. a 2-step AdaMix run of launchers/train.py on the GPU (bf16, ZeRO-2, DeepSpeed's fused AdamW)
#   4. benchmarks/throughput.py on the GPU (bf16, its default rounds)
# Installs nothing: it uses the venv as it is (PYTHON, default .venv/bin/python). One report, gpu_check.md,
# every step's full output (steps.log), and throughput's JSON, table and plot, all in RESULTS_DIR (default
# benchmarks/results/gpu). Steps run most important first, each under its own time limit; the whole stays
# under 10 min.
# Without a GPU it prints one line and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
RESULTS_DIR=${RESULTS_DIR:-benchmarks/results/gpu}
REPORT=$RESULTS_DIR/gpu_check.md
export PATH="$(dirname "$PYTHON"):$PATH"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU on this machine: nothing to check"
  exit 0
fi

mkdir -p "$RESULTS_DIR"
: >"$RESULTS_DIR/steps.log"
# The weight-loading reports of every spawned process would bury each step's tail in the report.
export TRANSFORMERS_VERBOSITY=error
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=0
{
  echo "# GPU check"
  echo
  "$PYTHON" -c 'import torch; print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")'
} >"$REPORT"

# step NAME LIMIT_S COMMAND...: runs the command with a time limit, appends its output to the report.
step() {
  local name=$1 limit=$2
  shift 2
  echo "gpu_check: $name" >&2
  local start=$SECONDS status
  echo "== $name" >>"$RESULTS_DIR/steps.log"
  # Streamed to steps.log as it runs, so a step cut short still leaves what it printed.
  timeout "$limit" "$@" 2>&1 | tee "$scratch/out" >>"$RESULTS_DIR/steps.log"
  status=${PIPESTATUS[0]}
  {
    echo
    echo "## $name (exit $status, $((SECONDS - start)) s)"
    echo
    echo '```'
    tail -n 60 "$scratch/out"
    echo '```'
  } >>"$REPORT"
  [[ $status -eq 0 ]] || failed=1
}

step "Triton kernel compiled vs eager" 120 "$PYTHON" - <<'PY'
import torch

from adamix_ds.kernels import adapter_forward

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def run(kernel: str, dtype: torch.dtype) -> list[torch.Tensor]:
    import os

    os.environ["ADAMIX_KERNEL"] = kernel
    torch.manual_seed(0)
    h = torch.randn(4096, 1024, device="cuda", dtype=dtype, requires_grad=True)
    params = [
        torch.randn(4, 16, 1024, device="cuda", dtype=dtype).mul_(0.02).requires_grad_(),
        torch.zeros(4, 16, device="cuda", dtype=dtype, requires_grad=True),
        torch.randn(1, 1024, 16, device="cuda", dtype=dtype).mul_(0.02).requires_grad_(),
        torch.zeros(1, 1024, device="cuda", dtype=dtype, requires_grad=True),
    ]
    out = adapter_forward(h, *params, 2, 0, "gelu")
    out.float().square().sum().backward()
    return [out, h.grad, *(p.grad for p in params)]


worst = 0.0
for dtype, tolerance in TOLERANCE.items():
    fused, eager = run("triton", dtype), run("eager", dtype)
    gaps = [((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item() for a, b in zip(fused, eager)]
    print(f"{str(dtype):15s} largest relative gap (output, input grad, expert grads): {max(gaps):.2e} (allowed {tolerance:.0e})")
    assert max(gaps) <= tolerance, (dtype, gaps)
print("fused == eager for fp32, fp16 and bf16")
PY
step "kernel_bench.py (bf16, full grid)" 120 "$PYTHON" benchmarks/kernel_bench.py
# DeepSpeed 0.19.8 JIT-builds its fused AdamW for TORCH_CUDA_ARCH_LIST and cannot parse the arch suffixes CUDA
# images set there ("9.0a": ValueError in compute_capability_args), so the build targets this GPU's capability.
TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') \
  step "2-step AdaMix launcher run (GPU, bf16)" 150 deepspeed --num_gpus 1 launchers/train.py --deepspeed ds_configs/zero2.json --bf16 \
  --task_name sst2 --max_steps 2 --max_train_samples 64 --max_eval_samples 32 --max_seq_length 64 \
  --per_device_train_batch_size 8 --eval_steps 2 --output_dir "$scratch/run"
step "throughput.py (GPU, bf16)" 240 "$PYTHON" benchmarks/throughput.py --out-dir "$RESULTS_DIR" --plot-dir "$RESULTS_DIR"
echo "gpu_check: report in $REPORT" >&2
exit $failed
