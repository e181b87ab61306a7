#!/usr/bin/env bash
# GPT-2 medium + AdaMix-LoRA on E2E NLG with the paper's recipe (ADAMIX_SPEC.md §5-§6): LoRA r=4, alpha 32, M=8
# experts of A with B shared, on the query and value thirds of the fused c_attn, lora dropout 0.1; batch 8,
# lr 2e-4, 2000 warmup steps, 20 epochs, label smoothing 0.1, weight decay 0.01, consistency weight 100 (the
# task's default); decoded with beam 10, length penalty 0.8, no-repeat-ngram 4, at most 64 new tokens, and scored
# with BLEU, NIST, METEOR, ROUGE-L and CIDEr (metrics.json; output_dir/predictions_test.txt for e2e-metrics).
# The dev and test sets are decoded once, at the end (decoding both after every epoch costs more than the epoch).
#
#   bash launchers/recipes/gpt2_medium_e2e.sh                                       # deepspeed, this node's GPUs
#   sbatch --gpus-per-node 1 --time 12:00:00 launchers/recipes/gpt2_medium_e2e.sh
#   DATA_DIR=/data/e2e bash launchers/recipes/gpt2_medium_e2e.sh   # a folder with trainset.csv, devset.csv, testset_w_refs.csv
#
# Data: DATA_DIR, else ../shared/data/e2e beside the repository (no training split: trains on dev, tests on
# test), else the Hub's tuetschek/e2e_nlg (train / validation / test). With 2 GPUs: --per_device_train_batch_size 4.
# Memory: python -m adamix_ds.plan --model gpt2-medium --adapter_type lora --bottleneck_dim 4 --num_experts 8 \
#   --gpus 1 --bf16 --per_device_train_batch_size 8 --max_seq_length 128   (GPT-2's LM head is tied to the frozen
#   embeddings: the planner's classifier build trains the same state)
#SBATCH --job-name=adamix-gpt2-medium-e2e
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=USR1@180
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/../..}"
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
RECIPE_ARGS=(
  --model_name_or_path "${MODEL:-openai-community/gpt2-medium}" --task_name e2e_nlg ${DATA_DIR:+--data_dir "$DATA_DIR"} --bf16
  --max_seq_length 128 --per_device_train_batch_size 8 --learning_rate 2e-4 --num_train_epochs 20
  --warmup_steps 2000 --weight_decay 0.01 --label_smoothing_factor 0.1 --max_grad_norm 1.0 --eval_strategy no
  --method adamix --adapter_type lora --bottleneck_dim 4 --lora_alpha 32 --num_experts 8
  --num_beams 10 --length_penalty 0.8 --no_repeat_ngram_size 4 --max_new_tokens 64
  --output_dir "outputs/recipes/gpt2_medium_e2e"
)
source launchers/recipes/run_recipe.sh
