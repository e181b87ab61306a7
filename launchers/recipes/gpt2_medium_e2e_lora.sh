#!/usr/bin/env bash
# GPT-2 medium + LoRA on E2E NLG, the reference's baseline run (microsoft/AdaMix NLG/run_train_e2e_lora_only.sh): as
# gpt2_medium_e2e.sh (same optimizer, data, decoding, no backbone dropout, fp32), with one LoRA (r=4, alpha 32, no
# experts, no consistency loss) for 5 epochs with 500 warmup steps; the paper gave AdaMix-LoRA 20 epochs.
#
#   bash launchers/recipes/gpt2_medium_e2e_lora.sh                                  # deepspeed, this node's GPUs
#   sbatch --gpus-per-node 1 --time 8:00:00 launchers/recipes/gpt2_medium_e2e_lora.sh
#SBATCH --job-name=lora-gpt2-medium-e2e
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=USR1@180
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/../..}"
E2E_METHOD=lora
source launchers/recipes/gpt2_medium_e2e.sh
