"""Megatron GPT models whose layers know the modality of every token."""

from megatron_moma.models.gpt import ModalityGPTModel

__all__ = ["ModalityGPTModel"]
