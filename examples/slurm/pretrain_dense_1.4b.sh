#!/bin/bash
#SBATCH --job-name=dense-1.4b
#SBATCH --nodes=32
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
# The FLOP-matched dense baseline of MoMa 1.4B (docs/layers.md §8): 24 layers / d 2048 /
# ffn 8192 / 16 heads, same data and schedule. Resubmit the same script to resume.
# Submit from the repository root (Slurm runs a copy of this script from its spool folder).
# --requeue: after a preemption or `scontrol requeue` (Slurm's SIGTERM: the trainers save and
# exit) the job restarts from that checkpoint; --open-mode=append keeps every start's output. For
# the time limit set EXIT_DURATION_IN_MINS=2850 (47.5 h) or add `#SBATCH --signal=TERM@300`.
source "${MOMA_ROOT:-$SLURM_SUBMIT_DIR}/examples/slurm/common.sh"
NAME=dense_1.4b
TP=${TP:-1}
MODEL_ARGS=(--num-layers 24 --hidden-size 2048 --ffn-hidden-size 8192 --num-attention-heads 16
            "${CHAMELEON_SHAPE_ARGS[@]}")
MOMA_ARGS=(--architecture dense)
TRAINING_ARGS=("${PAPER_TRAINING_ARGS[@]}")
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size "$TP")
if [ "$TP" -gt 1 ]; then MODEL_PARALLEL_ARGS+=(--sequence-parallel); fi
launch
