"""Options of MoMa, the modality-aware mixture of experts (docs/layers.md §§2, 3, 5)."""

import math
from dataclasses import dataclass
from typing import Tuple

ROUTINGS = ("expert_choice", "token_choice")
INFERENCE_ROUTINGS = ("expert_choice", "aux")


@dataclass(frozen=True)
class MoMaOptions:
    """How the MLP of a MoMa layer routes tokens to per-modality expert groups.

    Attributes:
        experts_per_modality: experts of each modality group, in modality-id order (text first):
            (4, 4) is MoMa 4t4i, (1, 1) is 1t1i.
        routing: `expert_choice` (the paper: each expert takes its top k_e tokens of its modality)
            or `token_choice` (ours: each token takes its top `token_choice_topk` experts of its
            group, Megatron's router semantics).
        capacity_factor: k_e = ceil(capacity_factor * n_M / |E_M|) for expert choice.
        gumbel_noise: training-time Gumbel-sigmoid router noise (for upcycled models).
        inference_routing: how an expert-choice layer routes in eval mode: `expert_choice` (the
            training rule, not causal) or `aux` (each token by its auxiliary router, causal).
        aux_router: build auxiliary routers (needed for `inference_routing="aux"`).
        aux_loss_coeff: weight of the auxiliary routers' binary cross-entropy loss.
    """

    experts_per_modality: Tuple[int, ...] = (1, 1)
    routing: str = "expert_choice"
    capacity_factor: float = 1.0
    gumbel_noise: bool = False
    inference_routing: str = "aux"
    token_choice_topk: int = 1
    aux_router: bool = True
    aux_loss_coeff: float = 1.0

    def __post_init__(self):
        if not self.experts_per_modality or min(self.experts_per_modality) < 1:
            raise ValueError(f"MoMa experts_per_modality must be >= 1 each, got {self.experts_per_modality}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"MoMa routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.inference_routing not in INFERENCE_ROUTINGS:
            raise ValueError(
                f"MoMa inference_routing must be one of {INFERENCE_ROUTINGS}, got {self.inference_routing!r}"
            )
        if self.inference_routing == "aux" and self.routing == "expert_choice" and not self.aux_router:
            raise ValueError("MoMa inference_routing='aux' needs aux_router=True")
        if not self.capacity_factor > 0:
            raise ValueError(f"MoMa capacity_factor must be > 0, got {self.capacity_factor}")
        if not 1 <= self.token_choice_topk <= min(self.experts_per_modality):
            raise ValueError(
                f"MoMa token_choice_topk must be in [1, {min(self.experts_per_modality)}] "
                f"(the smallest group), got {self.token_choice_topk}"
            )

    @property
    def num_experts(self) -> int:
        return sum(self.experts_per_modality)

    def expert_capacity(self, num_tokens: int, num_experts: int) -> int:
        """k_e: tokens each expert of a group of `num_experts` takes among `num_tokens`."""
        return min(num_tokens, math.ceil(self.capacity_factor * num_tokens / num_experts))
