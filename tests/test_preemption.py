"""Preemption under torchrun: SIGTERM to torchrun, to every process at once (as Slurm signals a
step), or to one worker of a 2-rank MoMa EP2 run with --exit-signal-handler. Each ends with a
complete checkpoint of the iteration the run stopped at, named by the tracker, after the step
in progress; resuming it continues with the losses of a run that was never interrupted.

torchrun 2.13 stops its workers with `killpg(worker, SIGTERM)` and sends SIGKILL after its
--shutdown-timeout (30 s by default); "forcefully exiting" in its log would mean the exit save
did not make it in time. The uninterrupted reference and the resumed runs are forked ranks
(`pretrain_on_ranks`), so the test starts torchrun once per way of signalling.
"""

import os
import re
import signal
import subprocess
import sys
from typing import List

import pytest

from megatron_moma.testing.trainer_runs import MOMA_2T2I, pretrain_on_ranks, tensorboard_scalars, trainer_flags
from megatron_moma.training import checkpointing

WORKTREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_ITERS = 1000  # the schedule of every run; they stop by signal or --exit-interval
SIGNAL_AFTER = 4  # the iteration whose log line triggers the signal
REFERENCE_ITERS = 40
COMMON = MOMA_2T2I + ["--expert-model-parallel-size", "2", "--moma-gumbel-noise",
                      "--global-batch-size", "4", "--lr", "3e-3", "--lr-warmup-iters", "2",
                      "--lr-decay-iters", "50", "--min-lr", "1e-4", "--use-distributed-optimizer",
                      "--exit-signal-handler"]


@pytest.fixture(scope="module")
def reference(data_path, tmp_path_factory):
    """{iteration: lm loss} of the uninterrupted run, iterations 1..REFERENCE_ITERS."""
    root = str(tmp_path_factory.mktemp("reference"))
    argv = trainer_flags(data_path, root, "run", TRAIN_ITERS, *COMMON,
                         "--exit-interval", str(REFERENCE_ITERS))
    assert pretrain_on_ranks(2, argv) == 0
    return tensorboard_scalars(os.path.join(root, "tb-run"), "lm loss")


def _children(pid: int) -> List[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(child) for child in children.read().split()]


def _signal(mode: str, torchrun: int) -> None:
    workers = _children(torchrun)
    assert len(workers) == 2, workers
    if mode == "torchrun":
        os.kill(torchrun, signal.SIGTERM)
    elif mode == "every process":  # Slurm: the launcher, the workers and whatever they started
        os.kill(torchrun, signal.SIGTERM)
        for worker in workers:
            os.killpg(worker, signal.SIGTERM)  # torchrun starts each worker in its own session
    else:
        os.kill(workers[0], signal.SIGTERM)


def _run_and_signal(command: List[str], mode: str) -> subprocess.CompletedProcess:
    """Start torchrun, signal as `mode` says once iteration SIGNAL_AFTER is logged, wait."""
    environment = dict(os.environ, PYTHONPATH=WORKTREE, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=environment, start_new_session=True)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if f"iteration {SIGNAL_AFTER:8d}/" in line:
                _signal(mode, process.pid)
                break
        output = "".join(lines) + process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            for worker in _children(process.pid):
                os.killpg(worker, signal.SIGKILL)
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(command, process.returncode, output)


@pytest.mark.parametrize("mode, extra", [
    ("torchrun", ["--save-interval", "2"]),  # a save before the signal, so helpers exist
    ("every process", ["--save-interval", "1"]),  # the signal also finds a save's writer processes
    ("one worker", []),  # the exit save is the first save
])
def test_sigterm_under_torchrun_saves_the_iteration_and_resumes_exactly(
        data_path, tmp_path, reference, mode, extra):
    root, save = str(tmp_path), str(tmp_path / "ckpt")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "megatron_moma.training.pretrain_moma",
               *trainer_flags(data_path, root, "signalled", TRAIN_ITERS, *COMMON, *extra,
                              "--save", save)]
    completed = _run_and_signal(command, mode)
    output = completed.stdout
    stops = re.findall(r"exiting on SIGTERM at iteration (\d+)", output)
    assert len(stops) == 1, output
    stopped_at = int(stops[0])
    assert SIGNAL_AFTER <= stopped_at <= REFERENCE_ITERS - 2, output
    assert checkpointing.read_tracker(save) == stopped_at
    assert not [name for name in os.listdir(save) if name.endswith(".tmp")]
    assert "forcefully exiting" not in output and "[rank" not in output, output
    if mode == "one worker":
        assert completed.returncode == 0, output
    else:  # torchrun itself ends with the SignalException it raised, after its workers exited 0
        assert completed.returncode == 1 and "SignalException" in output, output
        assert "ChildFailedError" not in output, output

    signalled = tensorboard_scalars(os.path.join(root, "tb-signalled"), "lm loss")
    assert signalled == {step: reference[step] for step in range(1, stopped_at + 1)}
    resumed_to = stopped_at + 2
    assert pretrain_on_ranks(2, trainer_flags(data_path, root, "resumed", TRAIN_ITERS, *COMMON,
                                              "--load", save, "--save", save,
                                              "--exit-interval", str(resumed_to))) == 0
    assert checkpointing.read_tracker(save) == resumed_to
    resumed = tensorboard_scalars(os.path.join(root, "tb-resumed"), "lm loss")
    assert resumed == {step: reference[step] for step in (stopped_at + 1, resumed_to)}
