"""The FLOPs-saving factor on synthetic loss curves, against values computed by hand, and the
curves read back from TensorBoard scalars as `pretrain_moma` writes them."""

import pytest
from torch.utils.tensorboard import SummaryWriter

from megatron_moma.training.flops_savings import (
    LossCurve,
    flops_to_reach,
    read_loss_curves,
    saving_factor,
    smooth,
)


def test_a_model_reaching_the_dense_final_loss_at_half_the_flops_saves_2x():
    # dense ends at loss 1.0 with 8 FLOPs; the model crosses 1.0 between (3, 1.5) and (5, 0.5):
    # 3 + (1.5 - 1.0) / (1.5 - 0.5) * (5 - 3) = 4 FLOPs, half of dense's.
    dense = LossCurve([2, 4, 6, 8], [4.0, 3.0, 2.0, 1.0])
    model = LossCurve([2, 3, 5, 8], [3.0, 1.5, 0.5, 0.3])
    result = saving_factor(dense, model, window=1)
    assert (result.target_loss, result.dense_flops) == (1.0, 8)
    assert result.model_flops == pytest.approx(4.0)
    assert result.factor == pytest.approx(2.0)
    assert not result.reached_at_first_point


def test_interpolation_between_logged_points():
    # crossing of 1.0 between (2, 2.0) and (3, 0.5): 2 + (2.0 - 1.0) / 1.5 = 8/3; 4 / (8/3) = 1.5
    dense = LossCurve([1, 2, 3, 4], [4.0, 3.0, 2.0, 1.0])
    model = LossCurve([1, 2, 3, 4], [3.5, 2.0, 0.5, 0.4])
    result = saving_factor(dense, model, window=1)
    assert result.model_flops == pytest.approx(8 / 3)
    assert result.factor == pytest.approx(1.5)


def test_smoothing_window_places_each_mean_at_the_mean_flops_of_its_steps():
    dense = LossCurve([1, 2, 3, 4, 5], [5.0, 4.0, 3.0, 2.0, 1.0])
    smoothed = smooth(dense, window=2)
    assert smoothed.flops == [1.5, 2.5, 3.5, 4.5] and smoothed.loss == [4.5, 3.5, 2.5, 1.5]
    # Model smoothed: losses 3, 2, 1.5, 1 at 1.5 .. 4.5: reaches dense's final 1.5 exactly at 3.5.
    model = LossCurve([1, 2, 3, 4, 5], [4.0, 2.0, 2.0, 1.0, 1.0])
    result = saving_factor(dense, model, window=2)
    assert (result.target_loss, result.dense_flops) == (1.5, 4.5)
    assert result.model_flops == pytest.approx(3.5)
    assert result.factor == pytest.approx(9 / 7)


def test_not_reached_and_reached_at_the_first_point():
    dense = LossCurve([1, 2, 3], [3.0, 2.0, 1.0])
    worse = saving_factor(dense, LossCurve([1, 2, 3], [3.0, 2.5, 1.2]), window=1)
    assert worse.model_flops is None and worse.factor is None
    better = saving_factor(dense, LossCurve([1, 2, 3], [0.9, 0.8, 0.7]), window=1)
    assert better.reached_at_first_point and better.model_flops == 1 and better.factor == 3.0


def test_dense_needs_the_flops_of_its_first_crossing_of_its_final_loss():
    # A noisy dense curve already dips to its final 1.5 between (1, 3) and (2, 1): 1.75 FLOPs.
    assert flops_to_reach(LossCurve([1, 2, 3, 4], [3.0, 1.0, 2.0, 1.5]), 1.5) == pytest.approx(1.75)


def test_bad_curves_are_refused():
    with pytest.raises(ValueError, match="must increase"):
        LossCurve([1, 1, 2], [3.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="3 FLOPs values for 2 losses"):
        LossCurve([1, 2, 3], [3.0, 2.0])
    with pytest.raises(ValueError, match="shorter than the smoothing window of 4"):
        smooth(LossCurve([1, 2, 3], [3.0, 2.0, 1.0]), window=4)


def test_curves_from_tensorboard_scalars_count_throughput_times_iteration_time(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path))
    # Per step: TFLOP/s per device x seconds = 1, 2 and 0.5 TFLOP per device.
    for step, (throughput, seconds, loss) in enumerate([(2.0, 0.5, 4.0), (4.0, 0.5, 3.0),
                                                         (1.0, 0.5, 2.5)], start=1):
        writer.add_scalar("throughput", throughput, step)
        writer.add_scalar("iteration-time", seconds, step)
        writer.add_scalar("lm loss", loss, step)
        if step != 2:  # a step without image tokens logs no image loss
            writer.add_scalar("image loss", loss + 1, step)
    writer.close()
    curves = read_loss_curves(str(tmp_path), world_size=2)
    assert sorted(curves) == ["image loss", "lm loss"]
    assert curves["lm loss"].flops == [2e12, 6e12, 7e12]
    assert curves["lm loss"].loss == [4.0, 3.0, 2.5]
    assert curves["image loss"].flops == [2e12, 7e12] and curves["image loss"].loss == [5.0, 3.5]


def test_a_directory_without_throughput_is_refused(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path))
    writer.add_scalar("lm loss", 1.0, 1)
    writer.close()
    with pytest.raises(ValueError, match="not a pretrain_moma TensorBoard directory"):
        read_loss_curves(str(tmp_path))


def test_flops_of_unlogged_steps_cannot_be_recovered(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path))
    for step in (2, 4):  # --tensorboard-log-interval 2
        writer.add_scalar("throughput", 1.0, step)
        writer.add_scalar("iteration-time", 1.0, step)
    writer.close()
    with pytest.raises(ValueError, match="--tensorboard-log-interval 1"):
        read_loss_curves(str(tmp_path))
