"""The forked gloo rank harness: results, failures, timeouts, and no leftover processes."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from megatron_moma.testing.multiprocess import RankFailure, run_on_ranks


def _rank_and_sum():
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    return dist.get_rank(), dist.get_world_size(), float(value)


def _is_running(pid: int) -> bool:
    """True if `pid` exists and is not a zombie (a killed orphan waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_results_come_back_in_rank_order():
    assert run_on_ranks(_rank_and_sum, 3, timeout=60) == [(0, 3, 6.0), (1, 3, 6.0), (2, 3, 6.0)]


def _raise_on_rank_1():
    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")
    dist.barrier()  # rank 0 would wait here forever: the harness must kill it


def test_a_failing_rank_reports_its_traceback_and_the_others_are_killed():
    started = time.monotonic()
    with pytest.raises(RankFailure, match=r"(?s)rank 1:.*ValueError: boom on purpose"):
        run_on_ranks(_raise_on_rank_1, 2, timeout=60)
    assert time.monotonic() - started < 30


def _exit_without_result():
    os._exit(3)


def test_a_crashed_rank_is_reported_with_its_exit_code():
    with pytest.raises(RankFailure, match="exited with code 3"):
        run_on_ranks(_exit_without_result, 1, timeout=60)


def _record_pid_and_hang(directory):
    with open(os.path.join(directory, f"{dist.get_rank()}.pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


def test_a_timeout_kills_every_rank(tmp_path):
    with pytest.raises(RankFailure, match="timed out"):
        run_on_ranks(_record_pid_and_hang, 2, str(tmp_path), timeout=5)
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 2
    assert not any(_is_running(pid) for pid in pids)


def _start_a_grandchild():
    import subprocess

    return subprocess.Popen(["sleep", "600"]).pid


def test_processes_a_rank_started_do_not_outlive_the_run():
    grandchildren = run_on_ranks(_start_a_grandchild, 2, timeout=60)
    assert not any(_is_running(pid) for pid in grandchildren)
