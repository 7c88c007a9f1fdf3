"""The papers' FLOPs-saving factor, from the training-loss curves `pretrain_moma` logs.

MoMa and MoT measure a sparse model against the FLOP-matched dense model on *training* loss
(docs/layers.md §9): take the dense model's final training loss L; the saving factor of a model
is the FLOPs dense needs to reach L divided by the FLOPs the model needs to reach L. It is
computed overall (`lm loss`) and per modality (`text loss`, `image loss`: the loss on tokens of
that modality, against the run's total FLOPs, as the papers plot them).

Method (`saving_factor`):
1. Smooth each curve with a trailing mean over `window` logged steps, placed at the mean FLOPs of
   those steps (for a locally straight curve this has no lag; the papers do not say how they
   smooth).
2. L is the last point of dense's smoothed curve: its mean loss over the last `window` steps.
3. The FLOPs a curve needs to reach L is where its smoothed curve first comes down to L, linearly
   interpolated between the two smoothed points around the crossing; dense's own is at most its
   last point. A curve already at or below L at its first smoothed point gives that point's FLOPs
   (an upper bound, flagged `reached_at_first_point`); a curve that never comes down to L has
   "not reached" (None) and no factor.

Curves come from the TensorBoard scalars of a run (`read_loss_curves`): each step's loss, and its
FLOPs as the trainer counted them (megatron_moma.training.flops), recovered from the logged
`throughput` (TFLOP/s per device) x `iteration-time` x the number of devices.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

LOSS_TAGS = ("lm loss", "text loss", "image loss")


@dataclass
class LossCurve:
    """Loss against cumulative training FLOPs, one point per logged step (FLOPs increasing)."""

    flops: List[float]
    loss: List[float]

    def __post_init__(self):
        if len(self.flops) != len(self.loss):
            raise ValueError(f"{len(self.flops)} FLOPs values for {len(self.loss)} losses")
        if any(b <= a for a, b in zip(self.flops, self.flops[1:])):
            raise ValueError("the FLOPs of a loss curve must increase step by step")


@dataclass
class SavingFactor:
    """One model against dense on one loss: the target L, the FLOPs each needs to reach it
    (None: not reached), and dense / model (None when the model does not reach L)."""

    target_loss: float
    dense_flops: float
    model_flops: Optional[float]
    factor: Optional[float]
    reached_at_first_point: bool = False


def smooth(curve: LossCurve, window: int) -> LossCurve:
    """Trailing mean over `window` points, each placed at the mean FLOPs of its points."""
    if window < 1:
        raise ValueError(f"the smoothing window must be >= 1 point, got {window}")
    if len(curve.loss) < window:
        raise ValueError(f"a curve of {len(curve.loss)} points is shorter than the smoothing "
                         f"window of {window}")
    flops, loss = [], []
    for end in range(window, len(curve.loss) + 1):
        flops.append(sum(curve.flops[end - window:end]) / window)
        loss.append(sum(curve.loss[end - window:end]) / window)
    return LossCurve(flops, loss)


def flops_to_reach(curve: LossCurve, target: float) -> Optional[float]:
    """FLOPs where `curve` first comes down to `target`, linearly interpolated; None if never."""
    for i, loss in enumerate(curve.loss):
        if loss <= target:
            if i == 0:
                return curve.flops[0]
            before_flops, before_loss = curve.flops[i - 1], curve.loss[i - 1]
            fraction = (before_loss - target) / (before_loss - loss)
            return before_flops + fraction * (curve.flops[i] - before_flops)
    return None


def saving_factor(dense: LossCurve, model: LossCurve, window: int) -> SavingFactor:
    """The FLOPs-saving factor of `model` against `dense` (module docstring)."""
    dense_smooth, model_smooth = smooth(dense, window), smooth(model, window)
    target = dense_smooth.loss[-1]
    dense_flops = flops_to_reach(dense_smooth, target)
    model_flops = flops_to_reach(model_smooth, target)
    return SavingFactor(
        target_loss=target,
        dense_flops=dense_flops,
        model_flops=model_flops,
        factor=None if model_flops is None else dense_flops / model_flops,
        reached_at_first_point=model_smooth.loss[0] <= target,
    )


def read_loss_curves(tensorboard_dir: str, world_size: int = 1,
                     tags: Sequence[str] = LOSS_TAGS) -> Dict[str, LossCurve]:
    """The loss curves of a `pretrain_moma` run from its TensorBoard event files, against the
    cumulative FLOPs of all `world_size` devices; tags the run did not log are left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tensorboard_dir, size_guidance={"scalars": 0})
    events.Reload()
    logged = set(events.Tags()["scalars"])
    missing = {"throughput", "iteration-time"} - logged
    if missing:
        raise ValueError(f"{tensorboard_dir}: no {sorted(missing)} scalars: not a pretrain_moma "
                         f"TensorBoard directory with --tensorboard-log-interval 1")
    seconds = {e.step: e.value for e in events.Scalars("iteration-time")}
    throughput = sorted(events.Scalars("throughput"), key=lambda e: e.step)
    steps = [event.step for event in throughput]
    if steps != list(range(steps[0], steps[0] + len(steps))):
        raise ValueError(f"{tensorboard_dir}: throughput is not logged at every step (steps "
                         f"{steps[:4]}...): the FLOPs of the steps between are unknown; train "
                         f"with --tensorboard-log-interval 1")
    cumulative, total = {}, 0.0
    for event in throughput:
        total += event.value * 1e12 * seconds[event.step] * world_size
        cumulative[event.step] = total
    curves = {}
    for tag in tags:
        if tag in logged:
            points = sorted((e.step, e.value) for e in events.Scalars(tag))
            curves[tag] = LossCurve([cumulative[step] for step, _ in points],
                                    [value for _, value in points])
    return curves
