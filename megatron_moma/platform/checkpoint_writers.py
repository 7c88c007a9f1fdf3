"""dist_checkpointing saves that need no helper process a launcher's signal can kill.

megatron-core's torch_dist writer (dist_checkpointing/strategies/filesystem_async.py) collects
the write results of every save through `_get_write_results_queue()`: a queue served by a
`multiprocessing` Manager, a separate server process started with the spawn method at the first
save and kept for the life of the rank. That process is a fresh interpreter with the default
SIGTERM action, in the rank's process group. torchrun 2.13 stops its workers with
`os.killpg(worker, SIGTERM)` and Slurm signals every process of the step, so the Manager dies
with the signal that `--exit-signal-handler` was meant to turn into a save, and the exit save
fails (`BrokenPipeError`).

A synchronous save produces and reads its results in the calling process (`execute_sync` runs
the writer function in place, then `retrieve_write_results` reads the queue), so a process-local
queue serves it exactly; `use_in_process_write_results()` installs one. The writer processes a
save forks (one per file) remain: they are forks of the rank, so they inherit its Python SIGTERM
handler and outlive the signal like the rank does. megatron_moma never saves asynchronously;
megatron-core's async save, whose results cross from a persistent worker process, needs the
Manager and must not run in a process where this is active.
"""

import importlib
import queue
from typing import List

_MODULE = "megatron.core.dist_checkpointing.strategies.filesystem_async"
_ATTRIBUTE = "_get_write_results_queue"

_RESULTS = queue.SimpleQueue()


def _in_process_write_results_queue() -> queue.SimpleQueue:
    """The write results of a synchronous save: put and read by the saving process itself."""
    return _RESULTS


def check_target() -> List[str]:
    """The patch target if it no longer exists in the installed megatron-core (else empty)."""
    module = importlib.import_module(_MODULE)
    return [] if callable(vars(module).get(_ATTRIBUTE)) else [f"{_MODULE}.{_ATTRIBUTE}"]


def use_in_process_write_results() -> None:
    """Make dist_checkpointing's synchronous saves start no Manager process. Idempotent."""
    missing = check_target()
    if missing:
        raise RuntimeError(f"megatron_moma.platform.checkpoint_writers: {missing} no longer exists "
                           "(megatron-core is pinned to 0.16.1)")
    setattr(importlib.import_module(_MODULE), _ATTRIBUTE, _in_process_write_results_queue)

