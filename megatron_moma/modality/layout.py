"""Which modality each token id belongs to (docs/layers.md §1).

Every modality but text owns a contiguous, inclusive range of token ids; every other id, the
begin/end-of-image sentinels included, is text. Because the modality depends on the id alone,
training, evaluation and Hugging Face inference agree on it with no side channel.
"""

from dataclasses import dataclass
from typing import Tuple

import torch

TEXT = "text"


@dataclass(frozen=True)
class Modality:
    """A modality that owns token ids `first_id..last_id` (inclusive)."""

    name: str
    first_id: int
    last_id: int

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"modality name {self.name!r} must be a Python identifier "
                             "(it becomes part of parameter names)")
        if self.name == TEXT:
            raise ValueError("text is the implicit modality of every id outside the ranges; "
                             "do not give it a range")
        if not 0 <= self.first_id <= self.last_id:
            raise ValueError(f"modality {self.name!r}: need 0 <= first_id <= last_id, got "
                             f"{self.first_id}..{self.last_id}")

    @property
    def size(self) -> int:
        return self.last_id - self.first_id + 1

    def contains(self, token_id: int) -> bool:
        return self.first_id <= token_id <= self.last_id


@dataclass(frozen=True)
class ModalityLayout:
    """The modalities of a vocabulary. Modality id 0 is text; ids 1.. follow `ranges` in order.

    `ModalityLayout.text_and_image(first_image_id, last_image_id)` is the Chameleon layout.
    """

    ranges: Tuple[Modality, ...] = ()

    def __post_init__(self):
        names = [m.name for m in self.ranges]
        if len(set(names)) != len(names):
            raise ValueError(f"modality names must be unique, got {names}")
        spans = sorted((m.first_id, m.last_id, m.name) for m in self.ranges)
        for (_, last, name), (first, _, other) in zip(spans, spans[1:]):
            if first <= last:
                raise ValueError(f"modalities {name!r} and {other!r} overlap at token id {first}")

    @classmethod
    def text_and_image(cls, first_image_id: int, last_image_id: int) -> "ModalityLayout":
        return cls((Modality("image", first_image_id, last_image_id),))

    @property
    def names(self) -> Tuple[str, ...]:
        """Modality names in modality-id order, text first."""
        return (TEXT,) + tuple(m.name for m in self.ranges)

    @property
    def num_modalities(self) -> int:
        return 1 + len(self.ranges)

    def modality_ids(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Modality id of every token: same shape as `token_ids`, int64, 0 for text."""
        ids = torch.zeros_like(token_ids, dtype=torch.long)
        for modality_id, modality in enumerate(self.ranges, start=1):
            inside = (token_ids >= modality.first_id) & (token_ids <= modality.last_id)
            ids.masked_fill_(inside, modality_id)
        return ids
