"""Run a function on N gloo ranks forked from the current process.

Forking after megatron-core has been imported once costs milliseconds per rank, against 10-28 s
for a torchrun start (docs/cpu.md), so parallel-equivalence tests fork. Ranks rendezvous through a
file store in a fresh temporary directory (no TCP port to collide on), die with their parent,
and are killed when the run fails or times out. Each rank leads its own process group, which is
killed as a whole at the end, so helpers a rank started (dist_checkpointing's Manager process, for
one) go with it: no process outlives `run_on_ranks`.
"""

import ctypes
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import tempfile
import time
import traceback
from typing import Any, Callable, List

import torch
import torch.distributed as dist

_PR_SET_PDEATHSIG = 1
_EXIT_GRACE_SECONDS = 10.0


class RankFailure(RuntimeError):
    """One or more ranks raised, crashed or timed out; the message holds each rank's traceback."""


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the process that forked it exits."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def _rank_main(fn, args, kwargs, rank, world_size, store_path, connection, threads_per_rank):
    os.setpgid(0, 0)
    _die_with_parent()
    torch.set_num_threads(threads_per_rank)
    status = 0
    try:
        from megatron_moma.platform import activate_platform

        activate_platform()
        dist.init_process_group(
            "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size
        )
        result = ("ok", fn(*args, **kwargs))
    except BaseException:  # report everything, SystemExit and KeyboardInterrupt included
        result = ("error", f"rank {rank}:\n{traceback.format_exc()}")
        status = 1
    try:
        connection.send_bytes(pickle.dumps(result))
    except Exception:
        connection.send_bytes(pickle.dumps(("error", f"rank {rank}: unpicklable result")))
        status = 1
    connection.close()
    if dist.is_initialized():
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
        except Exception:
            pass
    os._exit(status)


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args,
    timeout: float = 300.0,
    threads_per_rank: int = 1,
    **kwargs,
) -> List[Any]:
    """Call `fn(*args, **kwargs)` on `world_size` forked gloo ranks; return each rank's result.

    Each rank has the CPU platform active and `torch.distributed` initialised (gloo); `fn` sets
    up whatever Megatron parallel state it needs. Results must be picklable.
    Raises `RankFailure` with every failing rank's traceback if a rank raises, exits without a
    result, or the run exceeds `timeout` seconds; all ranks are killed before it returns.
    """
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="moma-ranks-") as store_dir:
        store_path = os.path.join(store_dir, "store")
        processes, receivers = [], []
        for rank in range(world_size):
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(
                target=_rank_main,
                args=(fn, args, kwargs, rank, world_size, store_path, sender, threads_per_rank),
                daemon=False,  # dist_checkpointing starts a Manager process from ranks
            )
            process.start()
            sender.close()
            processes.append(process)
            receivers.append(receiver)
        grace = 0.0
        try:
            results = _collect(processes, receivers, timeout)
            grace = _EXIT_GRACE_SECONDS  # ranks that reported may still be tearing down
            return results
        finally:
            for process in processes:
                process.join(timeout=grace)
                _kill_process_group(process.pid)
                process.join()
            for receiver in receivers:
                receiver.close()


def _kill_process_group(leader_pid: int) -> None:
    try:
        os.killpg(leader_pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _collect(processes, receivers, timeout) -> List[Any]:
    deadline = time.monotonic() + timeout
    results: List[Any] = [None] * len(processes)
    pending = set(range(len(processes)))
    errors = []
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            errors.append(f"timed out after {timeout:.0f} s; ranks {sorted(pending)} still running")
            break
        ready = multiprocessing.connection.wait([receivers[r] for r in pending], timeout=remaining)
        for receiver in ready:
            rank = receivers.index(receiver)
            pending.discard(rank)
            try:
                status, value = pickle.loads(receiver.recv_bytes())
            except EOFError:
                processes[rank].join(timeout=5)
                status, value = "error", (
                    f"rank {rank} exited with code {processes[rank].exitcode} and no result"
                )
            if status == "ok":
                results[rank] = value
            else:
                errors.append(value)
        if errors:
            break
    if errors:
        raise RankFailure("\n".join(errors))
    return results
