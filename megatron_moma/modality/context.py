"""How modality-aware layers find the modality index of the micro-batch being processed.

A model chunk owns one `ModalityContext`; its forward stores the micro-batch's `ModalityIndex`
there (built once from the batch's modality ids), and every `ModalityAware` layer of the chunk
reads it. Each pipeline stage builds the index from the batch it receives.
"""

from typing import Optional

import torch

from megatron_moma.modality.index import ModalityIndex


class ModalityContext:
    """Holds the modality index of the micro-batch a model chunk is processing."""

    def __init__(self):
        self.index: Optional[ModalityIndex] = None


class ModalityAware:
    """Mixin for modules that read the micro-batch's modality index from their model's context."""

    modality_context: Optional[ModalityContext] = None

    def modality_index(self) -> ModalityIndex:
        if self.modality_context is None or self.modality_context.index is None:
            raise RuntimeError(
                f"{type(self).__name__} has no modality index: build the model with "
                "megatron_moma.models.ModalityGPTModel and pass the batch's modality_ids to forward"
            )
        return self.modality_context.index


def attach_context(model: torch.nn.Module, context: ModalityContext) -> None:
    """Point every ModalityAware submodule of `model` at `context`."""
    for module in model.modules():
        if isinstance(module, ModalityAware):
            module.modality_context = context
