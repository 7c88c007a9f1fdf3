"""From parsed flags to the objects megatron-core takes: the layout, the model and optimizer
configs, and the vocabulary (read from the dataset's `.vocab.json` sidecar)."""

import argparse
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from megatron.core.datasets.utils import get_blend_from_list
from megatron.core.optimizer import OptimizerConfig
from megatron.core.transformer.enums import AttnBackend

from megatron_moma.config import (
    ExpertFp8Options,
    ModalityTransformerConfig,
    MoDOptions,
    MoMaOptions,
    MoTOptions,
)
from megatron_moma.data.vocabulary import (
    VocabularyLayout,
    read_sidecar,
    sidecar_path,
)
from megatron_moma.modality import ModalityLayout
from megatron_moma.parallel.layout import ParallelLayout
from megatron_moma.specs import backend
from megatron_moma.training.arguments import ArgumentError, virtual_pipeline_size


def parallel_layout(args: argparse.Namespace) -> ParallelLayout:
    return ParallelLayout(
        tensor_parallel_size=args.tensor_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        pipeline_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_parallel_size=virtual_pipeline_size(args),
        expert_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
    )


def vocabulary(args: argparse.Namespace) -> VocabularyLayout:
    """The vocabulary layout in the sidecar of the first `--data-path` prefix."""
    prefixes, _ = get_blend_from_list(args.data_path)
    path = sidecar_path(prefixes[0])
    try:
        return read_sidecar(path)
    except FileNotFoundError:
        raise ArgumentError(f"--data-path {prefixes[0]}: no vocabulary sidecar {path} "
                            "(write the dataset with moma-preprocess)")
    except ValueError as error:
        raise ArgumentError(f"--data-path {prefixes[0]}: {error}") from error


def padded_vocab_size(vocab_size: int, args: argparse.Namespace) -> int:
    """Megatron-LM's padding: a multiple of --make-vocab-size-divisible-by x TP."""
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def routing_layout(args: argparse.Namespace, data_layout: ModalityLayout) -> ModalityLayout:
    """The modality layout the model is built with: the data's, except for MoMa with a single
    expert group on mixed-modal data (`--moma-experts-per-modality 8`: the MoMa paper's moe_8x
    baseline), whose experts take tokens of every modality: the model then sees one modality
    (its group and parameters are named `text`), while the losses stay per data modality."""
    groups = args.moma_experts_per_modality
    single_group = "moma" in args.architecture and len(groups) == 1
    if "moma" in args.architecture and len(groups) not in (1, data_layout.num_modalities):
        raise ArgumentError(
            f"--moma-experts-per-modality {' '.join(map(str, groups))}: {len(groups)} groups, "
            f"expected one per modality of the dataset ({', '.join(data_layout.names)}) or one "
            "for all")
    if not single_group or data_layout.num_modalities == 1:
        return data_layout
    if args.architecture != "moma":
        raise ArgumentError(
            f"--moma-experts-per-modality {args.moma_experts_per_modality[0]} (one expert group "
            f"for every modality) needs --architecture moma, not {args.architecture}: MoT unties "
            f"every layer by modality")
    return ModalityLayout()


def _option_groups(args: argparse.Namespace) -> Dict[str, Optional[object]]:
    moma = mot = mod = None
    if "moma" in args.architecture:
        moma = MoMaOptions(
            experts_per_modality=tuple(args.moma_experts_per_modality),
            routing=args.moma_routing,
            capacity_factor=args.moma_capacity_factor,
            gumbel_noise=args.moma_gumbel_noise and not args.train_aux_routers,
            inference_routing=args.moma_inference_routing,
            token_choice_topk=args.moma_token_choice_topk,
            aux_router=not args.moma_no_aux_router,
            aux_loss_coeff=args.moma_aux_loss_coeff,
        )
    if args.architecture.startswith("mot"):
        mot = MoTOptions(untie=frozenset(args.mot_untie), norm_placement=args.mot_norm_placement,
                         qk_layernorm=args.qk_layernorm)
    if args.mod:
        mod = MoDOptions(
            capacity=args.mod_capacity,
            topk_scope=args.mod_topk_scope,
            layers=tuple(args.mod_layers) if args.mod_layers is not None else None,
            aux_router=not args.mod_no_aux_router,
            inference_routing=args.mod_inference_routing,
            aux_loss_coeff=args.mod_aux_loss_coeff,
        )
    return dict(moma=moma, mot=mot, mod=mod)


def fp8_fields(args: argparse.Namespace) -> Dict[str, object]:
    """The FP8 flags as config fields: megatron-core's `fp8*` fields (Megatron-LM's mapping) when
    Transformer Engine imports, else our `expert_fp8` (MoMa expert GEMMs on torch's FP8 ops)."""
    if args.fp8_format is None:
        return {}
    if backend.transformer_engine_available():
        return dict(fp8=args.fp8_format, fp8_recipe=args.fp8_recipe, fp8_margin=args.fp8_margin,
                    fp8_amax_history_len=args.fp8_amax_history_len,
                    fp8_amax_compute_algo=args.fp8_amax_compute_algo)
    return dict(expert_fp8=ExpertFp8Options(format=args.fp8_format, recipe=args.fp8_recipe))


def transformer_config(args: argparse.Namespace, layout: ModalityLayout) -> ModalityTransformerConfig:
    """The model's config for data of modality layout `layout` (the model's own layout is
    `routing_layout`'s); ValueErrors from the option groups become ArgumentErrors."""
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model_layout = routing_layout(args, layout)
    try:
        return ModalityTransformerConfig(
            num_layers=args.num_layers,
            hidden_size=args.hidden_size,
            ffn_hidden_size=args.ffn_hidden_size,
            num_attention_heads=args.num_attention_heads,
            num_query_groups=args.num_query_groups if args.group_query_attention else None,
            kv_channels=args.kv_channels,
            gated_linear_unit=args.swiglu,
            activation_func=F.silu if args.swiglu else F.gelu,
            normalization=args.normalization,
            layernorm_epsilon=args.norm_epsilon,
            add_bias_linear=not args.disable_bias_linear,
            qk_layernorm=args.qk_layernorm,
            init_method_std=args.init_method_std,
            # The aux-router stage runs the frozen model as inference does (no dropout, no
            # router noise), so the auxiliary routers learn the assignments inference makes.
            hidden_dropout=0.0 if args.train_aux_routers else args.hidden_dropout,
            attention_dropout=0.0 if args.train_aux_routers else args.attention_dropout,
            bf16=args.bf16,
            attention_backend=AttnBackend[args.attention_backend],
            params_dtype=dtype,
            pipeline_dtype=dtype,
            use_cpu_initialization=args.device == "cpu",
            recompute_granularity=args.recompute_granularity,
            recompute_method=args.recompute_method,
            recompute_num_layers=args.recompute_num_layers,
            **parallel_layout(args).transformer_config_fields(),
            # gloo pairs batched sends by posting order (docs/cpu.md): one at a time on CPU.
            batch_p2p_comm=args.device != "cpu",
            modality_layout=model_layout,
            moe_grouped_gemm=args.moe_grouped_gemm,
            moe_aux_loss_coeff=args.moe_aux_loss_coeff,
            moe_z_loss_coeff=args.moe_z_loss_coeff,
            **fp8_fields(args),
            **_option_groups(args),
        )
    except ValueError as error:
        raise ArgumentError(f"invalid model flags: {error}") from error


def optimizer_config(args: argparse.Namespace) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer=args.optimizer,
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        sgd_momentum=args.sgd_momentum,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer,
        log_num_zeros_in_grad=args.log_num_zeros_in_grad,
    )
