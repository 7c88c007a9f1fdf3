#!/bin/bash
#SBATCH --job-name=moma-tiny-cpu
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=00:30:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
# The CPU twin of the paper scripts: the same common.sh launch (one torchrun per node, c10d
# rendezvous on the first node) for a tiny MoMa 2t2i model with expert parallelism 2 across the
# two nodes, one gloo process per node. It checks a cluster's Slurm set-up in minutes, and
# tests/test_slurm_*.py run it on a local two-node cluster. Submit from the repository root with
# a dataset from moma-sample-data + moma-preprocess (README, "Running on Slurm"):
#   DATA_PATH=data/digits/digits_text_document sbatch examples/slurm/pretrain_tiny_cpu.sh
# --requeue: a preempted or `scontrol requeue`d job goes back to the queue; Slurm's SIGTERM makes
# the trainer save and exit, and the requeued job resumes from that checkpoint. --open-mode=append
# keeps the output of every start in one file. For the time limit add `#SBATCH
# --signal=TERM@120` (SIGTERM 120 s before it) or set EXIT_DURATION_IN_MINS below --time.
GPUS_PER_NODE=${GPUS_PER_NODE:-1}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SPLIT=${SPLIT:-90,10,0}
LOG_INTERVAL=${LOG_INTERVAL:-1}
EVAL_INTERVAL=${EVAL_INTERVAL:-20}
EVAL_ITERS=${EVAL_ITERS:-2}
SAVE_INTERVAL=${SAVE_INTERVAL:-20}
source "${MOMA_ROOT:-$SLURM_SUBMIT_DIR}/examples/slurm/common.sh"
NAME=moma_tiny_cpu
EP=${EP:-2}
MODEL_ARGS=(--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4
            --seq-length 32 --max-position-embeddings 32 --position-embedding-type rope
            --normalization RMSNorm --swiglu --disable-bias-linear --hidden-dropout 0
            --attention-dropout 0)
MOMA_ARGS=(--architecture moma --moma-experts-per-modality 2 2 --moma-gumbel-noise)
TRAINING_ARGS=(--device cpu --micro-batch-size 2 --global-batch-size 8
               --train-iters "${TRAIN_ITERS:-40}" --lr 3e-3 --min-lr 1e-4 --lr-warmup-iters 2
               --use-distributed-optimizer --seed 7)
MODEL_PARALLEL_ARGS=(--expert-model-parallel-size "$EP")
launch
