#!/usr/bin/env bash
# Every GPU check of this project in one command, for the few minutes a GPU is lent (make gpu-check):
#   1. the fused Triton adapter compiled (fp32, fp16, bf16) against eager PyTorch, forward + backward, routed and
#      stacked, and a captured CUDA graph replayed with the next steps' routing
#   2. benchmarks/kernel_bench.py: the kernel grid (tokens 8k-64k, d 768/1024/1536, r 8-64, bf16) and the stacked
#      consistency case, fused vs eager fwd+bwd, speed-up, achieved bandwidth vs a device copy measured in the same
#      run, and the dispatcher rule those numbers support (to record in RESULTS.md and FUSED_FASTER_RULES)
#   3. benchmarks/stack_step.py: a training step of a 24-layer d = 1024 stack in bf16, AdaMix / single adapter
#      (each fused and eager) / PEFT LoRA
#   4. a 2-step AdaMix run of launchers/train.py on the GPU (bf16, ZeRO-2, DeepSpeed's fused AdamW)
# (benchmarks/throughput.py, MiniLM on SST-2, is not a step: it did not finish in 140 s on an H200 and a lease has
# no room for it; step 3 times the same three methods on a GPU-sized model.)
# Installs nothing: it uses the venv as it is (PYTHON, default .venv/bin/python). One report, gpu_check.md, and
# every step's full output (steps.log), in RESULTS_DIR (default benchmarks/results/gpu). Steps run most important
# first, each under its own time limit; the limits add up to 8.5 min, and the whole takes about 4.
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
    tail -n 80 "$scratch/out"
    echo '```'
  } >>"$REPORT"
  [[ $status -eq 0 ]] || failed=1
}

step "Triton kernel compiled vs eager, and a CUDA-graph replay" 90 "$PYTHON" - <<'PY'
import os

import torch

from adamix_ds.kernels import adapter_forward

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}
ROUTES = {"routed": [(2, 0)], "stacked": [(2, 0), (1, 0)]}


def inputs(dtype: torch.dtype, passes: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [
        torch.randn(passes * 2048, 1024, device="cuda", dtype=dtype),
        torch.randn(4, 16, 1024, device="cuda", dtype=dtype).mul_(0.02),
        torch.randn(4, 16, device="cuda", dtype=dtype).mul_(0.1),
        torch.randn(1, 1024, 16, device="cuda", dtype=dtype).mul_(0.02),
        torch.randn(1, 1024, device="cuda", dtype=dtype).mul_(0.1),
    ]


def run(kernel: str, tensors: list[torch.Tensor], routes) -> list[torch.Tensor]:
    os.environ["ADAMIX_KERNEL"] = kernel
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = adapter_forward(*leaves, routes, "gelu")
    return [out, *torch.autograd.grad(out.float().square().sum(), leaves)]


def gap(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item() for a, b in zip(actual, expected))


for dtype, tolerance in TOLERANCE.items():
    for case, routes in ROUTES.items():
        tensors = inputs(dtype, len(routes))
        worst = gap(run("triton", tensors, routes), run("eager", tensors, routes))
        print(f"{str(dtype):15s} {case:8s} largest relative gap (output, input grad, expert grads): {worst:.2e} (allowed {tolerance:.0e})")
        assert worst <= tolerance, (dtype, case, worst)
print("fused == eager for fp32, fp16 and bf16, routed and stacked")

# One fused forward + backward captured with the routing in a device tensor, replayed after refilling it.
os.environ["ADAMIX_KERNEL"] = "triton"
tensors = inputs(torch.bfloat16, 2)
leaves = [t.clone().requires_grad_() for t in tensors]
routes = torch.tensor([[2, 0], [1, 0]], device="cuda")
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    for _ in range(3):
        torch.autograd.grad(adapter_forward(*leaves, routes, "gelu").float().square().sum(), leaves)
torch.cuda.current_stream().wait_stream(side)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    out = adapter_forward(*leaves, routes, "gelu")
    grads = torch.autograd.grad(out.float().square().sum(), leaves)
for step_routes in ([(3, 0), (0, 0)], [(1, 0), (1, 0)]):
    routes.copy_(torch.tensor(step_routes))
    graph.replay()
    worst = gap([out, *grads], run("eager", tensors, step_routes))
    print(f"CUDA graph replayed with routes {step_routes}: largest relative gap to eager {worst:.2e} (allowed 6e-02)")
    assert worst <= 6e-2, (step_routes, worst)
print("a captured step replays with each step's experts")
PY
step "kernel_bench.py (bf16, kernel grid and stacked case)" 180 "$PYTHON" benchmarks/kernel_bench.py
step "stack_step.py (24 layers, d 1024, bf16)" 120 "$PYTHON" benchmarks/stack_step.py
# DeepSpeed 0.19.8 JIT-builds its fused AdamW for TORCH_CUDA_ARCH_LIST and cannot parse the arch suffixes CUDA
# images set there ("9.0a": ValueError in compute_capability_args), so the build targets this GPU's capability.
TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') \
  step "2-step AdaMix launcher run (GPU, bf16)" 120 deepspeed --num_gpus 1 launchers/train.py --deepspeed ds_configs/zero2.json --bf16 \
  --task_name sst2 --max_steps 2 --max_train_samples 64 --max_eval_samples 32 --max_seq_length 64 \
  --per_device_train_batch_size 8 --eval_steps 2 --output_dir "$scratch/run"
echo "gpu_check: report in $REPORT" >&2
exit $failed
