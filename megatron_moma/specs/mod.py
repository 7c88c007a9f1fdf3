"""Mixture-of-Depths variant of any transformer-layer spec."""

import copy

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_moma.layers.mod import MoDTransformerLayer


def get_mod_layer_spec(layer_spec: ModuleSpec) -> ModuleSpec:
    """`layer_spec` (a TransformerLayer spec: dense, MoMa or MoT) as a MoDTransformerLayer, which
    routes tokens around itself on the layers `config.mod` names and is that layer elsewhere."""
    if layer_spec.module is not TransformerLayer:
        raise ValueError(f"MoD wraps TransformerLayer specs, got {layer_spec.module}")
    spec = copy.copy(layer_spec)
    spec.module = MoDTransformerLayer
    return spec
