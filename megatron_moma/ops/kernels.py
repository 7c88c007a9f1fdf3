"""Choosing the implementation of the dispatch kernels for a tensor: the csrc extension's C++
(CPU) or CUDA kernels where they are built and cover the dtype, the pure-torch fallback
otherwise. MEGATRON_MOMA_DISABLE_EXT=1 forces the fallback everywhere."""

import os
from types import ModuleType
from typing import Optional

import torch

from megatron_moma.ops import torch_kernels

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.float32, torch.bfloat16)


def _load_extension() -> Optional[ModuleType]:
    if os.environ.get("MEGATRON_MOMA_DISABLE_EXT", "0") == "1":
        return None
    try:
        from megatron_moma import _csrc
    except ImportError:
        return None
    return _csrc


extension = _load_extension()


def backend_for(tensor: torch.Tensor) -> str:
    """"cpp", "cuda" or "torch": which kernels dispatch rows of this tensor."""
    if extension is None:
        return "torch"
    if tensor.device.type == "cpu" and tensor.dtype in _CPU_DTYPES:
        return "cpp"
    if tensor.device.type == "cuda" and extension.with_cuda and tensor.dtype in _CUDA_DTYPES:
        return "cuda"
    return "torch"


def row_kernels(tensor: torch.Tensor):
    """The module with gather_rows / segment_sum_rows / combine_backward for these rows."""
    return torch_kernels if backend_for(tensor) == "torch" else extension


def bucket_kernel(token_of_row: torch.Tensor):
    """The bucket implementation for these indices: the extension's counting sort (C++ on CPU,
    CUDA kernels on a GPU where built; neither synchronizes with the host on a GPU), else the
    fallback's stable device sort."""
    if extension is None:
        return torch_kernels.bucket
    if token_of_row.device.type == "cpu" or (token_of_row.device.type == "cuda"
                                             and extension.with_cuda):
        return extension.bucket
    return torch_kernels.bucket
