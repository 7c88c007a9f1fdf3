"""Options of FP8 expert GEMMs without Transformer Engine (torch's scaled matmuls).

With Transformer Engine, FP8 is megatron-core's own: `TransformerConfig.fp8` (format) and its
`fp8_recipe`, `fp8_margin`, `fp8_amax_history_len`, `fp8_amax_compute_algo` fields, applied by TE
to every TE linear, MoMa's TEGroupedMLP experts included. megatron-core reads `config.fp8` as
"run under TE" (it refuses MoE + fp8 without TE), so the torch-native path has its own option
group, `ModalityTransformerConfig.expert_fp8`, and covers the MoMa expert GEMMs only.
"""

from dataclasses import dataclass

FP8_FORMATS = ("e4m3", "hybrid")
# Megatron-LM's --fp8-recipe choices, all Transformer Engine recipes.
TE_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
# What torch's scaled matmuls do: current scaling per tensor, or per row / output channel.
TORCH_RECIPES = ("tensorwise", "rowwise")
FP8_RECIPES = TE_RECIPES + tuple(r for r in TORCH_RECIPES if r not in TE_RECIPES)


@dataclass(frozen=True)
class ExpertFp8Options:
    """FP8 expert GEMMs on torch's scaled matmuls (forward and input gradient in FP8).

    Attributes:
        format: `e4m3` (activations, weights and gradients in E4M3) or `hybrid` (gradients in
            E5M2), Megatron-LM's `--fp8-format`.
        recipe: `tensorwise` (one scale per activation tensor and per expert weight, from the
            current amax) or `rowwise` (one scale per activation row and per weight output
            channel, finer and the layout of torch's grouped FP8 kernel).
    """

    format: str = "hybrid"
    recipe: str = "rowwise"

    def __post_init__(self):
        if self.format not in FP8_FORMATS:
            raise ValueError(f"FP8 format must be one of {FP8_FORMATS}, got {self.format!r}")
        if self.recipe not in TORCH_RECIPES:
            needs_te = " (a Transformer Engine recipe)" if self.recipe in TE_RECIPES else ""
            raise ValueError(
                f"FP8 recipe {self.recipe!r}{needs_te} is not one torch's scaled matmuls do; "
                f"without Transformer Engine the recipes are {TORCH_RECIPES}"
            )
