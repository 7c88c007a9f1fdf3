"""The pretraining entry point and its parts: `arguments` (flags), `configs` (flags -> megatron
objects), `data` (resumable batches), `loop` (steps, evaluation, stopping), `checkpointing`,
`logging` (console + TensorBoard), `flops` (FLOPs per modality), `pretrain_moma` (main)."""
