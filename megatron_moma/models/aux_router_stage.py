"""The auxiliary-router training stage (docs/layers.md §3): main model frozen, aux routers train.

Freeze before wrapping the model in megatron-core's DDP and building the optimizer: both only
take parameters with `requires_grad=True`.
"""

from typing import Iterable, List

import torch

from megatron_moma.layers.routers import AuxiliaryRouter


def auxiliary_router_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, AuxiliaryRouter) for p in m.parameters()]


def train_only_auxiliary_routers(model_chunks: Iterable[torch.nn.Module]) -> int:
    """Freeze every parameter but those of auxiliary routers; returns how many stay trainable.

    Raises if the model has no auxiliary router (nothing would train).
    """
    trainable = 0
    for chunk in model_chunks:
        keep = {id(p) for p in auxiliary_router_parameters(chunk)}
        for param in chunk.parameters():
            param.requires_grad_(id(param) in keep)
        trainable += len(keep)
    if trainable == 0:
        raise ValueError("the model has no auxiliary routers: build MoMa with aux_router=True "
                         "and routing='expert_choice'")
    return trainable
