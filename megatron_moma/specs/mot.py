"""Layer spec of a Mixture-of-Transformers layer (optionally with MoMa MLPs: "MoT + MoE")."""

from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_moma.config.fp8 import ExpertFp8Options
from megatron_moma.config.mot import MoTOptions
from megatron_moma.layers.modality_weights import ModalityNorm
from megatron_moma.layers.mot import MoTMLP, MoTSelfAttention, MoTSelfAttentionSubmodules
from megatron_moma.specs.backend import core_attention, resolve_use_te
from megatron_moma.specs.moma import moma_mlp_spec


def get_mot_layer_spec(options: MoTOptions, with_moma: bool = False,
                       use_te: Optional[bool] = None, moe_grouped_gemm: bool = False,
                       expert_fp8: Optional[ExpertFp8Options] = None,
                       attention_backend: AttnBackend = AttnBackend.auto) -> ModuleSpec:
    """Megatron TransformerLayer whose attention, MLP and norms are per modality.

    Pre-norm puts `ModalityNorm`s in the layer's input and pre-MLP norm slots; post-norm leaves
    those slots empty and lets each sublayer normalise its own output (x + Norm(Sublayer(x))).
    `with_moma` makes the MLP a MoMa MLP (its expert groups are the per-modality FFNs), whose
    experts follow `moe_grouped_gemm` and `expert_fp8` as in `get_moma_layer_spec`. With `use_te`
    (default: Transformer Engine imports) the global core attention is TE's and MoMa's experts
    are TE modules; the per-modality projections and norms are ours either way (so FP8 under TE
    reaches MoMa's experts only). `attention_backend` chooses the global core attention
    (`specs.backend.core_attention`).
    """
    use_te = resolve_use_te(use_te)
    pre_norm = ModalityNorm if options.norm_placement == "pre" else IdentityOp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=pre_norm,
            self_attention=ModuleSpec(
                module=MoTSelfAttention,
                submodules=MoTSelfAttentionSubmodules(
                    core_attention=core_attention(use_te, attention_backend)
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_norm,
            mlp=(moma_mlp_spec(use_te, moe_grouped_gemm, expert_fp8) if with_moma
                 else ModuleSpec(module=MoTMLP)),
            mlp_bda=get_bias_dropout_add,
        ),
    )
