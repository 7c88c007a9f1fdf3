"""Megatron's logits for given token ids, from a checkpoint: the reference an exported Hugging
Face model is compared with.

    from megatron_moma.conversion.megatron_logits import megatron_logits
    logits = megatron_logits("ckpt", token_ids, moma_inference_routing="aux")  # [b, s, V]

The checkpoint (saved under any layout) is read into a world-size-1 model on the CPU, in eval
mode, so MoMa and MoD route by their inference routing: the run's `--moma-inference-routing` /
`--mod-inference-routing` unless given here (`aux` is causal, like the Hugging Face model;
`expert_choice` / `top_k` look ahead: expert choice ranks all tokens of the batch given, so pass
the trainer's micro-batches one at a time to reproduce its evaluation).
"""

from typing import Optional

import torch

from megatron_moma.conversion.megatron_checkpoint import load_world_size_one_model
from megatron_moma.conversion.world_size_one import world_size_one_parallel_state


@torch.no_grad()
def megatron_logits(checkpoint: str, token_ids: torch.Tensor, *, iteration: Optional[int] = None,
                    moma_inference_routing: Optional[str] = None,
                    mod_inference_routing: Optional[str] = None,
                    dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """token_ids [b, s] int64 -> logits [b, s, padded vocabulary] in fp32.

    `checkpoint`: a checkpoint root (iteration `iteration`, default the tracker's) or one
    `iter_NNNNNNN` folder. `dtype`: compute in this dtype (default: the run's, bf16 or fp32).
    Initialises a one-process torch.distributed group (gloo) if none exists; an existing one
    must have one process.
    """
    from megatron_moma.training.pretrain_moma import initialize_distributed

    initialize_distributed("cpu")
    if torch.distributed.get_world_size() != 1:
        raise RuntimeError("megatron_logits runs in one process; torch.distributed has "
                           f"{torch.distributed.get_world_size()}")
    overrides = {name: value for name, value in (("moma_inference_routing", moma_inference_routing),
                                                 ("mod_inference_routing", mod_inference_routing))
                 if value is not None}
    with world_size_one_parallel_state():
        model = load_world_size_one_model(checkpoint, iteration, overrides).model
        if dtype is not None:
            model = model.to(dtype)
        positions = torch.arange(token_ids.shape[1]).expand_as(token_ids)
        return model(token_ids, positions, None).float()
