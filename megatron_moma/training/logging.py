"""What a run reports: one console line per --log-interval and TensorBoard scalars.

Names are Megatron-LM's, which users grep for: `lm loss`, `learning-rate`, `grad-norm`,
`num-zeros`, `params-norm`, `iteration-time`, `throughput` (TFLOP/s per device), each TensorBoard
scalar also "vs samples"; ours: `{modality} loss` and `tokens-per-sec`, and per MoMa / MoD layer
the routing statistics of megatron_moma.layers.routing_statistics over each log interval
(`moma/layerNNN/{modality}/expert{j}_load`, `.../tokens_taken_by_{0,1,2plus}`,
`.../aux_router_{accuracy,recall}`, `mod/layerNNN/selection_rate`), the mean auxiliary-router
accuracy also on the console line. The console line and the
TensorBoard writer live on the last rank, which holds the loss (as in Megatron-LM).
"""

import time
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from megatron_moma.layers.routing_statistics import ROUTING_STATISTICS


@dataclass
class StepMetrics:
    """One training step, the same on every rank. `losses` maps `lm loss` and `{modality} loss`
    to the global token-mean loss; `tokens` maps modality names to the step's token counts."""

    losses: Dict[str, float]
    tokens: Dict[str, float]
    grad_norm: float
    learning_rate: float
    num_zeros: Optional[float] = None


@dataclass
class IntervalTotals:
    """Sums over the steps since the last console line."""

    steps: int = 0
    seconds: float = 0.0
    flops: float = 0.0
    tokens: float = 0.0
    losses: Dict[str, float] = field(default_factory=dict)

    def add(self, metrics: StepMetrics, seconds: float, flops: float) -> None:
        self.steps += 1
        self.seconds += seconds
        self.flops += flops
        self.tokens += sum(metrics.tokens.values())
        for name, value in metrics.losses.items():
            self.losses[name] = self.losses.get(name, 0.0) + value


def _is_last_rank() -> bool:
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def print_rank_last(message: str) -> None:
    if _is_last_rank():
        print(message, flush=True)


class TrainingLogger:
    """Console lines and TensorBoard scalars for a run of `train_iters` iterations."""

    def __init__(self, train_iters: int, log_interval: int, tensorboard_dir: Optional[str],
                 tensorboard_log_interval: int = 1):
        self.train_iters = train_iters
        self.log_interval = log_interval
        self.tensorboard_log_interval = tensorboard_log_interval
        self.writer = None
        if tensorboard_dir and _is_last_rank():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir, max_queue=1000)
        self.totals = IntervalTotals()
        self.world_size = torch.distributed.get_world_size()

    def _scalar(self, name: str, value: float, iteration: int, samples: int) -> None:
        self.writer.add_scalar(name, value, iteration)
        self.writer.add_scalar(f"{name} vs samples", value, samples)

    def step(self, iteration: int, samples: int, metrics: StepMetrics, seconds: float,
             flops: float, params_norm: Optional[float] = None) -> None:
        """Record step `iteration` (1-based, after it ran); print every log_interval steps."""
        self.totals.add(metrics, seconds, flops)
        if self.writer is not None and iteration % self.tensorboard_log_interval == 0:
            self._tensorboard(iteration, samples, metrics, seconds, flops, params_norm)
        if iteration % self.log_interval == 0 or iteration == self.train_iters:
            routing = ROUTING_STATISTICS.report()  # collective: every rank calls step()
            if self.writer is not None:
                for name, value in routing.items():
                    self._scalar(name, value, iteration, samples)
            self._console(iteration, samples, metrics, params_norm, routing)
            self.totals = IntervalTotals()

    def _tensorboard(self, iteration, samples, metrics: StepMetrics, seconds, flops, params_norm):
        for name, value in metrics.losses.items():
            self._scalar(name, value, iteration, samples)
        self._scalar("learning-rate", metrics.learning_rate, iteration, samples)
        self._scalar("grad-norm", metrics.grad_norm, iteration, samples)
        self._scalar("iteration-time", seconds, iteration, samples)
        self._scalar("throughput", flops / seconds / self.world_size / 1e12, iteration, samples)
        self._scalar("tokens-per-sec", sum(metrics.tokens.values()) / seconds, iteration, samples)
        if metrics.num_zeros is not None:
            self._scalar("num-zeros", metrics.num_zeros, iteration, samples)
        if params_norm is not None:
            self._scalar("params-norm", params_norm, iteration, samples)

    def _console(self, iteration, samples, metrics: StepMetrics, params_norm,
                 routing: Dict[str, float]) -> None:
        if not _is_last_rank():
            return
        totals = self.totals
        seconds = totals.seconds / totals.steps
        parts = [
            f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {iteration:8d}/{self.train_iters:8d}",
            f"consumed samples: {samples:12d}",
            f"elapsed time per iteration (ms): {1000 * seconds:.1f}",
            f"throughput per GPU (TFLOP/s/GPU): {totals.flops / totals.seconds / self.world_size / 1e12:.4f}",
            f"tokens/s: {totals.tokens / totals.seconds:.0f}",
            f"learning rate: {metrics.learning_rate:.6E}",
        ]
        parts += [f"{name}: {value / totals.steps:.6E}" for name, value in totals.losses.items()]
        parts.append(f"grad norm: {metrics.grad_norm:.3f}")
        if metrics.num_zeros is not None:
            parts.append(f"num zeros: {metrics.num_zeros:.1f}")
        if params_norm is not None:
            parts.append(f"params norm: {params_norm:.3f}")
        accuracies = [v for k, v in routing.items() if k.endswith("aux_router_accuracy")]
        if accuracies:
            parts.append(f"aux-router accuracy: {sum(accuracies) / len(accuracies):.3f}")
        print(" | ".join(parts) + " |", flush=True)

    def evaluation(self, iteration: int, samples: int, losses: Dict[str, float]) -> None:
        if not _is_last_rank():
            return
        text = " | ".join(f"{name} value: {value:.6E}" for name, value in losses.items())
        print(f" validation loss at iteration {iteration} | {text} |", flush=True)
        if self.writer is not None:
            for name, value in losses.items():
                self._scalar(f"{name} validation", value, iteration, samples)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
