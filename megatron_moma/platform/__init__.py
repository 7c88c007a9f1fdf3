"""Where megatron-core runs: CUDA as it is, or CPU with gloo through `cpu.activate()`; and
dist_checkpointing saves that survive a launcher's SIGTERM (`checkpoint_writers`).

This package is the only place in megatron_moma that patches megatron-core or torch.
"""

import torch

from megatron_moma.platform import cpu


def activate_platform() -> str:
    """Prepare megatron-core for this machine; returns the torch.distributed backend to use."""
    if torch.cuda.is_available():
        return "nccl"
    cpu.activate()
    return "gloo"
