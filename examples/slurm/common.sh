#!/bin/bash
# Sourced by the Slurm scripts of this folder: one torchrun per node (c10d rendezvous on the
# first node), 8 GPUs per node, --save and --load on the same directory so that resubmitting the
# same script (or Slurm requeueing it) resumes from the latest checkpoint, TensorBoard under the
# checkpoint directory. Each script sets NAME and the arrays MODEL_ARGS, MOMA_ARGS, TRAINING_ARGS
# and MODEL_PARALLEL_ARGS, then calls `launch`.
# Overridable from the environment (sbatch passes it on): DATA_PATH (required), CKPT_ROOT,
# GPUS_PER_NODE (processes per node), MASTER_ADDR (default: the NodeAddr of the job's first node,
# from `scontrol show node`), MASTER_PORT, SPLIT, LOG_INTERVAL, EVAL_INTERVAL, EVAL_ITERS,
# SAVE_INTERVAL, EXIT_DURATION_IN_MINS (save and stop that many minutes after the start: set it
# below the job's --time) and EXTRA_ARGS (more pretrain_moma flags, split on spaces, last wins).
# Preemption: SIGTERM from Slurm (scontrol requeue, preemption, --signal before the time limit)
# reaches torchrun and the trainers; --exit-signal-handler saves at the end of the iteration and
# exits 0, within Slurm's KillWait for small models (see the README, "Running on Slurm").
set -euo pipefail

export CUDA_DEVICE_MAX_CONNECTIONS=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
DATA_PATH=${DATA_PATH:?set DATA_PATH to a moma-preprocess output prefix (or a weight/prefix blend)}
CKPT_ROOT=${CKPT_ROOT:-$PWD/checkpoints}
if [ -z "${MASTER_ADDR:-}" ]; then
    MASTER_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
    MASTER_ADDR=$(scontrol show node "$MASTER_NODE" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
    MASTER_ADDR=${MASTER_ADDR:-$MASTER_NODE}
fi
MASTER_PORT=${MASTER_PORT:-29500}
SPLIT=${SPLIT:-998,1,1}
LOG_INTERVAL=${LOG_INTERVAL:-10}
EVAL_INTERVAL=${EVAL_INTERVAL:-1000}
EVAL_ITERS=${EVAL_ITERS:-10}
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
EXIT_DURATION_IN_MINS=${EXIT_DURATION_IN_MINS:-}
EXTRA_ARGS=${EXTRA_ARGS:-}

launch() {
    local ckpt="$CKPT_ROOT/$NAME"
    mkdir -p "$ckpt"
    local distributed_args=(
        --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE"
        --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
    )
    local data_args=(--data-path $DATA_PATH --split "$SPLIT")
    local logging_args=(
        --log-interval "$LOG_INTERVAL" --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS"
        --save-interval "$SAVE_INTERVAL" --save "$ckpt" --load "$ckpt"
        --tensorboard-dir "$ckpt/tensorboard" --log-params-norm --exit-signal-handler
    )
    if [ -n "$EXIT_DURATION_IN_MINS" ]; then
        logging_args+=(--exit-duration-in-mins "$EXIT_DURATION_IN_MINS")
    fi
    local extra_args
    read -r -a extra_args <<< "$EXTRA_ARGS"
    srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
        torchrun "${distributed_args[@]}" -m megatron_moma.training.pretrain_moma \
        "${MODEL_ARGS[@]}" "${MOMA_ARGS[@]}" "${data_args[@]}" "${TRAINING_ARGS[@]}" \
        "${MODEL_PARALLEL_ARGS[@]}" "${logging_args[@]}" "${extra_args[@]}"
}

# docs/layers.md §8: seq 4096, peak LR 1e-4, 4k warm-up, linear decay to 1% of peak,
# 120k steps x 8.39M tokens (2048 sequences of 4096).
PAPER_TRAINING_ARGS=(
    --seq-length 4096 --max-position-embeddings 4096 --micro-batch-size 1
    --global-batch-size 2048 --train-iters "${TRAIN_ITERS:-120000}"
    --lr 1e-4 --min-lr 1e-6 --lr-decay-style linear --lr-warmup-iters 4000
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-5 --clip-grad 1.0
    --bf16 --use-distributed-optimizer --overlap-grad-reduce --seed 1234
)
CHAMELEON_SHAPE_ARGS=(
    --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear
    --untie-embeddings-and-output-weights --hidden-dropout 0 --attention-dropout 0
)
