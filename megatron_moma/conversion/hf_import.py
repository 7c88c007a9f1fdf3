"""`moma-convert import-hf`: a Hugging Face folder (as `export-hf` writes it) -> a pretrain_moma
checkpoint that `pretrain_moma --load` resumes from.

The checkpoint is written from one process at world size 1 in torch_dist format, which reshards
on load, so it loads under any layout the model splits into. The target parallel sizes given
(`--tensor-model-parallel-size`, `--pipeline-model-parallel-size`,
`--expert-model-parallel-size`, `--num-layers-per-virtual-pipeline-stage`,
`--sequence-parallel`) are checked against the model (heads and query groups over TP, layers
over PP and virtual stages, experts per group over EP, the padded vocabulary over TP) and recorded
in run_config.json. The checkpoint is iteration 0 with no optimizer, scheduler or RNG state:
training from it starts a fresh optimizer and LR schedule.
"""

import argparse
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from megatron_moma.conversion.errors import ConversionError
from megatron_moma.conversion.safetensors_shards import read_safetensors_shards
from megatron_moma.conversion.staged_directory import check_output_directory, staged_directory
from megatron_moma.conversion.world_size_one import (
    build_world_size_one_model,
    world_size_one_arguments,
    world_size_one_parallel_state,
)
from megatron_moma.data.vocabulary import VocabularyLayout
from megatron_moma.hf.configuration_moma import MoMaConfig
from megatron_moma.hf.mapping import hf_to_megatron_state_dict, run_arguments_from_hf_config
from megatron_moma.training import checkpointing, configs
from megatron_moma.training.arguments import ArgumentError, default_arguments, validate_model_split
from megatron_moma.training.checkpointing import TrainState

TARGET_PARALLEL_FLAGS = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                         "expert_model_parallel_size", "num_layers_per_virtual_pipeline_stage",
                         "sequence_parallel")
CONFIG_FILE = "config.json"


@dataclass
class ImportSummary:
    out: str
    architecture: str
    num_tensors: int
    parallel_layout: Dict[str, Any]


def read_hf_config(hf_dir: str) -> MoMaConfig:
    """The MoMaConfig of `hf_dir` (read with this package's class, no remote code)."""
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isdir(hf_dir):
        raise ArgumentError(f"--hf {hf_dir}: no such Hugging Face model directory")
    if not os.path.isfile(path):
        raise ArgumentError(f"--hf {hf_dir}: no {CONFIG_FILE} (expected a folder written by "
                            "moma-convert export-hf)")
    try:
        with open(path) as config_file:
            model_type = json.load(config_file).get("model_type")
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path}: not valid JSON: {error}") from error
    if model_type != MoMaConfig.model_type:
        raise ConversionError(f"{path}: model_type {model_type!r}, expected "
                              f"{MoMaConfig.model_type!r} (a megatron-moma export)")
    try:
        return MoMaConfig.from_pretrained(hf_dir)
    except (TypeError, ValueError, KeyError) as error:
        raise ConversionError(f"{path}: not a valid {MoMaConfig.__name__}: {error}") from error


def _minimal_world_size(args: argparse.Namespace) -> int:
    """The fewest ranks the layout runs on (no data parallelism beyond what EP needs)."""
    expert_tp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    pp = args.pipeline_model_parallel_size
    return math.lcm(args.tensor_model_parallel_size * pp, args.expert_model_parallel_size * expert_tp * pp)


def imported_run_config(hf_config: MoMaConfig, parallel_flags: Dict[str, Any], hf_dir: str) -> Dict[str, Any]:
    """run_config.json of the imported checkpoint: the trainer's defaults, overridden by the
    model's flags and the target parallel sizes, which must split the model."""
    try:
        model_flags = run_arguments_from_hf_config(hf_config)
    except (AttributeError, TypeError, ValueError) as error:
        raise ConversionError(f"{os.path.join(hf_dir, CONFIG_FILE)}: {error}") from error
    vocabulary = VocabularyLayout.from_dict(model_flags.pop("vocabulary"))
    padded_vocab_size = model_flags.pop("padded_vocab_size")
    args = argparse.Namespace(**{**default_arguments(), **model_flags, **parallel_flags})
    args.bf16 = str(hf_config.dtype).endswith("bfloat16")
    args.world_size = _minimal_world_size(args)
    args.data_parallel_size = args.world_size // (args.tensor_model_parallel_size
                                                  * args.pipeline_model_parallel_size)
    try:
        validate_model_split(args)
        if padded_vocab_size % args.tensor_model_parallel_size:
            raise ArgumentError(f"the padded vocabulary ({padded_vocab_size}) is not divisible by "
                                f"--tensor-model-parallel-size {args.tensor_model_parallel_size}")
        architecture = configs.transformer_config(args, vocabulary.modality_layout).architecture
    except ArgumentError as error:
        raise ArgumentError(f"the model of {hf_dir} does not split under the target layout: "
                            f"{error}") from error
    run_config = checkpointing.make_run_config(args, vocabulary, padded_vocab_size, architecture,
                                               args.world_size)
    run_config["imported_from"] = os.path.abspath(hf_dir)
    return run_config


def _load_exactly(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], hf_dir: str) -> None:
    """Load every parameter of `model` from `state_dict`, which must hold nothing else."""
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:
        raise ConversionError(f"{hf_dir}: the weights do not fit the model of its {CONFIG_FILE}: "
                              f"{error}") from error
    missing = [name for name in missing if not name.endswith("_extra_state")]
    if missing or unexpected:
        raise ConversionError(f"{hf_dir}: the weights do not fit the model of its {CONFIG_FILE}: "
                              f"missing {missing[:10]}, unexpected {unexpected[:10]}")


def import_hf(hf_dir: str, out: str, parallel_flags: Optional[Dict[str, Any]] = None,
              overwrite: bool = False) -> ImportSummary:
    """Write the checkpoint root `out` (iteration 0) for the Hugging Face folder `hf_dir`.
    `parallel_flags`: target sizes by argparse dest (TARGET_PARALLEL_FLAGS), default all 1.
    Needs a one-process torch.distributed group."""
    unknown = set(parallel_flags or {}) - set(TARGET_PARALLEL_FLAGS)
    if unknown:
        raise ConversionError(f"unknown target parallel flags {sorted(unknown)}")
    check_output_directory(out, overwrite)
    hf_config = read_hf_config(hf_dir)
    run_config = imported_run_config(hf_config, dict(parallel_flags or {}), hf_dir)
    tensors = read_safetensors_shards(hf_dir)
    try:
        state_dict = hf_to_megatron_state_dict(tensors, hf_config)
    except ValueError as error:
        raise ConversionError(f"{hf_dir}: {error}") from error
    args = world_size_one_arguments(run_config)
    with world_size_one_parallel_state(args.seed), staged_directory(out, overwrite) as staging:
        model = build_world_size_one_model(args, run_config)
        _load_exactly(model, state_dict, hf_dir)
        checkpointing.save_checkpoint(staging, [model], None, None, TrainState(), run_config,
                                      save_optimizer=False, save_rng=False)
    return ImportSummary(out=os.path.abspath(out), architecture=run_config["architecture"],
                         num_tensors=len(tensors), parallel_layout=run_config["parallel_layout"])
