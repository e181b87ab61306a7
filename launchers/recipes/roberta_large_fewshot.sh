#!/usr/bin/env bash
# RoBERTa-large + AdaMix, prompt-based few-shot at LiST's budget (the paper's few-shot study follows LiST, Wang et
# al. 2021; microsoft/LiST run.sh and src/trainer.py): K = 30 labelled examples in all (LiST's split SEED, trained
# with seed SEED), LM-BFF's template and label words through the pretrained MLM head, the labelled-only stage of
# LiST: 400 steps at batch 4 (50 epochs of 8 batches), AdamW lr 5e-6, weight decay 0, no warmup, linear decay to
# 0, clip 1.0, fp32, sequence 128; no dev set, the last step is scored on the task's test file (test_*).
# From AdaMix, not LiST: the module (bottleneck r=16 on every FFN output, M=4 down experts, up shared, merged at
# inference) and the consistency loss (weight 1), where LiST trains two linear 128-wide adapters per layer. Also
# trained, as LiST trains them: the MLM head's dense, LayerNorm and output bias (--train_lm_head transform).
# LiST's semi-supervised stages (self-training on unlabelled data) are not part of this recipe.
#
#   bash launchers/recipes/roberta_large_fewshot.sh                                 # SST-2, split 1
#   for s in 1 2 3 4 5; do SEED=$s TASK=subj bash launchers/recipes/roberta_large_fewshot.sh; done   # the 5 splits
#   DATA_DIR=/data/list/SST-2/30-{seed} bash launchers/recipes/roberta_large_fewshot.sh   # {seed} becomes SEED
#
# TASK: sst2, rte, mnli, qqp, subj or mpqa (LiST's tasks; MNLI and QQP have no test file here: DATA_DIR with one).
#SBATCH --job-name=adamix-roberta-large-fewshot
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=USR1@180
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/../..}"
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
TASK=${TASK:-sst2}
SEED=${SEED:-1}
case "$TASK" in
  sst2) LIST_FOLDER=SST-2 ;;
  rte | mnli | qqp) LIST_FOLDER=${TASK^^} ;;
  subj | mpqa) LIST_FOLDER=$TASK ;;
  *)
    echo "$(basename "$0"): error: TASK=$TASK is invalid: allowed sst2, rte, mnli, qqp, subj, mpqa" >&2
    exit 2
    ;;
esac
RECIPE_ARGS=(
  --model_name_or_path "${MODEL:-FacebookAI/roberta-large}" --task_name "$TASK" --prompt --seed "$SEED"
  --data_dir "${DATA_DIR:-../shared/data/list/$LIST_FOLDER/30-{seed\}}"
  --max_seq_length 128 --per_device_train_batch_size 4 --max_steps 400 --learning_rate 5e-6
  --warmup_ratio 0 --warmup_steps 0 --weight_decay 0 --max_grad_norm 1.0 --eval_strategy no
  --method adamix --bottleneck_dim 16 --num_experts 4 --consistency_weight 1 --train_lm_head transform
  --output_dir "outputs/recipes/roberta_large_fewshot_${TASK}_30-${SEED}"
)
source launchers/recipes/run_recipe.sh
