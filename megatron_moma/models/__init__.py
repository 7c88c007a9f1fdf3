"""Megatron GPT models whose layers know the modality of every token."""

from megatron_moma.models.builder import build_gpt_model, get_layer_spec
from megatron_moma.models.gpt import ModalityGPTModel

__all__ = ["ModalityGPTModel", "build_gpt_model", "get_layer_spec"]
