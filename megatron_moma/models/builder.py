"""Build a Megatron GPT model of any of our architectures from its config.

`dense | moma | mot | mot+moma`, each with or without Mixture-of-Depths, follows from which
option groups the ModalityTransformerConfig holds (`config.architecture` names it).
"""

from typing import Optional

from megatron.core import parallel_state
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_moma.config import ModalityTransformerConfig
from megatron_moma.models.gpt import ModalityGPTModel
from megatron_moma.specs import get_mod_layer_spec, get_moma_layer_spec, get_mot_layer_spec
from megatron_moma.specs.backend import resolve_use_te, transformer_layer_spec


def get_layer_spec(config: ModalityTransformerConfig, use_te: Optional[bool] = None) -> ModuleSpec:
    """The transformer-layer spec of `config.architecture`: Transformer Engine modules when
    `use_te` (default: TE imports), local megatron-core modules otherwise. MoMa experts follow
    `config.moe_grouped_gemm` and `config.expert_fp8` (see `specs.backend.expert_spec`), the
    core attention `config.attention_backend` (see `specs.backend.core_attention`)."""
    use_te = resolve_use_te(use_te)
    if config.fp8 and not use_te:
        raise ValueError(
            f"TransformerConfig.fp8={config.fp8!r} is Transformer Engine's FP8, but the layers are "
            "built without Transformer Engine; FP8 MoMa experts without it are config.expert_fp8"
        )
    experts = dict(moe_grouped_gemm=config.moe_grouped_gemm, expert_fp8=config.expert_fp8)
    attention_backend = config.attention_backend
    if config.mot is not None:
        spec = get_mot_layer_spec(config.mot, with_moma=config.moma is not None, use_te=use_te,
                                  attention_backend=attention_backend, **experts)
    elif config.moma is not None:
        spec = get_moma_layer_spec(config.normalization, config.qk_layernorm, use_te=use_te,
                                   attention_backend=attention_backend, **experts)
    else:
        spec = transformer_layer_spec(use_te, config.normalization, config.qk_layernorm, moe=False,
                                      attention_backend=attention_backend)
    if config.mod is not None:
        spec = get_mod_layer_spec(spec)
    return spec


def build_gpt_model(config: ModalityTransformerConfig, vocab_size: int, max_sequence_length: int,
                    vp_stage: Optional[int] = None, use_te: Optional[bool] = None,
                    **gpt_model_kwargs) -> ModalityGPTModel:
    """This rank's model chunk (pipeline stage `vp_stage` under virtual pipelining).

    `gpt_model_kwargs` go to Megatron's GPTModel (e.g. `position_embedding_type`,
    `share_embeddings_and_output_weights`). Megatron's parallel state must be initialised.
    """
    return ModalityGPTModel(
        config=config,
        transformer_layer_spec=get_layer_spec(config, use_te),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        vp_stage=vp_stage,
        **gpt_model_kwargs,
    )
