# Sourced by the recipes: runs launchers/train.py with the recipe's RECIPE_ARGS, then the caller's own flags (the
# last occurrence of a flag wins, so any recipe value can be overridden on the command line).
#   inside a Slurm job (sbatch RECIPE.sh): through launchers/slurm/train.sbatch (one torchrun per node,
#     checkpoint and requeue before the time limit; the recipe's #SBATCH lines ask for the signal and requeue)
#   elsewhere: deepspeed on this node (NUM_GPUS, default every GPU; MASTER_PORT; DEEPSPEED, default deepspeed)
# MODEL, TASK and DS_CONFIG override the recipe's backbone, task and DeepSpeed config; PRECISION (fp32, bf16 or
# fp16) its training precision, whose default each recipe sets (a boolean flag cannot be turned off afterwards).
case "${PRECISION:-fp32}" in
  fp32) ;;
  bf16 | fp16) RECIPE_ARGS+=("--$PRECISION") ;;
  *)
    echo "$(basename "$0"): error: PRECISION=$PRECISION is invalid: allowed fp32, bf16, fp16" >&2
    exit 2
    ;;
esac
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  DS_CONFIG="$DS_CONFIG" exec bash launchers/slurm/train.sbatch "${RECIPE_ARGS[@]}" "$@"
fi
exec "${DEEPSPEED:-deepspeed}" ${NUM_GPUS:+--num_gpus "$NUM_GPUS"} ${MASTER_PORT:+--master_port "$MASTER_PORT"} \
  launchers/train.py --deepspeed "$DS_CONFIG" "${RECIPE_ARGS[@]}" "$@"
