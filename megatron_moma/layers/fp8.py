"""FP8 matmuls of expert groups on torch's scaled matmuls, and what a machine needs for them.

Quantization is current scaling (the amax of the tensor being quantized, no history):

    scale = amax / fp8_max,  q = fp8(x / scale),  x ~ q * scale   (torch's dequantization scales)

`tensorwise` takes one amax per activation tensor and one per expert weight; `rowwise` one per
activation row and one per weight output channel (per row of the [N, K] weight). The grouped
product computes, for every expert e with rows R_e of the activations,

    out[R_e] = (a_q[R_e] * a_scale[R_e]) @ (b_q[e] * b_scale[e])^T        b_q [E, N, K]

with fp32 accumulation, on `torch._scaled_grouped_mm` where torch has it for the device and
dtypes (Hopper, E4M3 x E4M3, bf16 out) and on one `torch._scaled_mm` per expert otherwise (E5M2
activations, other GPUs, and CPU, where torch emulates it: that is how the tests run).

Hardware: torch's FP8 matmuls need compute capability 8.9 (Ada) or newer for both scalings;
the grouped kernel runs on 9.x only. Transformer Engine needs 8.9 for `delayed` and
`tensorwise`, 9.0 for `blockwise` and 10.0 (Blackwell) for `mxfp8`.
"""

from typing import List, Optional, Sequence, Tuple

import torch

from megatron_moma.config.fp8 import TE_RECIPES, TORCH_RECIPES

# Each expert's rows must come in multiples of this for the grouped FP8 kernel (as for
# Transformer Engine's grouped GEMMs, whose mxfp8 recipe needs 32: megatron-core pads those).
FP8_ROW_ALIGNMENT = 16
# Minimum compute capability per (backend, recipe).
MIN_CAPABILITY = {
    ("torch", "tensorwise"): (8, 9),
    ("torch", "rowwise"): (8, 9),
    ("te", "delayed"): (8, 9),
    ("te", "tensorwise"): (8, 9),
    ("te", "blockwise"): (9, 0),
    ("te", "mxfp8"): (10, 0),
}
TORCH_FP8_OPS = ("float8_e4m3fn", "float8_e5m2", "_scaled_mm", "_grouped_mm")


def missing_torch_ops(names: Sequence[str] = TORCH_FP8_OPS) -> List[str]:
    """Those of torch's attributes `names` (default: what FP8 expert GEMMs use) it lacks."""
    return [name for name in names if not hasattr(torch, name)]


def fp8_support_problem(recipe: str, use_te: bool, device_type: str,
                        capability: Optional[Tuple[int, int]]) -> Optional[str]:
    """Why FP8 with `recipe` cannot run on this backend and device, or None if it can.

    device_type: "cuda" or "cpu"; capability: the GPU's (major, minor), None on CPU.
    """
    backend = "te" if use_te else "torch"
    if device_type != "cuda":
        return "FP8 training needs a CUDA GPU (compute capability 8.9 or newer); this run is on CPU"
    if use_te and recipe not in TE_RECIPES:
        return (f"FP8 recipe {recipe!r} is the torch-native path's; Transformer Engine, which is "
                f"used when it imports, takes {TE_RECIPES}")
    if not use_te:
        if recipe not in TORCH_RECIPES:
            return (f"FP8 recipe {recipe!r} needs Transformer Engine, which does not import here; "
                    f"without it FP8 expert GEMMs take the recipes {TORCH_RECIPES}")
        missing = missing_torch_ops()
        if missing:
            return (f"FP8 expert GEMMs without Transformer Engine need torch's {missing}, which "
                    f"torch {torch.__version__} lacks (torch >= 2.8 has them)")
    needed = MIN_CAPABILITY[(backend, recipe)]
    if capability is None or tuple(capability) < needed:
        engine = "Transformer Engine" if use_te else "torch._scaled_mm"
        found = "no CUDA GPU is visible" if capability is None else (
            f"this GPU has {capability[0]}.{capability[1]}")
        return (f"FP8 recipe {recipe!r} with {engine} needs compute capability "
                f"{needed[0]}.{needed[1]} or newer; {found}")
    return None


def quantize(x: torch.Tensor, dtype: torch.dtype,
             rowwise: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [..., R, C] -> (q in `dtype`, dequantization scale).

    rowwise: scale [..., R, 1], the amax of each row; else [..., 1, 1], of each trailing matrix.
    """
    dims = (-1,) if rowwise else (-2, -1)
    amax = x.detach().abs().amax(dim=dims, keepdim=True).float()
    fp8_max = torch.finfo(dtype).max
    scale = amax.clamp(min=1e-12) / fp8_max
    q = (x.float() / scale).clamp(-fp8_max, fp8_max).to(dtype)
    return q, scale


def scaled_grouped_matmul(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor,
                          b_scale: torch.Tensor, counts: Sequence[int], rowwise: bool,
                          out_dtype: torch.dtype) -> torch.Tensor:
    """out[R_e] = (a_q[R_e] a_scale[R_e]) (b_q[e] b_scale[e])^T for consecutive row blocks R_e.

    a_q [M, K] FP8 and b_q [E, N, K] E4M3 from `quantize` with the same `rowwise`: a_scale
    [M, 1] and b_scale [E, N, 1] (rowwise) or [1, 1] and [E, 1, 1]; counts [E] rows of each
    expert (summing to M) -> [M, N] in out_dtype.
    """
    if _grouped_kernel_applies(a_q, out_dtype, counts):
        return grouped_scaled_kernel(a_q, a_scale, b_q, b_scale, counts, out_dtype)
    out = torch.empty(a_q.shape[0], b_q.shape[1], dtype=out_dtype, device=a_q.device)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            rows = slice(start, start + count)
            if rowwise:
                scale_a, scale_b = a_scale[rows], b_scale[expert].reshape(1, -1)
            else:
                scale_a, scale_b = a_scale.reshape(()), b_scale[expert].reshape(())
            out[rows] = torch._scaled_mm(a_q[rows], b_q[expert].t(), scale_a=scale_a,
                                         scale_b=scale_b, out_dtype=out_dtype)
        start += count
    return out


def grouped_scaled_kernel(a_q, a_scale, b_q, b_scale, counts: Sequence[int],
                          out_dtype: torch.dtype) -> torch.Tensor:
    """`scaled_grouped_matmul` in one `torch._scaled_grouped_mm` call (rowwise layout: a tensorwise
    scale is broadcast to every row / channel). Every count must be a multiple of 16."""
    num_rows, num_out = a_q.shape[0], b_q.shape[1]
    offsets = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(a_q.device)
    return torch._scaled_grouped_mm(
        a_q, b_q.transpose(-2, -1),
        a_scale.expand(num_rows, 1).reshape(num_rows).contiguous(),
        b_scale.expand(b_q.shape[0], num_out, 1).reshape(b_q.shape[0], num_out).contiguous(),
        offs=offsets, out_dtype=out_dtype,
    )


def _grouped_kernel_applies(a_q: torch.Tensor, out_dtype: torch.dtype,
                            counts: Sequence[int]) -> bool:
    return (a_q.is_cuda and hasattr(torch, "_scaled_grouped_mm")
            and torch.cuda.get_device_capability(a_q.device)[0] == 9
            and a_q.dtype == torch.float8_e4m3fn and out_dtype == torch.bfloat16
            and all(count % FP8_ROW_ALIGNMENT == 0 for count in counts))
