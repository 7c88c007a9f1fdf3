"""Checkpoint conversion: a pretrain_moma checkpoint (any parallel layout) read into one whole
model, written to and read from Hugging Face folders (`moma-convert`), and Megatron's logits of
a checkpoint for comparison with the exported model."""
