"""ModuleSpecs of modality-aware transformer layers, for Megatron's TransformerBlock."""

from megatron_moma.specs.mod import get_mod_layer_spec
from megatron_moma.specs.moma import get_moma_layer_spec
from megatron_moma.specs.mot import get_mot_layer_spec

__all__ = ["get_mod_layer_spec", "get_moma_layer_spec", "get_mot_layer_spec"]
