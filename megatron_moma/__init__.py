"""megatron-moma: modality-aware sparsity (MoMa, MoT, Mixture-of-Depths) for Megatron-Core."""

__version__ = "0.1.0"

from megatron_moma.platform import known_warnings as _known_warnings

_known_warnings.silence()
