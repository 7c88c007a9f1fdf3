"""The auxiliary-loss scale lives on the model's device.

megatron-core keeps the first scale set in a process and copies later ones into it, and its
backward multiplies that scale into the loss's gradient, so a scale on another device than the
loss fails on the first backward (on a GPU: a CPU scale against a CUDA loss). The meta device
stands in for the GPU here: it refuses a CPU operand exactly as CUDA does. The trainer itself on
a GPU is run by tests/test_gpu.py.
"""

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_moma.layers.aux_loss import scale_auxiliary_losses


@pytest.fixture
def fresh_loss_scale(monkeypatch):
    """No scale set yet in this process, as at the start of a run; restored afterwards."""
    monkeypatch.setattr(MoEAuxLossAutoScaler, "main_loss_backward_scale", None)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_auxiliary_loss_gradient_is_scaled_on_the_loss_device(fresh_loss_scale, device):
    scale_auxiliary_losses(4, device)
    output = torch.zeros(3, device=device, requires_grad=True)
    aux_loss = torch.zeros((), device=device, requires_grad=True)
    MoEAuxLossAutoScaler.apply(output, aux_loss).sum().backward()
    assert aux_loss.grad.device.type == device
    if device == "cpu":
        assert aux_loss.grad.item() == 0.25
