"""The dispatch kernels in pure torch: the fallback of megatron_moma._csrc, same interface and,
on CPU, the same results (accumulation in fp32, or fp64 for fp64 rows, summed in the same order).

Shapes: N tokens, R rows, h hidden, B buckets (csrc/dispatch.h says the same for the C++ side).
Nothing here moves a tensor to the host, so on a GPU none of it synchronizes.
"""

from typing import Optional, Tuple

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 rows, fp32 for everything narrower (at::opmath_type on the C++ side)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def bucket(token_of_row: torch.Tensor, bucket_of_row: torch.Tensor, num_tokens: int,
           num_buckets: int) -> Tuple[torch.Tensor, ...]:
    """Stable sort of rows by bucket -> (source_token [R], order [R], position [R], counts [B],
    token_offsets [N+1], positions_by_token [R]); see DispatchLayout."""
    rows = token_of_row.numel()
    ones = torch.ones(rows, dtype=torch.long, device=token_of_row.device)
    order = torch.sort(bucket_of_row, stable=True).indices
    counts = torch.zeros(num_buckets, dtype=torch.long, device=ones.device).index_add_(
        0, bucket_of_row, ones)
    position = torch.empty_like(order).index_copy_(0, order, torch.arange(rows, device=ones.device))
    source_token = token_of_row[order]
    positions_by_token = torch.sort(source_token, stable=True).indices
    per_token = torch.zeros(num_tokens, dtype=torch.long, device=ones.device).index_add_(
        0, source_token, ones)
    token_offsets = torch.cat([per_token.new_zeros(1), per_token.cumsum(0)])
    return source_token, order, position, counts, token_offsets, positions_by_token


def gather_rows(src: torch.Tensor, index: torch.Tensor,
                scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[p] = scale[p] * src[index[p]]: src [N, h], index [R], scale [R] or None -> [R, h]."""
    rows = src.index_select(0, index)
    if scale is None:
        return rows
    acc = accumulation_dtype(src.dtype)
    return (rows.to(acc) * scale.to(acc).unsqueeze(-1)).to(src.dtype)


def segment_sum_rows(src: torch.Tensor, offsets: torch.Tensor, members: torch.Tensor,
                     scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[t] = sum of scale[m] * src[m] over m in members[offsets[t]:offsets[t+1]], in order.

    src [R, h], offsets [N+1], members [R], scale [R] or None -> [N, h].
    """
    acc = accumulation_dtype(src.dtype)
    num_out = offsets.numel() - 1
    contributions = src.index_select(0, members).to(acc)
    if scale is not None:
        contributions = contributions * scale.to(acc).index_select(0, members).unsqueeze(-1)
    segment = torch.repeat_interleave(torch.arange(num_out, device=src.device), offsets.diff(),
                                      output_size=members.numel())
    out = torch.zeros(num_out, src.shape[1], dtype=acc, device=src.device)
    return out.index_add_(0, segment, contributions).to(src.dtype)


def combine_backward(grad_out: torch.Tensor, index: torch.Tensor, scale: torch.Tensor,
                     rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale[p] * grad_out[index[p]] [R, h], <rows[p], grad_out[index[p]]> [R] in the
    accumulation dtype): grad_out [N, h], index [R], scale [R], rows [R, h]."""
    acc = accumulation_dtype(rows.dtype)
    gathered = grad_out.index_select(0, index).to(acc)
    grad_rows = (gathered * scale.to(acc).unsqueeze(-1)).to(rows.dtype)
    return grad_rows, (rows.to(acc) * gathered).sum(-1)
