"""Known, harmless warnings of megatron-core 0.16.1 and torch on the setups we run, silenced by
exact message so that everything else still shows, and reported once, in one line, by us.

- Fallbacks: without Transformer Engine and Apex (always on CPU), megatron-core warns at the
  import of each optimizer, clip-grad, norm and FSDP module, in every process (ranks and
  dist_checkpointing's writer processes alike). `fallback_report()` is the one line instead.
- "Unknown MLP type ... Using default kwargs": megatron-core's TransformerLayer logs it for
  every layer whose MLP spec is not one of megatron's own classes, i.e. every MoMa and MoT layer.
- megatron-core's own optimizer reads `.grad` of a non-leaf tensor in `zero_grad` (its source
  says so: "throws grad-access warning"); on CPU the access is attributed to our
  `platform/cpu.py`, which runs the call.
- megatron-core 0.16.1 calls `torch.distributed.all_gather_into_tensor` and
  `reduce_scatter_tensor`, which torch 2.13 deprecates.

`silence()` runs when `megatron_moma` is imported, before megatron-core is: in every rank and in
the processes dist_checkpointing spawns too, since each of them imports our entry module first.
"""

import importlib.util
import logging
import re
import warnings
from typing import Optional

# (category, start of the message, start of the name of the module it is attributed to).
_KNOWN_WARNINGS = (
    (UserWarning, "Transformer Engine and Apex are not installed", "megatron.core"),
    (UserWarning, "Apex is not installed", "megatron.core"),
    (UserWarning, "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed",
     "megatron_moma.platform.cpu"),
    (UserWarning, "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed",
     "megatron.core.optimizer.optimizer"),
    (FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated",
     "torch.distributed.c10d_logger"),
    (FutureWarning, "`torch.distributed.reduce_scatter_tensor` is deprecated",
     "torch.distributed.c10d_logger"),
)
_UNKNOWN_MLP_LOGGER = "megatron.core.transformer.transformer_layer"
_UNKNOWN_MLP_MESSAGE = "Unknown MLP type"


class _DropUnknownMlpType(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_UNKNOWN_MLP_MESSAGE)


def silence() -> None:
    """Install the filters in this process (idempotent)."""
    for category, message, module in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category,
                                module=re.escape(module))
    logger = logging.getLogger(_UNKNOWN_MLP_LOGGER)
    if not any(isinstance(f, _DropUnknownMlpType) for f in logger.filters):
        logger.addFilter(_DropUnknownMlpType())


def fallback_report() -> Optional[str]:
    """The one line that stands for the fallback warnings silenced above, or None when
    Transformer Engine or Apex is installed."""
    if any(importlib.util.find_spec(name) is not None for name in ("transformer_engine", "apex")):
        return None
    return ("megatron-moma: Transformer Engine and Apex are not installed: megatron-core uses "
            "torch's optimizers, norms and multi-tensor ops (expected on CPU; install "
            "megatron-moma[te] on GPU machines for the fused kernels)")
