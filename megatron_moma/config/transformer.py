"""`ModalityTransformerConfig`: Megatron's TransformerConfig plus the modality-aware options."""

from dataclasses import dataclass, field
from typing import List, Optional

from megatron.core.transformer import TransformerConfig

from megatron_moma.config.fp8 import ExpertFp8Options
from megatron_moma.config.mod import MoDOptions
from megatron_moma.config.moma import MoMaOptions
from megatron_moma.config.mot import MoTOptions
from megatron_moma.modality import ModalityLayout


@dataclass
class ModalityTransformerConfig(TransformerConfig):
    """TransformerConfig with the modality layout and the options of each modality-aware layer.

    `mot` set makes every layer a Mixture-of-Transformers layer (per-modality weights for the
    components in `mot.untie`); `moma` set makes every MLP a MoMa MLP (inside MoT layers too);
    `mod` set makes the layers it names Mixture-of-Depths layers. The MoMa experts are Megatron expert modules, so
    the Megatron MoE fields follow from `moma`: `num_moe_experts` is the total number of
    experts (it also makes Megatron's schedules scale the auxiliary-router loss like the main
    loss), and `moe_ffn_hidden_size` defaults to `ffn_hidden_size`. `expert_tensor_parallel_size`
    keeps Megatron's meaning and default (the TP size): each expert's linears are split over the
    expert-tensor-parallel group.
    `expert_fp8` runs the MoMa expert GEMMs in FP8 without Transformer Engine (with TE, FP8 is
    megatron-core's `fp8` field and its companions).
    """

    modality_layout: ModalityLayout = field(default_factory=ModalityLayout)
    moma: Optional[MoMaOptions] = None
    mot: Optional[MoTOptions] = None
    mod: Optional[MoDOptions] = None
    expert_fp8: Optional[ExpertFp8Options] = None
    # megatron-core's default, "full", is deprecated by megatron-core itself, which warns on every
    # config made with it and then replaces it with this equivalent empty list.
    cuda_graph_scope: List[str] = field(default_factory=list)

    def __post_init__(self):
        if self.expert_fp8 is not None and (self.moma is None or self.fp8):
            raise ValueError("expert_fp8 (FP8 without Transformer Engine) needs MoMa experts, "
                             "and excludes fp8 (Transformer Engine's FP8)")
        if self.mot is not None and self.moma is not None and self.mot.norm_placement == "post":
            raise ValueError("MoT with MoMa MLPs supports norm_placement='pre' only")
        if self.mod is not None and self.mod.layers is not None:
            outside = [layer for layer in self.mod.layers if layer >= self.num_layers]
            if outside:
                raise ValueError(f"MoD layers {outside} do not exist in a {self.num_layers}-layer model")
        uses_index = any(o is not None for o in (self.moma, self.mot, self.mod))
        if uses_index and self.recompute_granularity is not None and self.pipeline_model_parallel_size > 1:
            raise ValueError(
                "activation recompute with pipeline parallelism is not supported with modality-aware "
                "layers yet: a layer recomputed in the backward pass would read the modality index "
                "of a later micro-batch"
            )
        if self.mot is not None and self.mot.qk_layernorm:
            self.qk_layernorm = True  # megatron-core then sums QK-norm grads over TP
        if self.moma is not None:
            self._check_moma()
            self.num_moe_experts = self.moma.num_experts
            self.moe_router_topk = 1  # unused by MoMa; keeps Megatron's MoE checks satisfied
            self.moe_router_pre_softmax = True
            if self.moe_ffn_hidden_size is None and self.ffn_hidden_size is not None:
                self.moe_ffn_hidden_size = self.ffn_hidden_size  # megatron warns, then does this
        super().__post_init__()

    @property
    def architecture(self) -> str:
        """`dense`, `moma`, `mot` or `mot+moma`, with `+mod` when MoD layers are configured."""
        if self.mot is not None:
            name = "mot+moma" if self.moma is not None else "mot"
        else:
            name = "moma" if self.moma is not None else "dense"
        return name + ("+mod" if self.mod is not None else "")

    def _check_moma(self):
        groups = len(self.moma.experts_per_modality)
        if groups != self.modality_layout.num_modalities:
            raise ValueError(
                f"MoMa experts_per_modality {self.moma.experts_per_modality} has {groups} groups but "
                f"the modality layout has {self.modality_layout.num_modalities} modalities "
                f"{self.modality_layout.names}"
            )
        ep = self.expert_model_parallel_size
        for name, experts in zip(self.modality_layout.names, self.moma.experts_per_modality):
            if experts % ep:
                raise ValueError(
                    f"MoMa group {name!r} has {experts} experts, not divisible by "
                    f"expert_model_parallel_size {ep}: every EP rank holds an equal share of every group"
                )
        if (self.moma.routing == "token_choice" and self.sequence_parallel
                and self.moe_router_enable_expert_bias):
            raise ValueError(
                "MoMa token choice with expert bias is not supported under sequence parallelism: "
                "megatron-core 0.16's expert-bias update breaks on the padding mask its "
                "load-balancing loss needs for unequal per-modality token counts"
            )
        if (self.moma.routing == "token_choice" and self.tensor_model_parallel_size > 1
                and not self.sequence_parallel):
            raise ValueError(
                "MoMa token choice with tensor parallelism needs sequence_parallel=True (as "
                "Megatron's MoE does: its load-balancing loss counts tokens over the TP group)"
            )
