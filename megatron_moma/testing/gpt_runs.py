"""Train a tiny megatron-core GPTModel under any parallel layout and report comparable numbers.

Used by the parallel-equivalence tests and the CPU smoke run. Every layout starts from the same
weights because weights are set by *global parameter name* (megatron-core's own initialisation
differs across layouts: EP and PP change the seeding), through the model's `sharded_state_dict`:
each ShardedTensor names its global key, global shape and the slice this rank holds, which is
exactly what dist_checkpointing relies on to reshard.

What a run reports (`RunResult`) is layout-independent: the global loss and grad norm per step and,
for every parameter, the slices this rank holds, which `assemble_global` glues back into full tensors.
"""

import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnBackend

from megatron_moma.config import ModalityTransformerConfig, MoDOptions, MoMaOptions, MoTOptions
from megatron_moma.layers.aux_loss import scale_auxiliary_losses
from megatron_moma.modality import ModalityLayout
from megatron_moma.models import build_gpt_model
from megatron_moma.models.aux_router_stage import train_only_auxiliary_routers
from megatron_moma.parallel.layout import ParallelLayout
from megatron_moma.specs.backend import core_attention

GlobalSlices = Tuple[Tuple[int, ...], Tuple, torch.Tensor]  # (global shape, slice, local data)


@dataclass(frozen=True)
class TinyGPT:
    """Shape of the test model. `num_experts=None` is dense; otherwise Megatron's own MoE MLP.
    `moma` set makes every MLP a MoMa MLP and `mot` every layer a MoT layer (with MoMa MLPs if
    both are set); `mod` makes the layers it names Mixture-of-Depths layers; with text ids below `vocab_size // 2` and image ids from there up.
    The core attention follows `attention_backend` as in our specs (`specs.backend.core_attention`)."""

    num_layers: int = 4
    hidden_size: int = 32
    num_attention_heads: int = 4
    ffn_hidden_size: int = 64
    vocab_size: int = 128
    seq_length: int = 16
    num_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_aux_loss_coeff: float = 1e-2
    moma: Optional[MoMaOptions] = None
    mot: Optional[MoTOptions] = None
    mod: Optional[MoDOptions] = None
    moe_grouped_gemm: bool = False  # MoMa experts as GroupedExpertMLP instead of SequentialMLP
    num_query_groups: Optional[int] = None  # grouped-query attention; None: one per head
    attention_backend: AttnBackend = AttnBackend.auto  # local: megatron-core's DotProductAttention

    @property
    def modality_layout(self) -> ModalityLayout:
        return ModalityLayout.text_and_image(self.vocab_size // 2, self.vocab_size - 1)


@dataclass(frozen=True)
class TrainSpec:
    """What to train: batch sizes, steps, optimizer.

    `optimizer="sgd"` (no momentum, no clipping, plain DDP) makes every gradient observable:
    after one step, (w0 - w1) / lr is the gradient of each element. `optimizer="adam"` runs
    megatron-core's distributed optimizer, which supports Adam only.
    """

    micro_batch_size: int = 1
    global_batch_size: int = 4
    steps: int = 3
    train_only_auxiliary_routers: bool = False
    optimizer: str = "sgd"
    lr: float = 0.5
    adam_eps: float = 1e-8
    seed: int = 1234

    @property
    def use_distributed_optimizer(self) -> bool:
        return self.optimizer == "adam"


@dataclass
class RunResult:
    """Layout-independent record of a run, as seen from one rank."""

    losses: List[float] = field(default_factory=list)
    grad_norms: List[float] = field(default_factory=list)
    params_after_first_step: Dict[str, List[GlobalSlices]] = field(default_factory=dict)
    params_at_end: Dict[str, List[GlobalSlices]] = field(default_factory=dict)


def transformer_config(model: TinyGPT, layout: ParallelLayout) -> TransformerConfig:
    """A fp32, dropout-free SwiGLU/RMSNorm config: runs are deterministic and comparable."""
    moe = {}
    if model.num_experts is not None:
        moe = dict(
            num_moe_experts=model.num_experts,
            moe_router_topk=model.moe_router_topk,
            moe_token_dispatcher_type="alltoall",
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=model.moe_aux_loss_coeff,
            moe_grouped_gemm=False,
        )
    config_class, modality = TransformerConfig, {}
    if model.moma is not None or model.mot is not None or model.mod is not None:
        config_class = ModalityTransformerConfig
        modality = dict(modality_layout=model.modality_layout, moma=model.moma, mot=model.mot,
                        mod=model.mod, moe_grouped_gemm=model.moe_grouped_gemm,
                        moe_router_load_balancing_type="aux_loss",
                        moe_aux_loss_coeff=model.moe_aux_loss_coeff)
    return config_class(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        attention_backend=model.attention_backend,
        ffn_hidden_size=model.ffn_hidden_size,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        **layout.transformer_config_fields(),
        # gloo pairs batched sends by posting order and swaps tensors when the previous and next
        # stage are the same rank (docs/cpu.md): send and receive one at a time.
        batch_p2p_comm=False,
        **moe,
        **modality,
    )


def build_model(model: TinyGPT, layout: ParallelLayout, spec: TrainSpec) -> List[DistributedDataParallel]:
    """This rank's model chunks (one per virtual pipeline stage), wrapped in megatron-core DDP
    (after freezing all but the auxiliary routers if `spec.train_only_auxiliary_routers`)."""
    config = transformer_config(model, layout)
    megatron_moe_spec = get_gpt_layer_local_spec(
        num_experts=model.num_experts, moe_grouped_gemm=False, normalization="RMSNorm"
    )
    megatron_moe_spec.submodules.self_attention.submodules.core_attention = core_attention(
        False, model.attention_backend)
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=spec.use_distributed_optimizer
    )
    chunks = []
    for vp_stage in range(layout.virtual_pipeline_parallel_size or 1):
        vp = vp_stage if layout.virtual_pipeline_parallel_size else None
        common = dict(share_embeddings_and_output_weights=False, position_embedding_type="rope")
        if isinstance(config, ModalityTransformerConfig):
            gpt = build_gpt_model(config, model.vocab_size, model.seq_length, vp_stage=vp, **common)
        else:
            gpt = GPTModel(
                config=config,
                transformer_layer_spec=megatron_moe_spec,
                vocab_size=model.vocab_size,
                max_sequence_length=model.seq_length,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
                vp_stage=vp,
                **common,
            )
        if spec.train_only_auxiliary_routers:
            train_only_auxiliary_routers([gpt])
        chunks.append(
            DistributedDataParallel(
                config=config,
                ddp_config=ddp_config,
                module=gpt,
                disable_bucketing=vp_stage > 0,
            )
        )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    return chunks


def _global_shards(chunks: List[DistributedDataParallel]) -> Iterator[Tuple[str, ShardedTensor]]:
    """(global key, ShardedTensor) for every parameter shard this rank holds, factories built."""
    for chunk in chunks:
        sharded = chunk.module.sharded_state_dict()
        apply_factories(sharded)
        for value in nested_values(sharded):
            if isinstance(value, ShardedTensor) and not value.key.endswith("_extra_state"):
                yield value.key, value


def global_initial_value(key: str, global_shape: Tuple[int, ...]) -> torch.Tensor:
    """The full initial tensor of parameter `key`: seeded by its name, so identical in every layout."""
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    noise = torch.randn(global_shape, generator=generator, dtype=torch.float64)
    if "layernorm" in key or "layer_norm" in key:
        return (1.0 + 0.1 * noise).float()
    return (0.05 * noise).float()


@torch.no_grad()
def set_weights_by_global_name(chunks: List[DistributedDataParallel]) -> None:
    for key, shard in _global_shards(chunks):
        full = global_initial_value(key, tuple(shard.global_shape))
        shard.data.copy_(full[shard.global_slice()])


def snapshot_global_slices(chunks: List[DistributedDataParallel]) -> Dict[str, List[GlobalSlices]]:
    """Copies of this rank's parameter shards, keyed by global name."""
    snapshot: Dict[str, List[GlobalSlices]] = {}
    for key, shard in _global_shards(chunks):
        snapshot.setdefault(key, []).append(
            (tuple(shard.global_shape), shard.global_slice(), shard.data.detach().clone())
        )
    return snapshot


def assemble_global(snapshots: List[Dict[str, List[GlobalSlices]]]) -> Dict[str, torch.Tensor]:
    """Glue the per-rank snapshots of all ranks into full tensors; raises if any element is missing."""
    full: Dict[str, torch.Tensor] = {}
    covered: Dict[str, torch.Tensor] = {}
    for snapshot in snapshots:
        for key, pieces in snapshot.items():
            for global_shape, where, data in pieces:
                if key not in full:
                    full[key] = torch.zeros(global_shape, dtype=data.dtype)
                    covered[key] = torch.zeros(global_shape, dtype=torch.bool)
                full[key][where] = data.reshape(full[key][where].shape)
                covered[key][where] = True
    missing = [key for key, mask in covered.items() if not bool(mask.all())]
    if missing:
        raise ValueError(f"no rank holds part of these parameters: {missing}")
    return full


@dataclass(frozen=True)
class MicroBatch:
    tokens: torch.Tensor  # [b, s] int64
    labels: torch.Tensor  # [b, s] int64
    position_ids: torch.Tensor  # [b, s] int64


def global_batch(model: TinyGPT, spec: TrainSpec, step: int) -> torch.Tensor:
    """Token ids [global_batch_size, seq_length + 1] of training step `step`, the same in every layout."""
    generator = torch.Generator().manual_seed(spec.seed * 1000 + step)
    return torch.randint(
        0, model.vocab_size, (spec.global_batch_size, model.seq_length + 1), generator=generator
    )


def local_micro_batches(model: TinyGPT, spec: TrainSpec, step: int) -> List[MicroBatch]:
    """This data-parallel rank's contiguous share of the global batch, cut into micro-batches."""
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = spec.global_batch_size // dp_size
    samples = global_batch(model, spec, step)[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    position_ids = torch.arange(model.seq_length).unsqueeze(0)
    return [
        MicroBatch(
            tokens=chunk[:, :-1].contiguous(),
            labels=chunk[:, 1:].contiguous(),
            position_ids=position_ids.expand(chunk.shape[0], -1),
        )
        for chunk in samples.split(spec.micro_batch_size)
    ]


def _lm_loss(output_tensor: torch.Tensor):
    """Megatron's 3-tuple loss contract: (sum of token losses, token count, values to report)."""
    token_losses = output_tensor.float().reshape(-1)
    loss_sum = token_losses.sum()
    num_tokens = torch.tensor(token_losses.numel(), dtype=torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def _forward_step(data_iterator: Iterator[MicroBatch], model) -> Tuple[torch.Tensor, Callable]:
    batch = next(data_iterator)
    output = model(batch.tokens, batch.position_ids, attention_mask=None, labels=batch.labels)
    return output, _lm_loss


def train_step(chunks, optimizer, model: TinyGPT, spec: TrainSpec, step: int) -> Tuple[Optional[float], float]:
    """One optimizer step over the global batch. Returns (global mean loss on the last pipeline
    stage, else None; global grad norm)."""
    micro_batches = local_micro_batches(model, spec, step)
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    scale_auxiliary_losses(len(micro_batches), torch.cuda.current_device())
    loss_dicts = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=[iter(micro_batches) for _ in chunks],
        model=chunks,
        num_microbatches=len(micro_batches),
        seq_length=model.seq_length,
        micro_batch_size=spec.micro_batch_size,
        forward_only=False,
    )
    _, grad_norm, _ = optimizer.step()
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None, float(grad_norm)
    total = torch.stack([d["lm loss"] for d in loss_dicts]).sum(dim=0)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return float(total[0] / total[1]), float(grad_norm)


def initialize(layout: ParallelLayout, spec: TrainSpec) -> None:
    """Create the layout's process groups and Megatron's RNG states (torch.distributed initialised)."""
    layout.initialize()
    model_parallel_cuda_manual_seed(spec.seed)


def train(model: TinyGPT, layout: ParallelLayout, spec: TrainSpec) -> RunResult:
    """Run on every rank (torch.distributed initialised): build, set weights, train, report."""
    initialize(layout, spec)
    chunks = build_model(model, layout, spec)
    set_weights_by_global_name(chunks)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer=spec.optimizer,
            lr=spec.lr,
            weight_decay=0.0,
            sgd_momentum=0.0,
            adam_eps=spec.adam_eps,
            clip_grad=0.0,
            use_distributed_optimizer=spec.use_distributed_optimizer,
            params_dtype=torch.float32,
        ),
        chunks,
    )
    result = RunResult()
    for step in range(spec.steps):
        loss, grad_norm = train_step(chunks, optimizer, model, spec, step)
        if loss is not None:
            result.losses.append(loss)
        result.grad_norms.append(grad_norm)
        if step == 0:
            result.params_after_first_step = snapshot_global_slices(chunks)
    result.params_at_end = snapshot_global_slices(chunks)
    return result
