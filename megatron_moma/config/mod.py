"""Options of Mixture-of-Depths (docs/layers.md §4)."""

from dataclasses import dataclass
from typing import Optional, Tuple

INFERENCE_ROUTINGS = ("aux", "top_k")
TOPK_SCOPES = ("batch", "sequence")


@dataclass(frozen=True)
class MoDOptions:
    """Which layers route tokens around themselves, and how many tokens they process.

    Attributes:
        capacity: c_d, the share of the scope's tokens a MoD layer processes (top-k by router
            score, k = ceil(c_d * tokens of the scope)); the others skip the layer unchanged.
        topk_scope: `batch` (the MoMa paper's: the top-k of the micro-batch's tokens, so
            sequences keep different numbers) or `sequence` (the MoD paper's: the top-k of
            each sequence).
        layers: 0-based indices of the MoD layers; None is the paper's layout, alternating from
            layer 0 (0, 2, 4, ...).
        aux_router: build the auxiliary router for causal inference.
        inference_routing: eval-mode routing: `aux` (a token is processed iff its auxiliary
            router says > 0.5: causal) or `top_k` (the training rule, which looks ahead).
        aux_loss_coeff: weight of the auxiliary router's binary cross-entropy.
    """

    capacity: float = 0.25
    topk_scope: str = "batch"
    layers: Optional[Tuple[int, ...]] = None
    aux_router: bool = True
    inference_routing: str = "aux"
    aux_loss_coeff: float = 1.0

    def __post_init__(self):
        if not 0.0 < self.capacity <= 1.0:
            raise ValueError(f"MoD capacity must be in (0, 1], got {self.capacity}")
        if self.inference_routing not in INFERENCE_ROUTINGS:
            raise ValueError(
                f"MoD inference_routing must be one of {INFERENCE_ROUTINGS}, got {self.inference_routing!r}"
            )
        if self.topk_scope not in TOPK_SCOPES:
            raise ValueError(f"MoD topk_scope must be one of {TOPK_SCOPES}, got {self.topk_scope!r}")
        if self.inference_routing == "aux" and not self.aux_router:
            raise ValueError("MoD inference_routing='aux' needs aux_router=True")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
            if any(layer < 0 for layer in self.layers):
                raise ValueError(f"MoD layers are 0-based indices, got {self.layers}")

    def routes_layer(self, layer_index: int) -> bool:
        """Whether the layer with 0-based global index `layer_index` is a MoD layer."""
        if self.layers is None:
            return layer_index % 2 == 0
        return layer_index in self.layers
