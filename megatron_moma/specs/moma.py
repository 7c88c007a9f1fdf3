"""Layer spec of a MoMa transformer layer: Megatron's GPT layer with a MoMa MLP."""

from typing import Optional

from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_moma.config.fp8 import ExpertFp8Options
from megatron_moma.layers.moma import MoMaMLP, MoMaSubmodules
from megatron_moma.specs.backend import expert_spec, resolve_use_te, transformer_layer_spec

# The local GPT layer stores its norms under the keys of Transformer Engine's fused
# layernorm-linears; with a MoMa MLP the pre-MLP norm stays a separate module under TE too
# (TENorm at `pre_mlp_layernorm`), so only the input norm is renamed.
INPUT_NORM_AS_TE_KEY = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}


def moma_mlp_spec(use_te: bool = False, moe_grouped_gemm: bool = False,
                  expert_fp8: Optional[ExpertFp8Options] = None) -> ModuleSpec:
    """A MoMa MLP whose expert groups are built from `backend.expert_spec`."""
    return ModuleSpec(module=MoMaMLP,
                      submodules=MoMaSubmodules(experts=expert_spec(use_te, moe_grouped_gemm,
                                                                    expert_fp8)))


def get_moma_layer_spec(normalization: str = "RMSNorm", qk_layernorm: bool = False,
                        use_te: Optional[bool] = None, moe_grouped_gemm: bool = False,
                        expert_fp8: Optional[ExpertFp8Options] = None,
                        attention_backend: AttnBackend = AttnBackend.auto) -> ModuleSpec:
    """Megatron's GPT layer whose MLP is `MoMaMLP`: the Transformer Engine layer (a separate
    pre-MLP norm, as for Megatron's MoE layers) when `use_te` (default: TE imports), else local;
    its core attention follows `attention_backend` (`specs.backend.core_attention`).
    Local and TE layers save the same checkpoint keys."""
    use_te = resolve_use_te(use_te)
    spec = transformer_layer_spec(use_te, normalization, qk_layernorm, moe=True,
                                  attention_backend=attention_backend)
    if not use_te:
        spec.submodules.sharded_state_dict_keys_map = dict(INPUT_NORM_AS_TE_KEY)
    spec.submodules.mlp = moma_mlp_spec(use_te, moe_grouped_gemm, expert_fp8)
    return spec
