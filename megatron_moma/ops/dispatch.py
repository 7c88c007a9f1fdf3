"""Bucket, permute and unpermute-combine: moving token rows into per-(modality, expert) order,
duplicated where several experts chose one token, and back with a weighted sum.

    layout = bucket(token_of_row, bucket_of_row, num_tokens, num_buckets)
    rows = permute(tokens, layout)                    # [R, h], contiguous per bucket
    ...experts on rows, layout.counts rows per bucket...
    out = unpermute_combine(expert_rows, weight, layout)   # [N, h], weight in permuted order

permute and unpermute_combine are autograd functions; bucket builds integer indices only.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_moma.ops.kernels import bucket_kernel, row_kernels
from megatron_moma.ops.torch_kernels import accumulation_dtype


@dataclass
class DispatchLayout:
    """Where each selected row goes. R rows (selections), N tokens, B buckets; all int64.

    source_token [R]: the token at each permuted position; order [R]: the row (selection index)
    at each position; position [R]: each row's position (inverse of order); counts [B]: rows per
    bucket, buckets laid out in order; token_offsets [N+1], positions_by_token [R]: token t's
    copies are at positions positions_by_token[token_offsets[t]:token_offsets[t+1]], increasing.
    """

    source_token: torch.Tensor
    order: torch.Tensor
    position: torch.Tensor
    counts: torch.Tensor
    token_offsets: torch.Tensor
    positions_by_token: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.token_offsets.numel() - 1


def bucket(token_of_row: torch.Tensor, bucket_of_row: torch.Tensor, num_tokens: int,
           num_buckets: int) -> DispatchLayout:
    """Rows contiguous per bucket, stable (rows of a bucket keep their order).

    token_of_row [R] int64 in [0, N): the token each selection takes; bucket_of_row [R] int64 in
    [0, B): its (modality group, expert) or (owner rank, local expert) number. No host sync.
    """
    token_of_row = token_of_row.long()
    bucket_of_row = bucket_of_row.long()
    return DispatchLayout(*bucket_kernel(token_of_row)(token_of_row, bucket_of_row, num_tokens,
                                                       num_buckets))


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, layout):
        ctx.layout = layout
        return row_kernels(tokens).gather_rows(tokens, layout.source_token, None)

    @staticmethod
    def backward(ctx, grad_rows):
        layout = ctx.layout
        grad_tokens = row_kernels(grad_rows).segment_sum_rows(
            grad_rows, layout.token_offsets, layout.positions_by_token, None)
        return grad_tokens, None


class _UnpermuteCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weight, layout):
        ctx.layout = layout
        ctx.weight_dtype = None if weight is None else weight.dtype
        scale = None if weight is None else weight.to(accumulation_dtype(rows.dtype))
        ctx.save_for_backward(rows, scale)
        return row_kernels(rows).segment_sum_rows(rows, layout.token_offsets,
                                                  layout.positions_by_token, scale)

    @staticmethod
    def backward(ctx, grad_out):
        rows, scale = ctx.saved_tensors
        kernels = row_kernels(grad_out)
        if scale is None:
            return kernels.gather_rows(grad_out, ctx.layout.source_token, None), None, None
        grad_rows, grad_scale = kernels.combine_backward(grad_out, ctx.layout.source_token,
                                                         scale, rows)
        return grad_rows, grad_scale.to(ctx.weight_dtype), None


def permute(tokens: torch.Tensor, layout: DispatchLayout) -> torch.Tensor:
    """tokens [N, h] -> rows [R, h], row p = tokens[layout.source_token[p]] (duplicates allowed).
    Backward sums each token's copies."""
    return _Permute.apply(tokens, layout)


def unpermute_combine(rows: torch.Tensor, weight: Optional[torch.Tensor],
                      layout: DispatchLayout) -> torch.Tensor:
    """rows [R, h], weight [R] in permuted order or None (weight 1) -> [N, h] with
    out[t] = sum over t's copies p of weight[p] * rows[p] (0 for a token nobody took),
    accumulated in fp32 (fp64 for fp64 rows). Differentiable in rows and weight."""
    return _UnpermuteCombine.apply(rows, weight, layout)
