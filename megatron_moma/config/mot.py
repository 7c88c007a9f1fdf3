"""Options of Mixture-of-Transformers layers (docs/layers.md §§6, 7)."""

from dataclasses import dataclass
from typing import FrozenSet

UNTIE_CHOICES = frozenset({"ffn", "attention", "norms"})
NORM_PLACEMENTS = ("pre", "post")


@dataclass(frozen=True)
class MoTOptions:
    """Which parameters of a transformer layer are per modality, and where the norms sit.

    Attributes:
        untie: components with one set of weights per modality: `ffn`, `attention` (Q, K, V and
            output projections, and QK-norms), `norms` (the sublayer norms). The MoT paper's
            ablation: FFN gives most of the gain, attention about a third more on images.
            Tied components share one set of weights across modalities (the dense layer).
        norm_placement: `pre` (Megatron's x + Sublayer(Norm(x))) or `post` (Chameleon's and both
            papers' x + Norm(Sublayer(x))).
        qk_layernorm: normalise q and k over the head dimension (Chameleon's stabiliser).
    """

    untie: FrozenSet[str] = UNTIE_CHOICES
    norm_placement: str = "pre"
    qk_layernorm: bool = False

    def __post_init__(self):
        object.__setattr__(self, "untie", frozenset(self.untie))
        unknown = self.untie - UNTIE_CHOICES
        if unknown:
            raise ValueError(f"MoT untie takes {sorted(UNTIE_CHOICES)}, got unknown {sorted(unknown)}")
        if self.norm_placement not in NORM_PLACEMENTS:
            raise ValueError(
                f"MoT norm_placement must be one of {NORM_PLACEMENTS}, got {self.norm_placement!r}"
            )

    def is_untied(self, component: str) -> bool:
        return component in self.untie
