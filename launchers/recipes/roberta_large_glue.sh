#!/usr/bin/env bash
# RoBERTa-large + AdaMix (r=16, M=4) on a GLUE task with the paper's hyper-parameters (ADAMIX_SPEC.md §6):
# lr 3e-4, 20 epochs, batch 64 in all (8 GPUs x 8), sequence 128, AdamW, weight decay 0.1, warmup 6%, clip 1.0.
#
#   bash launchers/recipes/roberta_large_glue.sh                                    # deepspeed, this node's GPUs
#   sbatch --nodes 1 --gpus-per-node 8 --time 12:00:00 launchers/recipes/roberta_large_glue.sh
#   TASK=mnli bash launchers/recipes/roberta_large_glue.sh --per_device_train_batch_size 16   # 4 GPUs: keep 64 in all
#
# Memory (python -m adamix_ds.plan --model roberta-large --gpus 8 --zero 2 --bf16 --per_device_train_batch_size 8
#   --max_seq_length 128): the 355M backbone costs 0.66 GiB of bf16 weights per GPU; see the planner for the rest.
#SBATCH --job-name=adamix-roberta-large
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=USR1@180
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/../..}"
PRECISION=${PRECISION:-bf16}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
RECIPE_ARGS=(
  --model_name_or_path "${MODEL:-FacebookAI/roberta-large}" --task_name "${TASK:-mnli}"
  --max_seq_length 128 --per_device_train_batch_size 8 --learning_rate 3e-4 --num_train_epochs 20
  --warmup_ratio 0.06 --weight_decay 0.1 --max_grad_norm 1.0
  --method adamix --bottleneck_dim 16 --num_experts 4 --consistency_weight 1.0
  --output_dir "outputs/recipes/roberta_large_${TASK:-mnli}"
)
source launchers/recipes/run_recipe.sh
