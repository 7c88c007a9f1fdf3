#!/bin/bash
#SBATCH --job-name=mot-7b
#SBATCH --nodes=32
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
# Mixture-of-Transformers 7B, Chameleon setting (docs/layers.md §8): d 4096 / 32 layers /
# 32 heads, every non-embedding parameter untied by modality, Chameleon's post-sublayer norm
# and QK-norm, seq 4096. FFN 11008 is Chameleon 7B's (the MoT paper does not give it).
# Submit from the repository root (Slurm runs a copy of this script from its spool folder).
# --requeue: after a preemption or `scontrol requeue` (Slurm's SIGTERM: the trainers save and
# exit) the job restarts from that checkpoint; --open-mode=append keeps every start's output. For
# the time limit set EXIT_DURATION_IN_MINS=2850 (47.5 h) or add `#SBATCH --signal=TERM@300`.
source "${MOMA_ROOT:-$SLURM_SUBMIT_DIR}/examples/slurm/common.sh"
NAME=mot_7b
TP=${TP:-4}
PP=${PP:-1}
MODEL_ARGS=(--num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32
            --qk-layernorm "${CHAMELEON_SHAPE_ARGS[@]}")
MOMA_ARGS=(--architecture mot --mot-untie ffn attention norms --mot-norm-placement post)
TRAINING_ARGS=("${PAPER_TRAINING_ARGS[@]}")
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP")
if [ "$TP" -gt 1 ]; then MODEL_PARALLEL_ARGS+=(--sequence-parallel); fi
launch
