"""Scaling of the auxiliary losses (router BCE, load balancing) the layers attach to activations.

The layers attach their auxiliary losses with megatron-core's MoEAuxLossAutoScaler, whose
backward scales them like the main loss. megatron-core's schedules set that scale only for models
with `num_moe_experts`; a training loop running MoD-only models calls this before each step.
"""

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler


def scale_auxiliary_losses(num_microbatches: int, device) -> None:
    """Scale auxiliary-loss gradients by 1 / num_microbatches, as megatron-core's schedules scale
    the main loss (per-micro-batch mean losses, summed over the micro-batches of a step).

    `device` is the model's: the backward multiplies the scale into the losses' gradients, and
    megatron-core keeps the scale on the device of the first one set in the process (later
    scales are copied into it), so the first call of a run must name the device."""
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1, device=device) / num_microbatches)
