"""Model weights as sharded safetensors files, the layout Hugging Face writes and reads:

    model-00001-of-00003.safetensors ...    the tensors, each file at most --max-shard-size
    model.safetensors.index.json            {"metadata": {"total_size": bytes},
                                             "weight_map": {tensor name: file name}}

The index is written even for one shard. The reader takes such a folder, or a single
`model.safetensors` without an index (what `save_pretrained` writes for a small model).
"""

import json
import os
import re
from typing import Dict, List

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from megatron_moma.conversion.errors import ConversionError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes in a Hugging Face style size: "5GB" (10^9 bytes), "500MB", "100KB", "2GiB" (2^30),
    or a plain byte count."""
    match = SIZE.match(str(text))
    unit = match.group(2).upper() if match else None
    if unit not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise ConversionError(f"size {text!r}: expected a positive number of bytes with an "
                              f"optional unit, e.g. 5GB, 500MB, 2GiB")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def shard_names(names: List[str], nbytes: Dict[str, int], max_shard_size: int) -> List[List[str]]:
    """Tensor names cut greedily, in order, into shards of at most `max_shard_size` bytes (a
    tensor larger than that gets a shard of its own)."""
    shards: List[List[str]] = [[]]
    size = 0
    for name in names:
        if shards[-1] and size + nbytes[name] > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    return shards


def shard_file_name(number: int, total: int) -> str:
    return f"model-{number:05d}-of-{total:05d}.safetensors"


def write_safetensors_shards(tensors: Dict[str, torch.Tensor], directory: str, max_shard_size: int,
                             dtype: torch.dtype) -> Dict[str, str]:
    """Write `tensors` cast to `dtype` into `directory` as shards plus the index; returns the
    weight map. Floating-point tensors are cast, others kept; a shard's copies are made only
    while it is written."""
    written = {n: dtype if t.is_floating_point() else t.dtype for n, t in tensors.items()}
    names = list(tensors)
    nbytes = {n: tensors[n].numel() * written[n].itemsize for n in names}
    shards = shard_names(names, nbytes, max_shard_size)
    weight_map = {}
    with tqdm(total=len(names), desc="writing safetensors", unit="tensor") as progress:
        for number, shard in enumerate(shards, start=1):
            file_name = shard_file_name(number, len(shards))
            contents = {n: tensors[n].detach().to("cpu", written[n], copy=True).contiguous()
                        for n in shard}
            save_file(contents, os.path.join(directory, file_name), metadata={"format": "pt"})
            weight_map.update((n, file_name) for n in shard)
            progress.update(len(shard))
    index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
    with open(os.path.join(directory, INDEX_FILE), "w") as index_file:
        json.dump(index, index_file, indent=2, sort_keys=True)
        index_file.write("\n")
    return weight_map


def _weight_map(directory: str) -> Dict[str, str]:
    index_path = os.path.join(directory, INDEX_FILE)
    if not os.path.isfile(index_path):
        if os.path.isfile(os.path.join(directory, SINGLE_FILE)):
            with safe_open(os.path.join(directory, SINGLE_FILE), framework="pt") as single:
                return {name: SINGLE_FILE for name in single.keys()}
        raise ConversionError(f"{directory}: no {INDEX_FILE} or {SINGLE_FILE} (expected the "
                              "safetensors weights of a Hugging Face model)")
    try:
        with open(index_path) as index_file:
            weight_map = json.load(index_file)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ConversionError(f"{index_path}: expected JSON with a 'weight_map' object "
                              f"({error!r})") from error
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{index_path}: 'weight_map' must map tensor names to file names")
    return weight_map


def read_safetensors_shards(directory: str) -> Dict[str, torch.Tensor]:
    """Every tensor of the safetensors weights in `directory`, checked against the index: each
    indexed name must be in its file, and each file must hold only indexed names."""
    weight_map = _weight_map(directory)
    files = sorted(set(weight_map.values()))
    missing = [name for name in files if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise ConversionError(f"{directory}: {INDEX_FILE} names files that do not exist: {missing}")
    tensors: Dict[str, torch.Tensor] = {}
    with tqdm(total=len(weight_map), desc="reading safetensors", unit="tensor") as progress:
        for file_name in files:
            expected = {name for name, where in weight_map.items() if where == file_name}
            with safe_open(os.path.join(directory, file_name), framework="pt") as shard:
                held = set(shard.keys())
                if held != expected:
                    raise ConversionError(
                        f"{os.path.join(directory, file_name)} does not hold what {INDEX_FILE} "
                        f"says: missing {sorted(expected - held)[:5]}, not indexed "
                        f"{sorted(held - expected)[:5]}")
                for name in sorted(held):
                    tensors[name] = shard.get_tensor(name)
            progress.update(len(expected))
    return tensors
