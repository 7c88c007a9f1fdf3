"""Checkpoints in Megatron-LM's layout, written with megatron-core dist_checkpointing (torch_dist).

    {save}/iter_0000100/                  the torch_dist checkpoint, plus run_config.json
    {save}/latest_checkpointed_iteration.txt

A save never damages the previous checkpoint: ranks write into `iter_NNNNNNN.tmp/`, rank 0 adds
the run config, renames the folder to `iter_NNNNNNN/` and only then replaces the tracker through
a temporary file and `os.replace` (atomic on POSIX). A save killed half-way leaves a `.tmp`
folder that the next save removes; the tracker still names the last complete checkpoint.

Content: every model chunk (`model` or `model0`, `model1`, ... under virtual pipelining), the
optimizer (the distributed optimizer in the `fully_reshardable` format, so that Adam's moments
and step survive any change of TP/PP/EP/DP, CPU_NOTES.md), the LR scheduler, the RNG states of
every rank, the iteration and the data position (consumed samples). RNG states are per rank:
they are restored when the layout is the one saved, and left seeded otherwise.
"""

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

import numpy
import torch
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

import megatron_moma
from megatron_moma.data.vocabulary import VocabularyLayout
from megatron_moma.platform import checkpoint_writers
from megatron_moma.training.arguments import ArgumentError
from megatron_moma.training.configs import parallel_layout

TRACKER = "latest_checkpointed_iteration.txt"
RUN_CONFIG = "run_config.json"
CHECKPOINT_FORMAT_VERSION = 1


@dataclass
class TrainState:
    """Where a run is: completed iterations, consumed training samples, FLOPs so far."""

    iteration: int = 0
    consumed_train_samples: int = 0
    floating_point_operations_so_far: float = 0.0


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> Optional[int]:
    """The iteration named by the tracker, or None when `root` has no checkpoint."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path) as tracker:
        text = tracker.read().strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}: expected an iteration number, found {text!r}")


def _write_tracker(root: str, iteration: int) -> None:
    temporary = os.path.join(root, TRACKER + ".tmp")
    with open(temporary, "w") as tracker:
        tracker.write(str(iteration))
        tracker.flush()
        os.fsync(tracker.fileno())
    os.replace(temporary, os.path.join(root, TRACKER))


def _model_keys(models: List[torch.nn.Module]) -> List[str]:
    return ["model"] if len(models) == 1 else [f"model{i}" for i in range(len(models))]


def _rng_state() -> Dict[str, Any]:
    state = {
        "random": random.getstate(),
        "numpy": numpy.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["random"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state) -> ShardedObject:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _sharded_state_dict(models, optimizer, scheduler, train_state: TrainState, *, is_loading: bool,
                        with_optimizer: bool, with_rng: bool) -> Dict[str, Any]:
    state: Dict[str, Any] = {"checkpoint_version": CHECKPOINT_FORMAT_VERSION,
                             "train_state": asdict(train_state),
                             "content": {"optimizer": with_optimizer, "rng": with_rng}}
    for key, model in zip(_model_keys(models), models):
        state[key] = model.sharded_state_dict()
    if with_optimizer:
        model_state = {k: state[k] for k in _model_keys(models)}
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable"})
        state["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = _rng_sharded_object(_rng_state())
    return state


def save_checkpoint(root: str, models, optimizer, scheduler, train_state: TrainState,
                    run_config: Dict[str, Any], *, save_optimizer: bool = True,
                    save_rng: bool = True) -> str:
    """Save iteration `train_state.iteration` under `root` (all ranks call); returns its folder.

    `models`: this rank's model chunks (GPT modules, not their DDP wrappers)."""
    final = checkpoint_dir(root, train_state.iteration)
    temporary = final + ".tmp"
    if torch.distributed.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        _remove_unfinished_saves(root)
        os.makedirs(temporary)
    torch.distributed.barrier()
    state = _sharded_state_dict(models, optimizer, scheduler, train_state, is_loading=False,
                                with_optimizer=save_optimizer, with_rng=save_rng)
    checkpoint_writers.use_in_process_write_results()  # no Manager process to die on SIGTERM
    dist_checkpointing.save(state, temporary)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(temporary, RUN_CONFIG), "w") as config_file:
            json.dump(run_config, config_file, indent=2, sort_keys=True, default=str)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.rename(temporary, final)
        _write_tracker(root, train_state.iteration)
    torch.distributed.barrier()
    return final


def _remove_unfinished_saves(root: str) -> None:
    for name in os.listdir(root):
        if name.startswith("iter_") and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, name))


def make_run_config(args, vocabulary: VocabularyLayout, padded_vocab_size: int, architecture: str,
                    world_size: int) -> Dict[str, Any]:
    """The run's full configuration, saved beside every checkpoint as run_config.json: every
    flag, the vocabulary layout, the padded vocabulary size and the parallel layout."""
    return {
        "megatron_moma_version": getattr(megatron_moma, "__version__", "0.1.0"),
        "architecture": architecture,
        "arguments": dict(vars(args)),
        "vocabulary": vocabulary.to_dict(),
        "padded_vocab_size": padded_vocab_size,
        "world_size": world_size,
        "parallel_layout": asdict(parallel_layout(args)),
    }


def read_run_config(directory: str) -> Dict[str, Any]:
    with open(os.path.join(directory, RUN_CONFIG)) as config_file:
        return json.load(config_file)


def load_checkpoint(root: str, models, optimizer, scheduler, *, same_layout: bool,
                    load_optimizer: bool = True, load_rng: bool = True,
                    iteration: Optional[int] = None) -> Optional[TrainState]:
    """Load checkpoint `iteration` (default: the tracker's) into the model (and optimizer,
    scheduler, RNG if present and asked for); returns its TrainState, or None when `root` has
    no checkpoint. RNG states load only under `same_layout` (they are per rank)."""
    if iteration is None:
        iteration = read_tracker(root)
    if iteration is None:
        return None
    directory = checkpoint_dir(root, iteration)
    common = dist_checkpointing.load_common_state_dict(directory)
    with_optimizer = load_optimizer and common["content"]["optimizer"]
    with_rng = load_rng and same_layout and common["content"]["rng"]
    state = _sharded_state_dict(models, optimizer, scheduler, TrainState(), is_loading=True,
                                with_optimizer=with_optimizer, with_rng=with_rng)
    loaded = dist_checkpointing.load(state, directory)
    for key, model in zip(_model_keys(models), models):
        model.load_state_dict(loaded[key])
    if with_optimizer:  # (`loaded` holds the checkpoint's common values whatever was asked)
        optimizer.load_state_dict(loaded["optimizer"])
        try:
            scheduler.load_state_dict(loaded["opt_param_scheduler"])
        except AssertionError as error:
            raise ArgumentError(f"{error} (in {directory}); pass --override-opt_param-scheduler "
                                "to use this run's LR schedule flags") from error
    if with_rng:
        _set_rng_state(loaded["rng_state"])
    return TrainState(**loaded["train_state"])

