"""The Slurm launch scripts under a real Slurm: `examples/slurm/pretrain_tiny_cpu.sh` (common.sh's
launch: one torchrun per node, c10d rendezvous on the first node's NodeAddr) submitted with sbatch
to the two-node cluster of the `slurm_cluster` fixture (tests/slurm_cluster.py).

One uninterrupted job is the reference: a job resubmitted after it stopped, and a job requeued by
`scontrol requeue` mid-run (Slurm's SIGTERM, KillWait, requeue), must log the same loss at every
iteration. The tiny MoMa 2t2i model trains with expert parallelism 2 across the two nodes (one
gloo process per node).
"""

import os
import re
import sys
import time
from pathlib import Path
from typing import Dict

import pytest

from megatron_moma.testing.trainer_runs import tensorboard_scalars
from megatron_moma.training import checkpointing

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "slurm" / "pretrain_tiny_cpu.sh"
NAME = "moma_tiny_cpu"  # the script's checkpoint folder under CKPT_ROOT
TRAIN_ITERS = 40
PYTHON_BIN = os.path.dirname(sys.executable)  # the jobs' torchrun: this interpreter's (a venv's)
JOB_TIMEOUT = 360  # seconds; a job takes 20-40 s on an idle 2-core machine

pytestmark = pytest.mark.slurm


class TinyJobs:
    """Submits the tiny CPU script to `cluster` with its checkpoints under `folder`."""

    def __init__(self, cluster, folder: Path, data_path: str):
        self.cluster, self.folder, self.data_path = cluster, folder, data_path
        self.ckpt = folder / "ckpt" / NAME

    def submit(self, *sbatch_options: str, **variables: str) -> int:
        """sbatch the script with these options and environment variables (the script's
        overridable ones: TRAIN_ITERS, EXTRA_ARGS, ...); the job id."""
        from slurm_cluster import free_ports

        environment = self.cluster.environment(
            PATH=os.pathsep.join([PYTHON_BIN, os.environ["PATH"]]),
            MOMA_ROOT=str(ROOT),
            PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            DATA_PATH=self.data_path, CKPT_ROOT=str(self.folder / "ckpt"),
            MASTER_PORT=str(free_ports(1)[0]), TRAIN_ITERS=str(TRAIN_ITERS), LOGLEVEL="INFO",
            PYTHONUNBUFFERED="1")
        environment.update(variables)
        environment.pop("MASTER_ADDR", None)  # the script resolves the first node's address
        options = [f"--output={self.folder}/job-%j.out", *sbatch_options]
        return self.cluster.submit([*options, str(SCRIPT)], env=environment, cwd=str(self.folder))

    def output(self, job: int) -> str:
        path = self.folder / f"job-{job}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_done(self, job: int) -> Dict[str, str]:
        fields = self.cluster.wait_for_job(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                 "NODE_FAIL", "OUT_OF_MEMORY"}, JOB_TIMEOUT)
        assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), self.output(job)
        return fields

    def wait_for_output(self, job: int, pattern: str, timeout: float = JOB_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.output(job)):
            state = self.cluster.job_fields(job)["JobState"]
            assert state in {"PENDING", "CONFIGURING", "RUNNING"}, (state, self.output(job))
            assert time.monotonic() < deadline, f"no {pattern!r} in {timeout} s:\n" + self.output(job)
            time.sleep(0.2)
        return self.output(job)

    def losses(self, tag: str = "lm loss") -> Dict[int, float]:
        return tensorboard_scalars(str(self.ckpt / "tensorboard"), tag)


@pytest.fixture(scope="module")
def straight(slurm_cluster, data_path, tmp_path_factory):
    """The uninterrupted job: (TinyJobs, its output, `scontrol show step` of its torchrun step
    while it ran)."""
    jobs = TinyJobs(slurm_cluster, tmp_path_factory.mktemp("straight"), data_path)
    job = jobs.submit()
    deadline = time.monotonic() + JOB_TIMEOUT
    step = {}
    while not step and time.monotonic() < deadline:
        step = slurm_cluster.step_fields(job)
        state = slurm_cluster.job_fields(job)["JobState"]
        if not step and state not in {"PENDING", "CONFIGURING", "RUNNING"}:
            break
        time.sleep(0.5)
    jobs.wait_done(job)
    return jobs, jobs.output(job), step


def test_slurm_two_node_job_trains_evaluates_and_saves(straight):
    jobs, output, step = straight
    # srun started one torchrun on each node; both agents met at the first node's NodeAddr
    # (127.0.0.1 in slurm.conf: `scontrol show hostnames` gives n1, which does not resolve).
    assert (step["Name"], step["NodeList"], step["Tasks"]) == ("torchrun", "n[1-2]", "2"), step
    endpoints = set(re.findall(r"rdzv_endpoint\s*:\s*(\S+)", output))
    assert len(endpoints) == 1 and endpoints.pop().startswith("127.0.0.1:"), output
    assert sorted(re.findall(r"group_rank=(\d)", output)) == ["0", "1"], output
    assert checkpointing.read_tracker(str(jobs.ckpt)) == TRAIN_ITERS
    assert sorted(os.listdir(jobs.ckpt)) == ["iter_0000020", "iter_0000040",
                                             "latest_checkpointed_iteration.txt", "tensorboard"]
    saved = checkpointing.read_run_config(checkpointing.checkpoint_dir(str(jobs.ckpt), TRAIN_ITERS))
    assert saved["world_size"] == 2 and saved["arguments"]["expert_model_parallel_size"] == 2
    losses = jobs.losses()
    assert sorted(losses) == list(range(1, TRAIN_ITERS + 1))
    assert sum(losses[s] for s in (38, 39, 40)) / 3 < sum(losses[s] for s in (1, 2, 3)) / 3 - 0.5
    assert sorted(jobs.losses("lm loss validation")) == [20, 40]


def test_slurm_resubmitted_job_resumes_with_the_uninterrupted_losses(straight, slurm_cluster,
                                                                       data_path, tmp_path):
    reference = straight[0]
    jobs = TinyJobs(slurm_cluster, tmp_path, data_path)
    first = jobs.submit(EXTRA_ARGS="--exit-interval 10")
    jobs.wait_done(first)
    assert checkpointing.read_tracker(str(jobs.ckpt)) == 10
    second = jobs.submit()  # the same script, resubmitted
    jobs.wait_done(second)
    assert f"loaded checkpoint from {jobs.ckpt} at iteration 10" in jobs.output(second)
    assert checkpointing.read_tracker(str(jobs.ckpt)) == TRAIN_ITERS
    assert jobs.losses() == reference.losses()
    assert jobs.losses("lm loss validation") == reference.losses("lm loss validation")


def test_slurm_requeued_job_saves_within_killwait_and_resumes_exactly(straight, slurm_cluster,
                                                                       data_path, tmp_path):
    """Requeued after its first checkpoint (iteration 5): the ranks then have checkpoint helper
    processes, which Slurm's SIGTERM reaches too; the exit save must survive them."""
    from slurm_cluster import KILL_WAIT

    reference = straight[0]
    jobs = TinyJobs(slurm_cluster, tmp_path, data_path)
    job = jobs.submit(SAVE_INTERVAL="5")
    jobs.wait_for_output(job, r"saved checkpoint at iteration 5 ")
    requeued_at = time.time()
    slurm_cluster.command(["scontrol", "requeue", str(job)])
    fields = jobs.wait_done(job)
    output = jobs.output(job)
    assert fields["Restarts"] == "1", fields
    stopped = re.findall(r"exiting on SIGTERM at iteration (\d+)", output)
    assert len(stopped) == 1, output
    stopped_at = int(stopped[0])
    assert 5 < stopped_at < TRAIN_ITERS
    assert f"saved checkpoint at iteration {stopped_at} to {jobs.ckpt}" in output, output
    exit_save = Path(checkpointing.checkpoint_dir(str(jobs.ckpt), stopped_at))
    saved_after = max(path.stat().st_mtime for path in exit_save.rglob("*")) - requeued_at
    assert saved_after < KILL_WAIT, f"the exit save ended {saved_after:.1f} s after the requeue"
    assert f"loaded checkpoint from {jobs.ckpt} at iteration {stopped_at}" in output, output
    assert checkpointing.read_tracker(str(jobs.ckpt)) == TRAIN_ITERS
    assert jobs.losses() == reference.losses()
    assert jobs.losses("lm loss validation") == reference.losses("lm loss validation")


def test_slurm_exit_duration_saves_and_stops_before_the_time_limit(slurm_cluster, data_path,
                                                                   tmp_path):
    """--time=2 and EXIT_DURATION_IN_MINS=0.25: the trainers stop together 15 s after they
    started, save and exit, and the job completes before its limit instead of timing out (the
    limit leaves a loaded 2-core machine a minute and more to start the trainers)."""
    jobs = TinyJobs(slurm_cluster, tmp_path, data_path)
    job = jobs.submit("--time=2", TRAIN_ITERS="100000", EXIT_DURATION_IN_MINS="0.25",
                           SAVE_INTERVAL="100000", EVAL_INTERVAL="100000")
    fields = jobs.wait_done(job)
    assert fields["TimeLimit"] == "00:02:00" and fields["RunTime"] < "00:02:00", fields
    output = jobs.output(job)
    stopped = re.findall(
        r"exiting after 0.25 minutes \(--exit-duration-in-mins\) at iteration (\d+)", output)
    assert len(stopped) == 1, output
    assert checkpointing.read_tracker(str(jobs.ckpt)) == int(stopped[0]) > 0
    assert sorted(jobs.losses()) == list(range(1, int(stopped[0]) + 1))


@pytest.mark.parametrize("uid, reason", [("1000", "not root"), ("0", "no apt-get")])
def test_slurm_tests_skip_with_the_reason_where_slurm_cannot_be_installed(tmp_path, monkeypatch,
                                                                          uid, reason):
    """No Slurm commands on PATH, and either not root or no apt-get: the cluster fixture's skip
    reason (install_or_reason) says which, and the install script exits 1."""
    from slurm_cluster import install_or_reason

    fake_id = tmp_path / "id"
    fake_id.write_text(f"#!/bin/bash\necho {uid}\n")
    fake_id.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    message = install_or_reason(timeout=60)
    assert message is not None and reason in message and "slurmctld" in message, message
