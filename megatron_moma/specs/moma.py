"""Layer spec of a MoMa transformer layer: Megatron's GPT layer with a MoMa MLP."""

from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_moma.layers.moma import MoMaMLP, MoMaSubmodules
from megatron_moma.specs.backend import backend_provider, resolve_use_te


def moma_mlp_spec(use_te: bool = False, moe_grouped_gemm: bool = False) -> ModuleSpec:
    """A MoMa MLP whose expert groups are megatron-core expert modules: SequentialMLP of local
    (or Transformer Engine) linears, or TEGroupedMLP with `moe_grouped_gemm` under TE."""
    expert_module, expert_submodules = backend_provider(use_te).grouped_mlp_modules(
        moe_grouped_gemm, False
    )
    return ModuleSpec(
        module=MoMaMLP,
        submodules=MoMaSubmodules(experts=ModuleSpec(module=expert_module,
                                                     submodules=expert_submodules)),
    )


def get_moma_layer_spec(normalization: str = "RMSNorm", qk_layernorm: bool = False,
                        use_te: Optional[bool] = None, moe_grouped_gemm: bool = False) -> ModuleSpec:
    """Megatron's GPT layer whose MLP is `MoMaMLP`: the Transformer Engine layer (a separate
    pre-MLP norm, as for Megatron's MoE layers) when `use_te` (default: TE imports), else local."""
    if resolve_use_te(use_te):
        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=2, qk_layernorm=qk_layernorm)
        use_te = True
    else:
        spec = get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)
        use_te = False
    spec.submodules.mlp = moma_mlp_spec(use_te, moe_grouped_gemm)
    return spec
