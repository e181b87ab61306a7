#!/usr/bin/env bash
# GPT-2 medium + AdaMix-LoRA on E2E NLG, the reference's run (microsoft/AdaMix NLG/run_train_e2e.sh, src/gpt2_ft.py,
# src/optimizer.py): LoRA r=4, alpha 32, dropout 0.1 on the query and value thirds of the fused c_attn, M=8 experts of
# A (one kaiming-uniform draw copied to all, the default for LoRA) with B shared; consistency weight 100 (the
# task's default); batch 8, lr 2e-4, linear schedule with 2000 warmup steps, 20 epochs, label smoothing 0.1, AdamW
# (0.9, 0.999) with eps 1e-6 and weight decay 0.01 on every trainable parameter, no gradient clipping, fp32, seed
# 110; no dropout in the backbone (the reference's GPT-2 has none: --backbone_dropout 0). Decoded with beam 10,
# length penalty 0.8, no-repeat-ngram 4, at most 64 new tokens, and scored with BLEU, NIST, METEOR, ROUGE-L and
# CIDEr (metrics.json; output_dir/predictions_test.txt for e2e-metrics), once, at the end (decoding dev and test
# after every epoch costs more than the epoch). The LoRA baseline beside it: gpt2_medium_e2e_lora.sh.
#
#   bash launchers/recipes/gpt2_medium_e2e.sh                                       # deepspeed, this node's GPUs
#   sbatch --gpus-per-node 1 --time 24:00:00 launchers/recipes/gpt2_medium_e2e.sh
#   DATA_DIR=/data/e2e bash launchers/recipes/gpt2_medium_e2e.sh   # a folder with trainset.csv, devset.csv, testset_w_refs.csv
#   PRECISION=bf16 bash launchers/recipes/gpt2_medium_e2e.sh                        # faster than the reference's fp32
#
# Data: DATA_DIR, else ../shared/data/e2e beside the repository (no training split: trains on dev, tests on
# test), else the Hub's tuetschek/e2e_nlg (train / validation / test). With 2 GPUs: --per_device_train_batch_size 4.
# Memory: python -m adamix_ds.plan --model gpt2-medium --adapter_type lora --bottleneck_dim 4 --num_experts 8 \
#   --gpus 1 --per_device_train_batch_size 8 --max_seq_length 128   (GPT-2's LM head is tied to the frozen
#   embeddings: the planner's classifier build trains the same state; E2E examples are far shorter than 512)
#SBATCH --job-name=adamix-gpt2-medium-e2e
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=USR1@180
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/../..}"
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
# What differs between AdaMix-LoRA and the LoRA baseline (run_train_e2e_lora_only.sh), which sets E2E_METHOD=lora.
case "${E2E_METHOD:-adamix}" in
  adamix) METHOD_ARGS=(--method adamix --adapter_type lora --num_experts 8 --consistency_weight 100 --num_train_epochs 20 --warmup_steps 2000) ;;
  lora) METHOD_ARGS=(--method lora --num_train_epochs 5 --warmup_steps 500) ;;
  *)
    echo "$(basename "$0"): error: E2E_METHOD=$E2E_METHOD is invalid: allowed adamix, lora" >&2
    exit 2
    ;;
esac
RECIPE_ARGS=(
  --model_name_or_path "${MODEL:-openai-community/gpt2-medium}" --task_name e2e_nlg ${DATA_DIR:+--data_dir "$DATA_DIR"} --seed 110
  --max_seq_length 512 --per_device_train_batch_size 8 --learning_rate 2e-4 "${METHOD_ARGS[@]}"
  --adam_beta1 0.9 --adam_beta2 0.999 --adam_epsilon 1e-6 --weight_decay 0.01 --decay_biases --max_grad_norm 0
  --label_smoothing_factor 0.1 --backbone_dropout 0 --eval_strategy no
  --bottleneck_dim 4 --lora_alpha 32
  --num_beams 10 --length_penalty 0.8 --no_repeat_ngram_size 4 --max_new_tokens 64
  --output_dir "outputs/recipes/gpt2_medium_e2e_${E2E_METHOD:-adamix}"
)
source launchers/recipes/run_recipe.sh
