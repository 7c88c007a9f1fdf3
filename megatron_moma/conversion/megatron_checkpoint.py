"""Reading a pretrain_moma checkpoint, saved under any parallel layout, into one whole model.

A checkpoint root holds `iter_NNNNNNN/` folders (torch_dist format plus run_config.json) and the
tracker `latest_checkpointed_iteration.txt` (megatron_moma.training.checkpointing). The model is
rebuilt at world size 1 from the run config (`world_size_one`) and its `sharded_state_dict` read
from the folder: dist_checkpointing reassembles every tensor from the TP/PP/VPP/EP shards that
were saved. A --load or --iteration that names no checkpoint is an ArgumentError (a flag error:
exit code 2); every other failure a ConversionError naming the path, the iteration and what was
expected.
"""

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from megatron.core.dist_checkpointing.core import CheckpointingException
from torch.distributed.checkpoint.api import CheckpointException

from megatron_moma.command_line import ArgumentError
from megatron_moma.conversion.errors import ConversionError
from megatron_moma.conversion.world_size_one import (
    build_world_size_one_model,
    world_size_one_arguments,
)
from megatron_moma.models import ModalityGPTModel
from megatron_moma.training import checkpointing
from megatron_moma.training.checkpointing import RUN_CONFIG, TRACKER, TrainState

ITERATION_FOLDER = re.compile(r"^iter_(\d{7})$")


@dataclass
class LoadedCheckpoint:
    """A checkpoint read into a world-size-1 model (in eval mode)."""

    model: ModalityGPTModel
    run_config: Dict[str, Any]
    directory: str
    train_state: TrainState


def saved_iterations(root: str) -> List[int]:
    """The iterations with a complete `iter_NNNNNNN/` folder under `root`, in order."""
    matches = (ITERATION_FOLDER.match(name) for name in os.listdir(root))
    return sorted(int(m.group(1)) for m in matches
                  if m and os.path.isdir(os.path.join(root, m.group(0))))


def locate_checkpoint(path: str, iteration: Optional[int] = None) -> Tuple[str, int]:
    """(checkpoint root, iteration) of `path`: a checkpoint root (iteration `iteration`, default
    the tracker's) or one `iter_NNNNNNN` folder in it."""
    if not os.path.isdir(path):
        raise ArgumentError(f"--load {path}: no such checkpoint directory")
    folder = ITERATION_FOLDER.match(os.path.basename(os.path.normpath(path)))
    if folder and not os.path.exists(os.path.join(path, TRACKER)):
        folder_iteration = int(folder.group(1))
        if iteration is not None and iteration != folder_iteration:
            raise ArgumentError(f"--load {path} is iteration {folder_iteration}, not --iteration "
                                f"{iteration}")
        return os.path.dirname(os.path.normpath(path)), folder_iteration
    available = saved_iterations(path)
    if iteration is None:
        try:
            iteration = checkpointing.read_tracker(path)
        except ValueError as error:
            raise ConversionError(str(error)) from error
        if iteration is None:
            found = (f"saved iterations {available}: pass --iteration" if available
                     else "no iter_NNNNNNN/ folders")
            raise ArgumentError(f"--load {path} is not a pretrain_moma checkpoint directory: no "
                                f"{TRACKER} ({found})")
    if iteration not in available:
        raise ArgumentError(f"--load {path}: no checkpoint of iteration {iteration} (no "
                              f"{os.path.basename(checkpointing.checkpoint_dir(path, iteration))}/; "
                              f"saved iterations: {available})")
    return path, iteration


def read_run_config(directory: str) -> Dict[str, Any]:
    """run_config.json of the checkpoint folder `directory`."""
    path = os.path.join(directory, RUN_CONFIG)
    try:
        run_config = checkpointing.read_run_config(directory)
    except FileNotFoundError:
        raise ConversionError(f"{directory}: no {RUN_CONFIG} (pretrain_moma writes it beside every "
                              "checkpoint; the model cannot be rebuilt without it)") from None
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path}: not valid JSON: {error}") from error
    missing = [key for key in ("arguments", "vocabulary", "padded_vocab_size") if key not in run_config]
    if missing:
        raise ConversionError(f"{path}: missing {missing} (expected a run config written by pretrain_moma)")
    return run_config


def load_world_size_one_model(path: str, iteration: Optional[int] = None,
                              overrides: Optional[Dict[str, Any]] = None) -> LoadedCheckpoint:
    """The whole model of checkpoint `path` (see `locate_checkpoint`), in eval mode.

    `overrides`: flags to change by argparse dest before the model is built (e.g.
    `{"moma_inference_routing": "expert_choice"}`). Needs `world_size_one_parallel_state`.
    """
    root, iteration = locate_checkpoint(path, iteration)
    directory = checkpointing.checkpoint_dir(root, iteration)
    run_config = read_run_config(directory)
    args = world_size_one_arguments(run_config)
    for name, value in (overrides or {}).items():
        setattr(args, name, value)
    try:
        model = build_world_size_one_model(args, run_config)
    except (KeyError, TypeError, ValueError) as error:
        raise ConversionError(f"{os.path.join(directory, RUN_CONFIG)}: cannot build its model: "
                              f"{error!r}") from error
    try:
        train_state = checkpointing.load_checkpoint(root, [model], None, None, same_layout=False,
                                                    load_optimizer=False, load_rng=False,
                                                    iteration=iteration)
    except (CheckpointingException, CheckpointException) as error:
        reason = str(error).strip().splitlines()[-1]  # torch's exception holds a traceback
        raise ConversionError(f"{directory}: the checkpoint does not hold the {args.architecture} "
                              f"model its {RUN_CONFIG} describes: {reason}") from error
    model.eval()
    return LoadedCheckpoint(model=model, run_config=run_config, directory=directory,
                            train_state=train_state)
