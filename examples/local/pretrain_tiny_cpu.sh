#!/bin/bash
# The main job: a tiny MoMa 2t2i model (MoMa with 2 text and 2 image experts, expert choice)
# pretrained on CPU with 2 gloo processes under expert parallelism, on the bundled digits corpus.
#   1. moma-sample-data: 1,797 handwritten digits as 8x8 images of 8 gray-level codes + captions;
#   2. moma-preprocess: Megatron indexed dataset + vocabulary sidecar;
#   3. pretrain_moma under torchrun: trains, evaluates, saves to $CKPT (run again to resume).
# Every setting below can be overridden from the environment, e.g. TRAIN_ITERS=50 EP=1 TP=2 ...
set -euo pipefail

DATA_DIR=${DATA_DIR:-data/digits}
CKPT=${CKPT:-checkpoints/tiny_moma_cpu}
NPROC=${NPROC:-2}
TP=${TP:-1}
EP=${EP:-2}
TRAIN_ITERS=${TRAIN_ITERS:-400}
DATA_PREFIX=$DATA_DIR/digits_text_document
# One thread per rank (torchrun's default, set here so that it does not warn about it).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ ! -f "$DATA_PREFIX.idx" ]; then
    moma-sample-data --output-dir "$DATA_DIR"
    moma-preprocess --input "$DATA_DIR/digits.jsonl" --output-prefix "$DATA_DIR/digits" \
        --codebook-size 8 --codes-per-image 64 --append-eod --workers 2
fi

DISTRIBUTED_ARGS=(--standalone --nproc-per-node "$NPROC")

MODEL_ARGS=(
    --num-layers 4 --hidden-size 128 --ffn-hidden-size 256 --num-attention-heads 4
    --seq-length 128 --max-position-embeddings 128 --position-embedding-type rope
    --normalization RMSNorm --swiglu --disable-bias-linear --untie-embeddings-and-output-weights
    --hidden-dropout 0 --attention-dropout 0
)

MOMA_ARGS=(
    --architecture moma --moma-experts-per-modality 2 2 --moma-capacity-factor 1.0
)

DATA_ARGS=(--data-path "$DATA_PREFIX" --split 95,5,0)

TRAINING_ARGS=(
    --device cpu --micro-batch-size 8 --global-batch-size 16 --train-iters "$TRAIN_ITERS"
    --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-fraction 0.05 --weight-decay 0.1
    --clip-grad 1.0 --adam-beta2 0.95 --use-distributed-optimizer --exit-signal-handler
)

MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size "$TP" --expert-model-parallel-size "$EP"
)
if [ "$TP" -gt 1 ]; then MODEL_PARALLEL_ARGS+=(--sequence-parallel); fi

LOGGING_ARGS=(
    --log-interval 20 --eval-interval 100 --eval-iters 5
    --save "$CKPT" --load "$CKPT" --save-interval 200 --tensorboard-dir "$CKPT/tensorboard"
)

torchrun "${DISTRIBUTED_ARGS[@]}" -m megatron_moma.training.pretrain_moma \
    "${MODEL_ARGS[@]}" "${MOMA_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAINING_ARGS[@]}" \
    "${MODEL_PARALLEL_ARGS[@]}" "${LOGGING_ARGS[@]}"
