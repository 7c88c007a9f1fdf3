#!/bin/bash
#SBATCH --job-name=moma-mod-1.4b
#SBATCH --nodes=32
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
# MoMa 4t4i + Mixture-of-Depths, 1.4B-matched (docs/layers.md §8): 32 layers / d 2304 /
# 18 heads, MoD on alternating layers from layer 0 at capacity 0.25, auxiliary routers built
# for causal inference. Resubmit the same script to resume.
# Submit from the repository root (Slurm runs a copy of this script from its spool folder).
# --requeue: after a preemption or `scontrol requeue` (Slurm's SIGTERM: the trainers save and
# exit) the job restarts from that checkpoint; --open-mode=append keeps every start's output. For
# the time limit set EXIT_DURATION_IN_MINS=2850 (47.5 h) or add `#SBATCH --signal=TERM@300`.
source "${MOMA_ROOT:-$SLURM_SUBMIT_DIR}/examples/slurm/common.sh"
NAME=moma_mod_1.4b
TP=${TP:-1}
EP=${EP:-4}
MODEL_ARGS=(--num-layers 32 --hidden-size 2304 --ffn-hidden-size 9216 --num-attention-heads 18
            "${CHAMELEON_SHAPE_ARGS[@]}")
MOMA_ARGS=(--architecture moma --moma-experts-per-modality 4 4 --mod --mod-capacity 0.25)
TRAINING_ARGS=("${PAPER_TRAINING_ARGS[@]}")
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --expert-model-parallel-size "$EP")
if [ "$TP" -gt 1 ]; then MODEL_PARALLEL_ARGS+=(--sequence-parallel); fi
launch
