"""Which implementation backs our layer specs: Transformer Engine where it imports, local
megatron-core modules otherwise (megatron-core's own BackendSpecProvider choice).

This module is the only place our specs choose between the two:
- `transformer_layer_spec`: megatron-core's GPT layer (TE's fused layernorm-linears, TE core
  attention; or local linears, norms and core attention), the frame of dense and MoMa layers;
- `backend_provider(...).core_attention()`: MoT's global core attention;
- `expert_spec`: MoMa's expert groups: SequentialMLP of TE or local linears, megatron-core's
  TEGroupedMLP with `moe_grouped_gemm` under TE, our `GroupedExpertMLP` (torch's grouped and
  FP8 matmuls) with `moe_grouped_gemm` or `expert_fp8` without TE.

Without TE, megatron-core's extension module still imports and names TE's classes with
placeholders, so the TE choices can be inspected (not built) on any machine.
"""

from typing import Optional

from megatron.core.extensions import transformer_engine as te_modules
from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_moma.config.fp8 import ExpertFp8Options
from megatron_moma.layers.grouped_experts import GroupedExpertMLP


def transformer_engine_available() -> bool:
    return gpt_layer_specs.HAVE_TE


def resolve_use_te(use_te: Optional[bool]) -> bool:
    """`None` picks Transformer Engine when it imports; `True` without it is an error."""
    available = transformer_engine_available()
    if use_te and not available:
        raise RuntimeError(
            "Transformer Engine layer specs were requested but transformer_engine does not import "
            "here; install the [te] extra on a CUDA machine, or pass use_te=False"
        )
    return available if use_te is None else use_te


def backend_provider(use_te: bool) -> BackendSpecProvider:
    return TESpecProvider() if use_te else LocalSpecProvider()


def transformer_layer_spec(use_te: bool, normalization: str, qk_layernorm: bool,
                           moe: bool) -> ModuleSpec:
    """megatron-core's GPT layer spec. Under TE the input norm is fused into the QKV linear
    (TELayerNormColumnParallelLinear); `moe` gives the layer a separate pre-MLP norm (TENorm),
    as megatron-core's MoE layers have, since the MLP is replaced. Locally the norms follow
    `normalization` and are separate modules."""
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=2 if moe else None, qk_layernorm=qk_layernorm
        )
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization=normalization,
                                                   qk_layernorm=qk_layernorm)


def expert_spec(use_te: bool, moe_grouped_gemm: bool,
                expert_fp8: Optional[ExpertFp8Options]) -> ModuleSpec:
    """The spec of one MoMa expert group, built with (num_local_experts, config, pg_collection).

    Under TE: megatron-core's TEGroupedMLP on TE's grouped linears with `moe_grouped_gemm`, else
    SequentialMLP of TE linears; FP8 is then TE's (`TransformerConfig.fp8`), and `expert_fp8`
    (the path without TE) is refused. megatron-core's own fallbacks for old TE versions (the
    legacy GroupedMLP, which needs the `grouped_gemm` package and has no FP8) are refused too.
    Locally: SequentialMLP, or `GroupedExpertMLP` with `moe_grouped_gemm` or `expert_fp8`.
    """
    if use_te:
        if expert_fp8 is not None:
            raise ValueError(
                "expert_fp8 is FP8 without Transformer Engine; with Transformer Engine set "
                "TransformerConfig.fp8 (--fp8-format) and MoMa's experts run TE's FP8 GEMMs"
            )
        if not moe_grouped_gemm:
            return ModuleSpec(module=SequentialMLP, submodules=MLPSubmodules(
                linear_fc1=te_modules.TEColumnParallelLinear,
                linear_fc2=te_modules.TERowParallelLinear))
        if te_modules.TEColumnParallelGroupedLinear is None:
            raise ValueError("grouped GEMM experts under Transformer Engine need its grouped "
                             "linears (transformer-engine >= 1.9); this version lacks them")
        return ModuleSpec(module=TEGroupedMLP, submodules=MLPSubmodules(
            linear_fc1=te_modules.TEColumnParallelGroupedLinear,
            linear_fc2=te_modules.TERowParallelGroupedLinear))
    # GroupedExpertMLP is a SequentialMLP: the same local linears hold its weights.
    _, local_linears = LocalSpecProvider().grouped_mlp_modules(False, False)
    if moe_grouped_gemm or expert_fp8 is not None:
        return ModuleSpec(module=GroupedExpertMLP, submodules=local_linears,
                          params={"fp8_options": expert_fp8})
    return ModuleSpec(module=SequentialMLP, submodules=local_linears)
