"""End-to-end runs of `pretrain_moma` on the digits sample corpus (CPU, gloo, fp32).

The loss of every step is read back from the TensorBoard event files the runs write, so these
tests check the logging as well. Runs happen on ranks forked from the test process
(`run_on_ranks`), except the SIGTERM test, which runs the real command in a subprocess.
"""

import os
import signal
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_moma.testing.multiprocess import run_on_ranks
from megatron_moma.testing.trainer_runs import MOMA_2T2I
from megatron_moma.testing.trainer_runs import pretrain_on_ranks as _train
from megatron_moma.testing.trainer_runs import tensorboard_scalars as _scalars
from megatron_moma.testing.trainer_runs import trainer_flags as _args
from megatron_moma.training import checkpointing

WORKTREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resume_continues_the_loss_sequence_exactly_moma_ep2(data_path, tmp_path):
    """6 iterations straight vs 3, stop, resume to 6: identical loss at every step (MoMa, EP2,
    Adam with warm-up and decay, distributed optimizer, Gumbel router noise drawing RNG)."""
    root = str(tmp_path)
    common = MOMA_2T2I + ["--moma-gumbel-noise", "--expert-model-parallel-size", "2",
                          "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "2",
                          "--min-lr", "1e-4", "--use-distributed-optimizer"]
    assert _train(2, _args(data_path, root, "straight", 6, *common)) == 0
    save = os.path.join(root, "ckpt")
    first = _args(data_path, root, "first", 6, *common, "--save", save, "--exit-interval", "3")
    assert _train(2, first) == 0
    assert checkpointing.read_tracker(save) == 3
    assert _train(2, _args(data_path, root, "second", 6, *common, "--load", save, "--save", save)) == 0
    assert checkpointing.read_tracker(save) == 6

    straight = _scalars(os.path.join(root, "tb-straight"), "lm loss")
    resumed = {**_scalars(os.path.join(root, "tb-first"), "lm loss"),
               **_scalars(os.path.join(root, "tb-second"), "lm loss")}
    assert sorted(straight) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert resumed == straight
    lr_straight = _scalars(os.path.join(root, "tb-straight"), "learning-rate")
    assert _scalars(os.path.join(root, "tb-second"), "learning-rate") == {
        step: lr for step, lr in lr_straight.items() if step > 3}
    saved = checkpointing.read_run_config(checkpointing.checkpoint_dir(save, 6))
    assert saved["architecture"] == "moma" and saved["arguments"]["expert_model_parallel_size"] == 2


def test_resume_under_another_layout_tp2_ep2_to_one_rank(data_path, tmp_path):
    """Save under TP2xEP2 (SP, 4 ranks), resume on 1 rank: the loss continues (model and Adam
    state resharded; the data order does not depend on the layout). Not bit-exact: TP changes
    the order of fp32 reductions, which can flip an expert-choice top-k at a near tie (measured:
    6e-4 at the first resumed step); a failed reshard would restart near the initial 6.07."""
    root = str(tmp_path)
    common = MOMA_2T2I + ["--global-batch-size", "4", "--lr", "3e-3", "--use-distributed-optimizer"]
    layout = ["--tensor-model-parallel-size", "2", "--sequence-parallel",
              "--expert-model-parallel-size", "2"]
    save = os.path.join(root, "ckpt")
    assert _train(4, _args(data_path, root, "tp2ep2", 4, *common, *layout)) == 0
    assert _train(4, _args(data_path, root, "first", 4, *common, *layout, "--save", save,
                           "--exit-interval", "2")) == 0
    assert _train(1, _args(data_path, root, "second", 4, *common, "--load", save)) == 0
    straight = _scalars(os.path.join(root, "tb-tp2ep2"), "lm loss")
    resumed = _scalars(os.path.join(root, "tb-second"), "lm loss")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(straight[step], abs=5e-3)


@pytest.mark.parametrize("architecture", [
    ["--architecture", "dense"],
    MOMA_2T2I,
    ["--architecture", "mot"],
    ["--architecture", "mot+moma", "--moma-experts-per-modality", "2", "2"],
    ["--architecture", "moma", "--mod", "--mod-capacity", "0.5"],
    ["--architecture", "moma", "--moma-experts-per-modality", "4"],
], ids=["dense", "moma", "mot", "mot+moma", "moma+mod", "moe_4x_mixed"])
def test_every_architecture_reduces_the_loss(data_path, tmp_path, architecture):
    root = str(tmp_path)
    argv = _args(data_path, root, "run", 30, *architecture, "--global-batch-size", "4",
                 "--lr", "1e-2", "--lr-warmup-iters", "3", "--eval-interval", "30", "--eval-iters", "2")
    assert _train(1, argv) == 0
    losses = _scalars(os.path.join(root, "tb-run"), "lm loss")
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (28, 29, 30)) / 3
    assert last < first - 1.0, (first, last)
    validation = _scalars(os.path.join(root, "tb-run"), "lm loss validation")
    assert list(validation) == [30] and validation[30] < first - 1.0
    image = _scalars(os.path.join(root, "tb-run"), "image loss")
    assert image[30] < image[1]
    if architecture == MOMA_2T2I:
        # Expert choice at capacity factor 1: each of a group's experts takes ceil(n / E) of its
        # n tokens, so every expert's load is exactly the ideal.
        for layer, group, expert in [(1, "text", 0), (2, "image", 1)]:
            load = _scalars(os.path.join(root, "tb-run"), f"moma/layer{layer:03d}/{group}/expert{expert}_load")
            assert set(load.values()) == {1.0}
        taken = [_scalars(os.path.join(root, "tb-run"), f"moma/layer001/image/tokens_taken_by_{n}")[30]
                 for n in ("0", "1", "2plus")]
        assert sum(taken) == pytest.approx(1.0) and taken[0] > 0
    if architecture[-1:] == ["4"]:  # one expert group over text and image tokens
        tags = EventAccumulator(os.path.join(root, "tb-run")).Reload().Tags()["scalars"]
        assert "moma/layer001/text/expert3_load" in tags
        assert not [tag for tag in tags if tag.startswith("moma/layer001/image")]
    if "--mod" in architecture:  # MoD on layer 1 only, half of each 32-token sequence
        assert set(_scalars(os.path.join(root, "tb-run"), "mod/layer001/selection_rate").values()) == {0.5}


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(data_path, tmp_path, capfd):
    """SGD at lr 1e20 without clipping: step 1 is finite, then the weights overflow and the
    loss of step 2 is not finite; the run stops with exit code 3 and saves nothing more."""
    save = str(tmp_path / "ckpt")
    argv = _args(data_path, str(tmp_path), "run", 5, "--global-batch-size", "2", "--optimizer", "sgd",
                 "--sgd-momentum", "0", "--lr", "1e20", "--clip-grad", "0", "--save", save,
                 "--save-interval", "1")
    assert _train(1, argv) == 3
    assert "ERROR: the lm loss is nan at iteration 2" in capfd.readouterr().out
    assert checkpointing.read_tracker(save) == 1
    assert sorted(os.listdir(save)) == ["iter_0000001", "latest_checkpointed_iteration.txt"]


def test_sigterm_saves_and_exits_cleanly(data_path, tmp_path):
    save = str(tmp_path / "ckpt")
    command = [sys.executable, "-m", "megatron_moma.training.pretrain_moma",
               *_args(data_path, str(tmp_path), "run", 100000, "--global-batch-size", "2",
                      "--lr", "1e-3", "--save", save, "--exit-signal-handler")]
    environment = dict(os.environ, PYTHONPATH=WORKTREE)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=environment)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "iteration        3/" in line:
                process.send_signal(signal.SIGTERM)
                break
        output = "".join(lines) + process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    stopped_at = checkpointing.read_tracker(save)
    assert stopped_at is not None and 3 <= stopped_at < 100000
    assert f"exiting on SIGTERM at iteration {stopped_at}" in output
    assert not any(name.endswith(".tmp") for name in os.listdir(save))


def test_exit_duration_saves_and_exits_after_the_first_step_past_it(data_path, tmp_path, capfd):
    """Megatron-LM's --exit-duration-in-mins counts from the start of the trainer: a limit that
    start-up alone exceeds stops the run after its first step, saved."""
    save = str(tmp_path / "ckpt")
    argv = _args(data_path, str(tmp_path), "run", 50, "--global-batch-size", "2", "--lr", "1e-3",
                 "--save", save, "--exit-duration-in-mins", "1e-4")
    assert _train(1, argv) == 0
    assert checkpointing.read_tracker(save) == 1
    assert "exiting after 0.0001 minutes (--exit-duration-in-mins) at iteration 1" in capfd.readouterr().out


def _upcycle(argv):
    from megatron_moma.training.upcycling import main

    return main(argv)


def _plain_tensors(directory):
    from megatron.core import dist_checkpointing

    tensors = dist_checkpointing.load_plain_tensors(directory)
    return {k: v for k, v in tensors.items() if k.startswith(("decoder", "embedding", "output"))}


STAGE_ONE = MOMA_2T2I[:2] + ["--moma-experts-per-modality", "1", "1", "--global-batch-size", "4",
                             "--lr", "1e-2", "--lr-warmup-iters", "2"]


def test_upcycled_1t1i_resumes_with_copied_experts_fresh_schedule_and_kept_data_position(
        data_path, tmp_path):
    root = str(tmp_path)
    first, second = os.path.join(root, "1t1i"), os.path.join(root, "2t2i")
    assert _train(1, _args(data_path, root, "1t1i", 6, *STAGE_ONE, "--save", first)) == 0
    assert run_on_ranks(_upcycle, 1, ["--load", first, "--save", second,
                                      "--moma-experts-per-modality", "2", "2"], timeout=120) == [0]
    assert checkpointing.read_tracker(second) == 6
    source = run_on_ranks(_plain_tensors, 1, checkpointing.checkpoint_dir(first, 6))[0]
    target = run_on_ranks(_plain_tensors, 1, checkpointing.checkpoint_dir(second, 6))[0]
    for modality in ("text", "image"):
        for linear in ("linear_fc1", "linear_fc2"):
            key = f"decoder.layers.mlp.experts.{modality}.experts.{linear}.weight"
            assert source[key].shape[1] == 1 and target[key].shape[1] == 2
            for expert in range(2):
                assert torch.equal(target[key][:, expert], source[key][:, 0])
        assert f"decoder.layers.mlp.routers.{modality}.weight" in target
    for key in source:
        if ".experts." not in key:
            assert torch.equal(target[key], source[key]), key
    assert checkpointing.read_run_config(checkpointing.checkpoint_dir(second, 6))["arguments"][
        "moma_gumbel_noise"] is True

    resume = MOMA_2T2I + ["--moma-gumbel-noise", "--global-batch-size", "4", "--lr", "1e-2",
                          "--lr-warmup-iters", "2", "--expert-model-parallel-size", "2"]
    assert _train(2, _args(data_path, root, "resumed", 9, *resume, "--load", second)) == 0
    learning_rate = _scalars(os.path.join(root, "tb-resumed"), "learning-rate")
    assert sorted(learning_rate) == [7, 8, 9]
    assert learning_rate[7] == pytest.approx(0.5e-2)  # the warm-up starts again
    samples = _scalars(os.path.join(root, "tb-resumed"), "lm loss vs samples")
    assert sorted(samples) == [28, 32, 36]  # the data position continues after 6 x 4 samples
    initial = _scalars(os.path.join(root, "tb-1t1i"), "lm loss")[1]
    assert _scalars(os.path.join(root, "tb-resumed"), "lm loss")[7] < initial - 0.5


def test_aux_router_stage_trains_only_the_auxiliary_routers(data_path, tmp_path):
    root = str(tmp_path)
    trained, stage_two = os.path.join(root, "trained"), os.path.join(root, "aux")
    common = MOMA_2T2I + ["--global-batch-size", "4"]
    assert _train(1, _args(data_path, root, "main", 4, *common, "--lr", "1e-2", "--save", trained)) == 0
    assert _train(1, _args(data_path, root, "aux", 10, *common, "--train-aux-routers", "--load",
                           trained, "--save", stage_two, "--eval-interval", "10")) == 0
    before = run_on_ranks(_plain_tensors, 1, checkpointing.checkpoint_dir(trained, 4))[0]
    after = run_on_ranks(_plain_tensors, 1, checkpointing.checkpoint_dir(stage_two, 10))[0]
    assert before.keys() == after.keys()
    for key in before:
        changed = not torch.equal(before[key], after[key])
        assert changed == (".aux_routers." in key), key
    # The paper's schedule by default: warm-up over 20% of the steps to 1e-4, linear decay to 1e-6.
    learning_rate = _scalars(os.path.join(root, "tb-aux"), "learning-rate")
    assert (learning_rate[1], learning_rate[2], learning_rate[10]) == pytest.approx((5e-5, 1e-4, 1e-6))
    assert list(_scalars(os.path.join(root, "tb-aux"), "lm loss validation")) == [10]
    for tag in ("moma/layer001/text/aux_router_accuracy", "moma/layer002/image/aux_router_recall"):
        values = _scalars(os.path.join(root, "tb-aux"), tag)
        assert len(values) == 10 and all(0.0 <= v <= 1.0 for v in values.values())


def test_a_save_killed_half_way_leaves_the_previous_checkpoint_as_latest(data_path, tmp_path):
    """A kill during a save leaves `iter_NNNNNNN.tmp/` behind and the tracker untouched: the
    next run resumes from the previous checkpoint and its first save removes the leftover."""
    root, save = str(tmp_path), str(tmp_path / "ckpt")
    common = ["--global-batch-size", "2", "--lr", "1e-3", "--save", save, "--load", save]
    assert _train(1, _args(data_path, root, "first", 4, *common, "--exit-interval", "2")) == 0
    unfinished = os.path.join(save, "iter_0000003.tmp")
    os.makedirs(unfinished)
    with open(os.path.join(unfinished, "__0_0.distcp"), "wb") as partial:
        partial.write(b"\0" * 100)
    assert checkpointing.read_tracker(save) == 2
    assert _train(1, _args(data_path, root, "second", 4, *common, "--save-interval", "1")) == 0
    assert sorted(_scalars(os.path.join(root, "tb-second"), "lm loss")) == [3, 4]
    assert sorted(os.listdir(save)) == ["iter_0000002", "iter_0000003", "iter_0000004",
                                        "latest_checkpointed_iteration.txt"]
    assert checkpointing.read_tracker(save) == 4
