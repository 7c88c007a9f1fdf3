"""`moma-convert export-hf`: a pretrain_moma checkpoint -> a Hugging Face model folder.

    HF_DIR/config.json                      MoMaConfig: model_type, architectures, auto_map, dtype
    HF_DIR/configuration_moma.py            the model's code (torch and transformers only),
    HF_DIR/modeling_moma.py                 loaded with trust_remote_code=True
    HF_DIR/model-0000k-of-0000n.safetensors the weights, each file at most --max-shard-size
    HF_DIR/model.safetensors.index.json
    HF_DIR/generation_config.json           bos/eos/pad ids from the run's vocabulary
    HF_DIR/tokenizer*.json ...              with --tokenizer only

The checkpoint (any TP/PP/VPP/EP/SP layout) is read into a world-size-1 model, its state dict
mapped to Hugging Face names by `megatron_moma.hf.mapping` (which fails on any tensor it cannot
place), and everything is written into `HF_DIR.tmp-XXXX`, renamed to HF_DIR at the end.
"""

import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import AutoTokenizer, GenerationConfig

from megatron_moma.command_line import ArgumentError
from megatron_moma.conversion.errors import ConversionError
from megatron_moma.conversion.megatron_checkpoint import (
    load_world_size_one_model,
    locate_checkpoint,
    read_run_config,
)
from megatron_moma.conversion.safetensors_shards import write_safetensors_shards
from megatron_moma.conversion.staged_directory import check_output_directory, staged_directory
from megatron_moma.conversion.world_size_one import world_size_one_parallel_state
from megatron_moma.hf.mapping import HF_MODEL_FILES, hf_config_from_run_config, megatron_to_hf_state_dict
from megatron_moma.training import checkpointing

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # Hugging Face's "5GB"


@dataclass
class ExportSummary:
    out: str
    checkpoint: str
    architecture: str
    dtype: torch.dtype
    num_tensors: int
    num_shards: int


def _load_tokenizer(source: str):
    """The Hugging Face tokenizer `source`: a folder, or a name in the local cache."""
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ArgumentError(f"--tokenizer {source}: not a Hugging Face tokenizer folder or a "
                            f"name in the local cache ({error})") from error


def _check_tokenizer(tokenizer, source: str, hf_config) -> None:
    """Refuse a tokenizer whose ids cannot be the model's."""
    if len(tokenizer) > hf_config.vocab_size:
        raise ArgumentError(f"--tokenizer {source} has {len(tokenizer)} ids; the model has "
                            f"{hf_config.vocab_size}")
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id != hf_config.eos_token_id:
        raise ArgumentError(f"--tokenizer {source}: its end-of-sequence id "
                            f"{tokenizer.eos_token_id} is not the run's end-of-document id "
                            f"{hf_config.eos_token_id} (was the data made with another tokenizer?)")


def export_hf(load: str, out: str, *, iteration: Optional[int] = None, tokenizer: Optional[str] = None,
              dtype: Optional[str] = None, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
              overwrite: bool = False) -> ExportSummary:
    """Write the Hugging Face folder `out` for checkpoint `load` (root or `iter_NNNNNNN`
    folder; iteration `iteration`, default the tracker's). `dtype`: "fp32" or "bf16" (default:
    the run's). Needs a one-process torch.distributed group."""
    check_output_directory(out, overwrite)
    root, iteration = locate_checkpoint(load, iteration)
    directory = checkpointing.checkpoint_dir(root, iteration)
    run_config = read_run_config(directory)
    try:
        hf_config = hf_config_from_run_config(run_config)
    except ValueError as error:
        raise ConversionError(f"{directory}: cannot export: {error}") from error
    hf_tokenizer = _load_tokenizer(tokenizer) if tokenizer is not None else None
    if hf_tokenizer is not None:
        _check_tokenizer(hf_tokenizer, tokenizer, hf_config)
    with world_size_one_parallel_state():
        model = load_world_size_one_model(root, iteration).model
        try:
            tensors = megatron_to_hf_state_dict(model.state_dict(), hf_config)
        except ValueError as error:
            raise ConversionError(f"{directory}: cannot export: {error}") from error
    torch_dtype = DTYPES[dtype] if dtype else (
        torch.bfloat16 if run_config["arguments"].get("bf16") else torch.float32)
    hf_config.dtype = torch_dtype
    with staged_directory(out, overwrite) as staging:
        hf_config.save_pretrained(staging)
        for path in HF_MODEL_FILES:
            shutil.copy(path, staging)
        weight_map = write_safetensors_shards(tensors, staging, max_shard_size, torch_dtype)
        GenerationConfig.from_model_config(hf_config).save_pretrained(staging)
        if hf_tokenizer is not None:
            hf_tokenizer.save_pretrained(staging)
    return ExportSummary(out=os.path.abspath(out), checkpoint=directory,
                         architecture=run_config["architecture"], dtype=torch_dtype,
                         num_tensors=len(weight_map), num_shards=len(set(weight_map.values())))
