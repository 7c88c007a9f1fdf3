"""The modality index of a micro-batch: where each modality's tokens are, computed once.

Both papers report that recomputing modality masks in every layer (a host-device sync per layer)
is their main overhead. `ModalityIndex` is built once per micro-batch from the modality ids and
reused by every layer of the stage; its only host sync is reading the per-modality counts.

Token order is Megatron's hidden-state order: hidden states are [s, b, h], so token (b_i, s_i)
is row `s_i * b + b_i` of the flattened [s * b, h] view. Under sequence parallelism the tensor-
parallel rank r holds the contiguous rows of sequence chunk r; `chunk(r, num_chunks)` gives the
index of those rows, and `chunk_counts(num_chunks)` how many tokens of each modality every chunk
holds (what an expert-choice router needs to gather scores across the chunks).

A row whose modality id is `num_modalities` is padding (a MoD layer's batch scope pads each
sequence's chosen tokens to a common length): it belongs to no modality, is grouped after every
modality, and gets an extra last entry in `counts`.

`group(rows)` lays rows out modality by modality (`split` then gives each modality's rows as a
contiguous view) and `ungroup` puts them back in token order: one row gather each way, forward
and backward, since the gradient of a permutation is the inverse permutation (indexing with
`rows[idx]` would scatter-add its gradient into zeros, several times slower on CPU).
"""

from typing import List

import torch


class _PermuteRows(torch.autograd.Function):
    """out = x[order] for a permutation `order` of x's rows; grad_x = grad_out[inverse]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class ModalityIndex:
    """Rows of each modality in a flattened [s * b] token order.

    Attributes:
        modality_ids: [n] int64, modality id of each row (n = s * b).
        permutation: [n] int64, a stable permutation grouping rows by modality: rows of modality
            m are `permutation[offsets[m]:offsets[m + 1]]`, in increasing row order.
        inverse_permutation: [n] int64, `inverse_permutation[permutation] == arange(n)`.
        counts: per-modality row counts (host ints), then the padding rows' if there are any.
        offsets: prefix sums of `counts`, length num_modalities + 1 (host ints).
    """

    def __init__(self, modality_ids: torch.Tensor, num_modalities: int):
        if modality_ids.dim() != 1:
            raise ValueError(f"modality_ids must be flat [s * b], got shape {tuple(modality_ids.shape)}")
        self.modality_ids = modality_ids
        self.num_modalities = num_modalities
        self.permutation = torch.sort(modality_ids, stable=True).indices
        self.inverse_permutation = torch.empty_like(self.permutation)
        self.inverse_permutation[self.permutation] = torch.arange(
            modality_ids.numel(), device=modality_ids.device
        )
        self.counts: List[int] = torch.bincount(modality_ids, minlength=num_modalities).tolist()
        self.offsets: List[int] = [0]
        for count in self.counts:
            self.offsets.append(self.offsets[-1] + count)
        self._chunks = {}

    @classmethod
    def from_batch(cls, modality_ids_bs: torch.Tensor, num_modalities: int) -> "ModalityIndex":
        """From modality ids of shape [b, s] (the data loader's layout)."""
        return cls(modality_ids_bs.t().reshape(-1), num_modalities)

    @property
    def num_tokens(self) -> int:
        return self.modality_ids.numel()

    def rows(self, modality: int) -> torch.Tensor:
        """[counts[modality]] int64: the rows of `modality`, increasing."""
        return self.permutation[self.offsets[modality] : self.offsets[modality + 1]]

    def group(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [n, ...] in token order -> [n, ...] grouped by modality (modality m at
        `offsets[m]:offsets[m + 1]`, in token order within it). Differentiable."""
        return _PermuteRows.apply(rows, self.permutation, self.inverse_permutation)

    def ungroup(self, grouped: torch.Tensor) -> torch.Tensor:
        """The inverse of `group`: [n, ...] grouped by modality -> token order. Differentiable."""
        return _PermuteRows.apply(grouped, self.inverse_permutation, self.permutation)

    def split(self, grouped: torch.Tensor) -> List[torch.Tensor]:
        """Views of each modality's rows of a `group`ed tensor: [counts[m], ...] per modality."""
        return list(grouped.split(self.counts))

    def chunk(self, rank: int, num_chunks: int) -> "ModalityIndex":
        """Index of the rows of sequence chunk `rank` of `num_chunks` (sequence parallelism)."""
        if num_chunks == 1:
            return self
        key = (rank, num_chunks)
        if key not in self._chunks:
            rows_per_chunk = self._rows_per_chunk(num_chunks)
            local = self.modality_ids[rank * rows_per_chunk : (rank + 1) * rows_per_chunk]
            self._chunks[key] = ModalityIndex(local, self.num_modalities)
        return self._chunks[key]

    def chunk_counts(self, num_chunks: int) -> List[List[int]]:
        """counts[chunk][modality]: tokens of each modality in each sequence chunk."""
        return [self.chunk(r, num_chunks).counts for r in range(num_chunks)]

    def _rows_per_chunk(self, num_chunks: int) -> int:
        if self.num_tokens % num_chunks:
            raise ValueError(f"{self.num_tokens} tokens do not split into {num_chunks} sequence chunks")
        return self.num_tokens // num_chunks
