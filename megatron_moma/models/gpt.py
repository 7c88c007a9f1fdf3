"""`ModalityGPTModel`: Megatron's GPTModel that hands its layers the micro-batch's modality index."""

from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel

from megatron_moma.modality.context import ModalityContext, attach_context
from megatron_moma.modality.index import ModalityIndex


class ModalityGPTModel(GPTModel):
    """GPTModel (same constructor) with a `modality_ids` forward argument.

    `config` is a ModalityTransformerConfig. `modality_ids` [b, s] come with the batch; when
    absent they are derived from `input_ids` with the config's modality layout (the first
    pipeline stage always has input_ids; later stages need modality_ids from the batch).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.modality_context = ModalityContext()
        attach_context(self, self.modality_context)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor], *args,
                modality_ids: Optional[torch.Tensor] = None, **kwargs):
        layout = self.config.modality_layout
        if modality_ids is None:
            if input_ids is None:
                raise ValueError("ModalityGPTModel.forward needs modality_ids when input_ids is None")
            modality_ids = layout.modality_ids(input_ids)
        self.modality_context.index = ModalityIndex.from_batch(modality_ids, layout.num_modalities)
        return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Megatron's, with layers keyed one by one when only some are MoD layers (their
        parameters differ, so they cannot be stacked along a layer axis)."""
        if getattr(self.config, "mod", None) is not None:
            metadata = dict(metadata or {}, non_homogeneous_layers=True)
        return super().sharded_state_dict(prefix, sharded_offsets, metadata)
