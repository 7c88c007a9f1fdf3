"""Token -> modality (a pure function of the token id) and the per-micro-batch modality index."""

from megatron_moma.modality.index import ModalityIndex
from megatron_moma.modality.layout import Modality, ModalityLayout

__all__ = ["Modality", "ModalityIndex", "ModalityLayout"]
