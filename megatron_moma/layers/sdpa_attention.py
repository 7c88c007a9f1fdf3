"""Core attention on `torch.nn.functional.scaled_dot_product_attention` (SDPA), for layers built
without Transformer Engine.

A drop-in for megatron-core's local `DotProductAttention` (same constructor, same forward
contract, no parameters): megatron-core's module materialises the [b, heads, s, s] scores and
probabilities; SDPA runs fused kernels that never do (flash, cuDNN or memory-efficient attention
on CUDA; torch's flash kernel for CPU, or its math path). Which SDPA kernels may run follows
`config.attention_backend`, with Megatron-LM's `--attention-backend` names:

| backend | CUDA | CPU |
|---|---|---|
| `auto` | torch's choice (flash, cuDNN, memory-efficient, math) | torch's choice (flash for CPU, math) |
| `flash` | flash attention only | torch's flash kernel for CPU |
| `fused` | cuDNN or memory-efficient attention | refused: these kernels are CUDA-only |
| `unfused` | the math path (scores materialised, like megatron-core's) | the math path |

(`local` is megatron-core's DotProductAttention itself; `specs.backend.core_attention` chooses.)
The softmax scale is megatron-core's: `softmax_scale`, else 1 / sqrt(head dim); query-key layer
scaling leaves the product's scale unchanged there, so it does here. The attention mask is
megatron-core's: boolean, True where a query must not see a key, broadcastable to
[b, heads, sq, sk]; without one, `AttnMaskType.causal` attends causally. Attention dropout runs
inside SDPA, under megatron-core's tensor-parallel RNG state where megatron-core forks it.
"""

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnBackend, AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide
from torch.nn.attention import SDPBackend, sdpa_kernel

# SDPA kernels allowed for each backend name; None: torch chooses among all of them.
CUDA_KERNELS = {
    AttnBackend.auto: None,
    AttnBackend.flash: [SDPBackend.FLASH_ATTENTION],
    AttnBackend.fused: [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
    AttnBackend.unfused: [SDPBackend.MATH],
}
CPU_KERNELS = {
    AttnBackend.auto: None,
    AttnBackend.flash: [SDPBackend.FLASH_ATTENTION],
    AttnBackend.unfused: [SDPBackend.MATH],
}


class SDPACoreAttention(MegatronModule):
    """query [sq, b, heads, d], key and value [sk, b, groups, d] (this rank's heads and query
    groups) -> context [sq, b, heads * d]."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config=config)
        if config.attention_backend not in CUDA_KERNELS:
            raise ValueError(f"SDPACoreAttention runs attention_backend auto, flash, fused or "
                             f"unfused; got {config.attention_backend.name}")
        if config.context_parallel_size != 1:
            raise NotImplementedError("context parallelism needs Transformer Engine's attention")
        if config.softmax_type != "vanilla":
            raise NotImplementedError(f"softmax_type {config.softmax_type!r} needs megatron-core's "
                                      "DotProductAttention (--attention-backend local)")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                     layer_number):
            raise NotImplementedError("sliding-window attention needs --attention-backend local")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.heads_per_rank = divide(config.num_attention_heads, tp)
        self.groups_per_rank = divide(config.num_query_groups, tp)
        self.softmax_scale = (1.0 / math.sqrt(config.kv_channels) if softmax_scale is None
                              else softmax_scale)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention supports neither packed sequences nor an "
                                      "attention bias; use Transformer Engine's attention")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        kernels = self._kernels(query.device)
        grouped = self.heads_per_rank != self.groups_per_rank
        if grouped and self.config.attention_backend == AttnBackend.fused:
            # cuDNN and memory-efficient attention take one key/value head per query head.
            repeat = self.heads_per_rank // self.groups_per_rank
            k, v = (t.repeat_interleave(repeat, dim=1) for t in (k, v))
            grouped = False
        mask = None if attention_mask is None else ~attention_mask
        causal = attention_mask is None and mask_type == AttnMaskType.causal and sq > 1
        dropout = self.dropout if self.training else 0.0
        with contextlib.ExitStack() as stack:
            if kernels is not None:
                stack.enter_context(sdpa_kernel(kernels))
            if dropout > 0 and not self.config.sequence_parallel:
                stack.enter_context(tensor_parallel.get_cuda_rng_tracker().fork())
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                     is_causal=causal, scale=self.softmax_scale,
                                                     enable_gqa=grouped)
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)  # [sq, b, heads * d]

    def _kernels(self, device: torch.device):
        backend = self.config.attention_backend
        if device.type == "cuda":
            return CUDA_KERNELS[backend]
        if backend not in CPU_KERNELS:
            raise ValueError(f"attention_backend {backend.name} (cuDNN / memory-efficient SDPA) "
                             f"runs on CUDA only; on {device.type} use auto, flash or unfused")
        return CPU_KERNELS[backend]
