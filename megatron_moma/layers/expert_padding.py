"""Padding each expert's rows to a multiple of an alignment, and removing the padding after.

FP8 grouped GEMMs need every expert's block of rows to be a multiple of 16 rows (32 for MXFP8).
Under MoMa the blocks vary per modality group, per expert and per micro-batch, so the expert
module of each group pads its own rows just before the GEMMs and drops the padding right after
(megatron-core's TEGroupedMLP does the same with Transformer Engine's Fp8Padding).

    rows [M, ...] by expert, counts [E]  ->  padded [M', ...], padded counts [E]
    expert e's block: its counts[e] rows, then zero rows up to a multiple of `alignment`

Both directions are differentiable (padding rows get no gradient).
"""

from dataclasses import dataclass
from typing import List, Sequence

import torch


@dataclass
class ExpertPadding:
    """Where each real row sits among the padded rows.

    index: [M] int64 position of row i in the padded layout; counts: [E] padded rows per
    expert; num_rows: M' = sum(counts).
    """

    index: torch.Tensor
    counts: List[int]
    num_rows: int

    @classmethod
    def plan(cls, counts: Sequence[int], alignment: int, device) -> "ExpertPadding":
        padded = [-(-count // alignment) * alignment for count in counts]
        shift, starts, padded_starts = [], 0, 0
        for count, padded_count in zip(counts, padded):
            shift.append(padded_starts - starts)
            starts, padded_starts = starts + count, padded_starts + padded_count
        num_real = starts
        index = torch.arange(num_real, device=device) + torch.repeat_interleave(
            torch.tensor(shift, dtype=torch.long, device=device),
            torch.tensor(list(counts), dtype=torch.long, device=device), output_size=num_real,
        )
        return cls(index=index, counts=padded, num_rows=padded_starts)

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        """[M, ...] -> [M', ...] with zero padding rows."""
        padded = rows.new_zeros((self.num_rows, *rows.shape[1:]))
        return padded.index_copy(0, self.index, rows)

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """[M', ...] -> [M, ...]: the real rows, in their original order."""
        return padded.index_select(0, self.index)
