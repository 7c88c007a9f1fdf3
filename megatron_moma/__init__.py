"""megatron-moma: modality-aware sparsity (MoMa, MoT, Mixture-of-Depths) for Megatron-Core."""

__version__ = "0.1.0"
