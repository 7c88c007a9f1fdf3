"""How the benchmarks give Mixture-of-Depths models the dense model's FLOPs per token.

A MoD layer processes only c_d of the tokens, so at equal width a MoD model needs more layers for
the same FLOPs (the MoMa paper: 8 dense layers -> 14 with MoD). Every other architecture here is
matched by construction (experts of the dense FFN's size at capacity factor 1, MoT's per-modality
copies of the dense shapes).
"""

from typing import Callable


def closest_num_layers(flops_of_layers: Callable[[int], float], target: float,
                       dense_layers: int) -> int:
    """The layer count n in dense_layers..4 x dense_layers whose FLOPs per token
    `flops_of_layers(n)` are closest to `target` (the smallest such n on a tie)."""
    return min(range(dense_layers, 4 * dense_layers + 1),
               key=lambda n: abs(flops_of_layers(n) - target))
