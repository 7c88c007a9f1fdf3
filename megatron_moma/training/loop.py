"""The training loop: build the model and optimizer, train steps, evaluate, save, stop.

One step: this rank's micro-batches of the global batch -> megatron-core's forward-backward
schedule (the loss function returns Megatron's 3-tuple, with the per-modality sums) -> a NaN/inf
check of the loss -> the optimizer step (gradient clipping, grad norm) -> a NaN/inf check of the
grad norm -> the LR scheduler. A non-finite value stops the run before anything is saved, so
the latest checkpoint stays the last good one.
"""

import argparse
import signal
import time
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_moma.config import ModalityTransformerConfig
from megatron_moma.layers.aux_loss import scale_auxiliary_losses
from megatron_moma.models import build_gpt_model
from megatron_moma.models.aux_router_stage import train_only_auxiliary_routers
from megatron_moma.modality import ModalityLayout
from megatron_moma.training import checkpointing, data
from megatron_moma.training.arguments import ArgumentError
from megatron_moma.training.checkpointing import TrainState
from megatron_moma.training.configs import optimizer_config
from megatron_moma.training.flops import training_flops
from megatron_moma.training.logging import StepMetrics, TrainingLogger, print_rank_last

EXIT_OK, EXIT_NON_FINITE = 0, 3


class NonFiniteError(RuntimeError):
    """NaN or inf in the loss or the gradients."""


@dataclass
class Run:
    """Everything a training run holds."""

    args: argparse.Namespace
    config: ModalityTransformerConfig
    vocab_size: int
    chunks: List[DistributedDataParallel]
    optimizer: object
    scheduler: OptimizerParamScheduler
    splits: data.Splits
    logger: TrainingLogger
    state: TrainState
    run_config: Dict
    data_layout: ModalityLayout  # the dataset's modalities: the losses are reported per modality

    @property
    def loss_names(self) -> List[str]:
        return ["lm loss"] + [f"{name} loss" for name in self.data_layout.names]


def build_model(args, config: ModalityTransformerConfig, vocab_size: int) -> List[DistributedDataParallel]:
    """This rank's model chunks wrapped in megatron-core DDP (aux routers only in stage 2)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.bf16,
        overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    chunks = []
    for vp_stage in range(config.virtual_pipeline_model_parallel_size or 1):
        vp = vp_stage if config.virtual_pipeline_model_parallel_size else None
        model = build_gpt_model(
            config, vocab_size, args.max_position_embeddings, vp_stage=vp,
            position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)
        if args.bf16:
            model = model.bfloat16()
        if args.device == "cuda":
            model = model.cuda()
        if args.train_aux_routers:
            train_only_auxiliary_routers([model])
        chunks.append(DistributedDataParallel(config=config, ddp_config=ddp_config, module=model,
                                              disable_bucketing=vp_stage > 0))
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    return chunks


def build_optimizer(args, chunks) -> Tuple[object, OptimizerParamScheduler]:
    """Megatron's optimizer and its LR/WD scheduler, stepped in samples as in Megatron-LM."""
    optimizer = get_megatron_optimizer(optimizer_config(args), chunks)
    gbs = args.global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs,
        lr_decay_steps=args.lr_decay_iters * gbs,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * gbs,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
    )
    return optimizer, scheduler


def _loss_func(batch: data.Batch, names: Tuple[str, ...], layout, output_tensor: torch.Tensor):
    """Megatron's 3-tuple: (masked loss sum, token count, {name: [sum, count]}), with the loss of
    each modality by the modality of the predicted token (the label).

    output_tensor: per-token losses [b, s]; batch["loss_mask"], batch["labels"]: [b, s]."""
    losses = output_tensor.float()
    mask = batch["loss_mask"].float()
    label_modality = layout.modality_ids(batch["labels"])
    loss_sum = (losses * mask).sum()
    count = mask.sum()
    reported = {"lm loss": torch.stack([loss_sum.detach(), count])}
    for modality, name in enumerate(names):
        selected = mask * (label_modality == modality)
        reported[f"{name} loss"] = torch.stack([(losses.detach() * selected).sum(), selected.sum()])
    return loss_sum, count.int(), reported


def _forward_step(device: str, data_layout: ModalityLayout, data_iterator, model):
    """The batch's modality ids go to the model when it routes by the data's modalities; a model
    with one mixed expert group derives its own (all text) from the tokens."""
    batch = {k: v.to(device) for k, v in next(data_iterator).items()}
    same_layout = model.config.modality_layout == data_layout
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                   modality_ids=batch["modality_ids"] if same_layout else None)
    return output, partial(_loss_func, batch, data_layout.names, data_layout)


def _global_loss_sums(loss_dicts, names: List[str], device) -> torch.Tensor:
    """[2 * len(names)]: (sum, count) per loss name over the global batch, on every rank (the
    last pipeline stage holds them; the other stages contribute zeros to the pipeline sum)."""
    sums = torch.zeros(2 * len(names), dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for loss_dict in loss_dicts:
            sums += torch.cat([loss_dict[name].double() for name in names])
    torch.distributed.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    torch.distributed.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
    return sums


def _global_token_counts(batches: List[data.Batch], layout: ModalityLayout) -> torch.Tensor:
    """[num_modalities] input tokens of each of the model's modalities in the global batch."""
    counts = torch.stack([
        torch.bincount(layout.modality_ids(b["tokens"]).reshape(-1), minlength=layout.num_modalities)
        for b in batches
    ]).sum(0).double()
    torch.distributed.all_reduce(counts, group=parallel_state.get_data_parallel_group())
    return counts


def _as_means(sums: torch.Tensor, names: List[str]) -> Dict[str, float]:
    pairs = sums.view(-1, 2)
    return {name: float(total / count) for name, (total, count) in zip(names, pairs) if count > 0}


def _forward_backward(run: Run, batches: List[data.Batch], forward_only: bool):
    scale_auxiliary_losses(len(batches))
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, run.args.device, run.data_layout),
        data_iterator=data.batch_iterators(batches, len(run.chunks)),
        model=run.chunks,
        num_microbatches=len(batches),
        seq_length=run.args.seq_length,
        micro_batch_size=run.args.micro_batch_size,
        forward_only=forward_only,
    )


def _check_finite(value: float, what: str, iteration: int) -> None:
    if not torch.isfinite(torch.tensor(value)):
        raise NonFiniteError(f"{what} is {value} at iteration {iteration}")


def train_step(run: Run) -> StepMetrics:
    """One optimizer step over the global batch at the run's data position."""
    args, state = run.args, run.state
    batches = data.micro_batches(run.splits.train, state.consumed_train_samples, args)
    if len(batches) != get_num_microbatches():
        raise RuntimeError(f"{len(batches)} micro-batches, the calculator says {get_num_microbatches()}")
    for chunk in run.chunks:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    loss_dicts = _forward_backward(run, batches, forward_only=False)
    names = run.loss_names
    losses = _as_means(_global_loss_sums(loss_dicts, names, args.device), names)
    _check_finite(losses.get("lm loss", 0.0), "the lm loss", state.iteration + 1)
    _, grad_norm, num_zeros = run.optimizer.step()
    _check_finite(grad_norm, "the gradient norm", state.iteration + 1)
    run.scheduler.step(increment=args.global_batch_size)
    layout = run.config.modality_layout
    tokens = dict(zip(layout.names, _global_token_counts(batches, layout).tolist()))
    return StepMetrics(losses=losses, tokens=tokens, grad_norm=float(grad_norm),
                       learning_rate=run.optimizer.param_groups[0]["lr"], num_zeros=num_zeros)


@torch.no_grad()
def evaluate(run: Run) -> Dict[str, float]:
    """Mean losses over the first --eval-iters global batches of the validation split (model in
    eval mode: MoMa/MoD route by their --*-inference-routing)."""
    for chunk in run.chunks:
        chunk.eval()
    names = run.loss_names
    sums = torch.zeros(2 * len(names), dtype=torch.float64, device=run.args.device)
    for step in range(run.args.eval_iters):
        batches = data.micro_batches(run.splits.valid, step * run.args.global_batch_size, run.args)
        sums += _global_loss_sums(_forward_backward(run, batches, forward_only=True), names,
                                  run.args.device)
    for chunk in run.chunks:
        chunk.train()
    return _as_means(sums, names)


def evaluate_checkpoint(run: Run) -> int:
    """--skip-train: evaluate the loaded model once, log the losses at its iteration, save
    nothing; returns the exit code."""
    if run.splits.valid is None or not run.args.eval_iters:
        raise ArgumentError(f"--skip-train evaluates on the validation split: --split "
                            f"{run.args.split!r} and --eval-iters {run.args.eval_iters} give none")
    run.logger.evaluation(run.state.iteration, run.state.consumed_train_samples, evaluate(run))
    return EXIT_OK


class EarlyExit:
    """Megatron-LM's early exits, decided at each step boundary by all ranks together.

    --exit-signal-handler: a SIGTERM caught by any rank (torchrun forwarding it to every worker,
    Slurm signalling every process of the step, or one worker alone). --exit-duration-in-mins:
    minutes since the trainer started (this object's creation), as Megatron-LM's
    `_TRAIN_START_TIME`. --exit-interval: the iteration is a multiple of it. The first two are
    per-rank facts: one all-reduce (MAX) of both at the boundary makes every rank stop after the
    same step, whenever each rank's signal arrived. Create it before the model is built, so that
    a SIGTERM during start-up is kept for the first boundary instead of killing the rank.
    """

    def __init__(self, args: argparse.Namespace):
        self.caught = False
        self.started = time.monotonic()
        self.signal_handler = args.exit_signal_handler
        self.duration_in_mins = args.exit_duration_in_mins
        self.interval = args.exit_interval
        self.device = args.device
        if self.signal_handler:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.caught = True

    def reason(self, iteration: int) -> Optional[str]:
        """Why to stop after `iteration` (the same on every rank, naming it), or None to go on."""
        if self.signal_handler or self.duration_in_mins is not None:
            minutes = (time.monotonic() - self.started) / 60
            overdue = self.duration_in_mins is not None and minutes > self.duration_in_mins
            flags = torch.tensor([float(self.caught), float(overdue)], device=self.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            if flags[0]:
                return f"on SIGTERM at iteration {iteration}"
            if flags[1]:
                return (f"after {self.duration_in_mins} minutes (--exit-duration-in-mins) at "
                        f"iteration {iteration}")
        if self.interval and iteration % self.interval == 0:
            return f"at iteration {iteration} (--exit-interval {self.interval})"
        return None


def _params_norm(run: Run) -> Optional[float]:
    """L2 norm of the parameters over the model-parallel group, TP-replicated ones counted once
    (expert parameters are counted on this rank's expert-parallel share only)."""
    if not run.args.log_params_norm:
        return None
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    params = [p.detach().float() for chunk in run.chunks for p in chunk.parameters()
              if param_is_not_tensor_parallel_duplicate(p)]
    return float(get_grad_norm_fp32(params,
                                    grad_stats_parallel_group=parallel_state.get_model_parallel_group()))


def save(run: Run) -> None:
    if run.args.save is None:
        return
    checkpointing.save_checkpoint(run.args.save, [c.module for c in run.chunks], run.optimizer, run.scheduler, run.state,
                                  run.run_config, save_optimizer=not run.args.no_save_optim,
                                  save_rng=not run.args.no_save_rng)
    print_rank_last(f" saved checkpoint at iteration {run.state.iteration} to {run.args.save}")


def train(run: Run, early_exit: EarlyExit) -> int:
    """Train from `run.state` to --train-iters, or to the first early exit; returns the process
    exit code. Every way out but a non-finite value saves the last iteration (when --save)."""
    args, state = run.args, run.state
    for chunk in run.chunks:
        chunk.train()
    saved_at = state.iteration
    while state.iteration < args.train_iters:
        start = time.perf_counter()
        try:
            metrics = train_step(run)
        except NonFiniteError as error:
            latest = checkpointing.read_tracker(args.save) if args.save else None
            print_rank_last(f"ERROR: {error}: stopping the run without saving; the latest checkpoint "
                        f"is iteration {latest} in {args.save}")
            return EXIT_NON_FINITE
        seconds = time.perf_counter() - start
        state.iteration += 1
        state.consumed_train_samples += args.global_batch_size
        flops = training_flops(run.config, run.vocab_size, args.seq_length, metrics.tokens)
        state.floating_point_operations_so_far += flops
        run.logger.step(state.iteration, state.consumed_train_samples, metrics, seconds, flops,
                        _params_norm(run))
        if run.splits.valid is not None and args.eval_iters and state.iteration % args.eval_interval == 0:
            run.logger.evaluation(state.iteration, state.consumed_train_samples, evaluate(run))
        if args.save_interval and state.iteration % args.save_interval == 0:
            save(run)
            saved_at = state.iteration
        reason = early_exit.reason(state.iteration)
        if reason is not None:
            if saved_at != state.iteration:
                save(run)
            print_rank_last(f" exiting {reason}")
            return EXIT_OK
    if saved_at != state.iteration:
        save(run)
    return EXIT_OK
