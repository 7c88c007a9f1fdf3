"""The training dataset: megatron's GPTDataset over mixed-modal documents, plus modality ids.

Stock GPTDataset treats every sequence of an IndexedDataset as a document, so it would shuffle the
text and image spans of one record apart. `MixedModalDocuments` presents each document (all of
its sequences, which lie contiguously in the .bin file) as one item instead, and
`MixedModalDataset` builds GPTDataset's document/sample/shuffle indices over those: splits,
blends (through BlendedMegatronDatasetBuilder), caching and the seeded sample order are megatron's.

Each sample is GPTDataset's, all [sequence_length] tensors:
- tokens, labels (tokens shifted by one), position_ids (reset after each EOD when
  `reset_position_ids`), and attention_mask when `create_attention_mask`;
- loss_mask: what GPTDataset masks, namely padding labels, and with `eod_mask_loss` the positions
  whose *input* token is EOD (the first token of the next document is not predicted). Nothing more
  is masked at image boundaries: begin-of-image is predicted from the text before it (the model
  learns when to start an image), every code and end-of-image are predicted, and so is the first
  text token after an image. With `modality_loss_weights`, each position's mask is multiplied by
  the weight of its *label's* modality (predicting a sentinel counts as text, docs/layers.md §1);
- modality_ids: the modality of each input token, from the vocabulary layout.
"""

import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_moma.data.vocabulary import (
    MODALITY_NAMES,
    VocabularyLayout,
    read_sidecar,
    sidecar_path,
)


class MixedModalDocuments:
    """A multimodal IndexedDataset seen as a list of documents, the way GPTDataset reads sequences.

    `sequence_lengths` [num_documents] int32 holds each document's token count (the name is the
    one GPTDataset reads); `get(document, offset, length)` returns [length] tokens of it.
    """

    def __init__(self, path_prefix: str, mmap: bool = True):
        self.path_prefix = path_prefix
        self.indexed = IndexedDataset(path_prefix, multimodal=True, mmap=mmap)
        sequence_ends = numpy.concatenate(
            [[0], numpy.cumsum(self.indexed.sequence_lengths, dtype=numpy.int64)]
        )
        document_indices = self.indexed.document_indices
        self.sequence_lengths = (
            sequence_ends[document_indices[1:]] - sequence_ends[document_indices[:-1]]
        ).astype(numpy.int32)
        self.first_sequence = document_indices[:-1]

    def __len__(self) -> int:
        return self.sequence_lengths.shape[0]

    def get(self, document: int, offset: int = 0, length: Optional[int] = None) -> numpy.ndarray:
        if length is None:
            length = int(self.sequence_lengths[document]) - offset
        tokens, _ = self.indexed.get(
            int(self.first_sequence[document]), offset=offset, length=length
        )
        return tokens


class _LayoutSpecialTokens:
    """What GPTDataset reads from its tokenizer (vocab_size, eod, pad), taken from the layout."""

    def __init__(self, layout: VocabularyLayout):
        self.vocab_size = layout.vocab_size
        self.eod = layout.eod
        if layout.pad is not None:
            self.pad = layout.pad
        self.unique_identifiers = {"class": type(self).__name__, **layout.to_dict()}


@dataclass
class MixedModalDatasetConfig(GPTDatasetConfig):
    """GPTDatasetConfig plus the vocabulary layout and optional per-modality loss weights.

    `vocabulary` defaults to the layout in the sidecars of the blended datasets (all must agree);
    `tokenizer` defaults to the layout's special ids. `modality_loss_weights` maps modality names
    to loss weights (missing names weigh 1).
    """

    vocabulary: Optional[VocabularyLayout] = None
    modality_loss_weights: Optional[Dict[str, float]] = None
    reset_position_ids: Optional[bool] = False
    reset_attention_mask: Optional[bool] = False
    eod_mask_loss: Optional[bool] = False

    def __post_init__(self) -> None:
        self.vocabulary = _agreed_layout(self.vocabulary, self._dataset_prefixes())
        if self.vocabulary is None:
            raise ValueError(
                "no vocabulary layout: pass `vocabulary` or blend datasets with .vocab.json sidecars"
            )
        if self.tokenizer is None:
            self.tokenizer = _LayoutSpecialTokens(self.vocabulary)
        unknown = set(self.modality_loss_weights or {}) - set(MODALITY_NAMES)
        if unknown:
            raise ValueError(
                f"modality_loss_weights names {sorted(unknown)}; modalities are {MODALITY_NAMES}"
            )
        super().__post_init__()

    def _dataset_prefixes(self) -> List[str]:
        blends = [self.blend] if self.blend is not None else list(self.blend_per_split or [])
        return [prefix for blend in blends if blend is not None for prefix in blend[0]]


def _agreed_layout(
    layout: Optional[VocabularyLayout], prefixes: List[str]
) -> Optional[VocabularyLayout]:
    """`layout`, or the sidecars' layout; raises ValueError if a sidecar disagrees."""
    for prefix in prefixes:
        path = sidecar_path(prefix)
        if not os.path.isfile(path):
            continue
        found = read_sidecar(path)
        if layout is None:
            layout = found
        elif found != layout:
            raise ValueError(f"{path}: vocabulary layout {found} differs from {layout}")
    return layout


class MixedModalDataset(GPTDataset):
    """GPTDataset over whole mixed-modal documents, with modality ids (module docstring)."""

    config: MixedModalDatasetConfig

    def __init__(
        self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config
    ):
        super().__init__(
            indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config
        )
        weights = numpy.ones(len(MODALITY_NAMES), dtype=numpy.float32)
        for name, weight in (config.modality_loss_weights or {}).items():
            weights[MODALITY_NAMES.index(name)] = weight
        self.modality_loss_weights = torch.from_numpy(weights)

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: MixedModalDocuments) -> int:
        """Splits are made of whole documents."""
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(
        dataset_path: str, config: MixedModalDatasetConfig
    ) -> MixedModalDocuments:
        return MixedModalDocuments(dataset_path, mmap=config.mmap_bin_files)

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        sample = super().__getitem__(idx)
        layout = self.config.vocabulary
        sample["modality_ids"] = layout.modality_ids(sample["tokens"])
        if self.config.modality_loss_weights:
            sample["loss_mask"] = (
                sample["loss_mask"]
                * self.modality_loss_weights[layout.modality_ids(sample["labels"])]
            )
        return sample
