"""Layer spec of a MoMa transformer layer: Megatron's local GPT layer with a MoMa MLP."""

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_moma.layers.moma import MoMaMLP, MoMaSubmodules


def moma_mlp_spec() -> ModuleSpec:
    """A MoMa MLP whose experts are Megatron's local MLPs."""
    return ModuleSpec(
        module=MoMaMLP,
        submodules=MoMaSubmodules(
            experts=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
        ),
    )


def get_moma_layer_spec(normalization: str = "RMSNorm", qk_layernorm: bool = False) -> ModuleSpec:
    """Megatron's local (non-Transformer-Engine) GPT layer whose MLP is `MoMaMLP`."""
    spec = get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)
    spec.submodules.mlp = moma_mlp_spec()
    return spec
