"""Which implementation backs our layer specs: Transformer Engine where it imports, local
megatron-core modules otherwise (megatron-core's own BackendSpecProvider choice).

This module is the only place our specs choose between the two:
- `transformer_layer_spec`: megatron-core's GPT layer (TE's fused layernorm-linears, TE core
  attention; or local linears and norms), the frame of dense and MoMa layers;
- `core_attention`: the core attention of every layer (dense, MoMa, MoT, MoD) by
  `--attention-backend`: TE's DotProductAttention under TE, our `SDPACoreAttention` (torch's
  fused attention kernels) without it, megatron-core's local DotProductAttention for `local`;
- `expert_spec`: MoMa's expert groups: SequentialMLP of TE or local linears, megatron-core's
  TEGroupedMLP with `moe_grouped_gemm` under TE, our `GroupedExpertMLP` (torch's grouped and
  FP8 matmuls) with `moe_grouped_gemm` or `expert_fp8` without TE.

Without TE, megatron-core's extension module still imports and names TE's classes with
placeholders, so the TE choices can be inspected (not built) on any machine.
"""

from typing import Optional

from megatron.core.extensions import transformer_engine as te_modules
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_moma.config.fp8 import ExpertFp8Options
from megatron_moma.layers.grouped_experts import GroupedExpertMLP
from megatron_moma.layers.sdpa_attention import SDPACoreAttention


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


def core_attention(use_te: bool, attention_backend: AttnBackend) -> type:
    """The core attention class for `--attention-backend` (Megatron-LM's names). `local`:
    megatron-core's DotProductAttention (materialises the scores). Otherwise under TE: TE's
    DotProductAttention, whose kernel megatron-core's GPTModel selects from the same setting;
    without TE: `SDPACoreAttention`, torch's SDPA restricted to the kernels the name allows."""
    if attention_backend == AttnBackend.local:
        return DotProductAttention
    if use_te:
        return te_modules.TEDotProductAttention
    return SDPACoreAttention


def transformer_layer_spec(use_te: bool, normalization: str, qk_layernorm: bool,
                           moe: bool, attention_backend: AttnBackend = AttnBackend.auto
                           ) -> ModuleSpec:
    """megatron-core's GPT layer spec with our `core_attention`. Under TE the input norm is fused
    into the QKV linear (TELayerNormColumnParallelLinear); `moe` gives the layer a separate
    pre-MLP norm (TENorm), as megatron-core's MoE layers have, since the MLP is replaced. Locally
    the norms follow `normalization` and are separate modules."""
    if use_te:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=2 if moe else None, qk_layernorm=qk_layernorm
        )
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization=normalization,
                                                        qk_layernorm=qk_layernorm)
    spec.submodules.self_attention.submodules.core_attention = core_attention(use_te,
                                                                              attention_backend)
    return spec


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
