"""Configuration of modality-aware models: small option groups inside a TransformerConfig."""

from megatron_moma.config.fp8 import ExpertFp8Options
from megatron_moma.config.mod import MoDOptions
from megatron_moma.config.moma import MoMaOptions
from megatron_moma.config.mot import MoTOptions
from megatron_moma.config.transformer import ModalityTransformerConfig

__all__ = ["ExpertFp8Options", "MoDOptions", "MoMaOptions", "MoTOptions", "ModalityTransformerConfig"]
