"""The vocabulary layout of a mixed-modal model: which token ids belong to which modality.

docs/layers.md §1: a token's modality is a pure function of its id. Every non-text modality owns
one contiguous, inclusive id range (name, first_id, last_id); every other id is text, including the
sentinels (end-of-document, padding, begin/end-of-image). Modality ids are fixed by name and equal
the per-sequence mode of megatron's multimodal IndexedDataset: 0 text, 1 image, 2 speech. The
model's `ModalityLayout` (`VocabularyLayout.modality_layout`) numbers modalities by position, so a
vocabulary holds the first modalities of that list without gaps and both numberings agree.

The preprocessing tool writes the layout beside each dataset as a JSON sidecar
(`{path_prefix}.vocab.json`); training reads it back, so both agree with no side channel.
"""

import json
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple, Union

import numpy
import torch

from megatron_moma.modality.layout import Modality, ModalityLayout

MODALITY_NAMES = ("text", "image", "speech")
"""Modality names; a modality's id (and its IndexedDataset mode) is its index here."""

TEXT, IMAGE, SPEECH = range(len(MODALITY_NAMES))

SIDECAR_SUFFIX = ".vocab.json"
SIDECAR_FORMAT = "megatron-moma vocabulary layout"
SIDECAR_VERSION = 1


@dataclass(frozen=True)
class VocabularyLayout:
    """Modality id ranges and sentinel ids of one vocabulary of `vocab_size` ids.

    `eod` ends a document (Megatron's EOD); `pad` fills short samples; `begin_of_image` and
    `end_of_image` wrap each image's codes. All four are text ids: none may fall in a range.
    """

    vocab_size: int
    ranges: Tuple[Modality, ...]
    eod: int
    pad: Optional[int] = None
    begin_of_image: Optional[int] = None
    end_of_image: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranges", tuple(self.ranges))
        self._check_ranges()
        self._check_sentinels()

    def _check_ranges(self) -> None:
        ordered = sorted(self.ranges, key=lambda r: r.first_id)
        names = [r.name for r in ordered]
        if len(set(names)) != len(names):
            raise ValueError(f"each modality may own one id range, got {names}")
        unknown = sorted(set(names) - set(MODALITY_NAMES[1:]))
        if unknown:
            raise ValueError(f"modality ranges {unknown}: a range's name must be one of "
                             f"{MODALITY_NAMES[1:]} (every id outside the ranges is text)")
        if sorted(names, key=MODALITY_NAMES.index) != list(MODALITY_NAMES[1 : 1 + len(names)]):
            raise ValueError(f"modality ranges {names}: a vocabulary holds the first of "
                             f"{MODALITY_NAMES[1:]} without gaps (the model numbers modalities "
                             "by position, the dataset by name)")
        for lower, upper in zip(ordered, ordered[1:]):
            if upper.first_id <= lower.last_id:
                raise ValueError(
                    f"{lower.name} range [{lower.first_id}, {lower.last_id}] overlaps "
                    f"{upper.name} range [{upper.first_id}, {upper.last_id}]"
                )
        for modality_range in ordered:
            if modality_range.last_id >= self.vocab_size:
                raise ValueError(
                    f"{modality_range.name} range ends at {modality_range.last_id}, outside the "
                    f"vocabulary of {self.vocab_size} ids"
                )

    def _check_sentinels(self) -> None:
        seen = {}
        for name, token_id in self.sentinels().items():
            if token_id in seen and {name, seen[token_id]} != {"pad", "eod"}:  # pad may equal eod
                raise ValueError(f"{name} id {token_id} is also the {seen[token_id]} id")
            seen.setdefault(token_id, name)
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(
                    f"{name} id {token_id} is outside the vocabulary [0, {self.vocab_size})"
                )
            for modality_range in self.ranges:
                if modality_range.contains(token_id):
                    raise ValueError(
                        f"{name} id {token_id} lies in the {modality_range.name} range "
                        f"[{modality_range.first_id}, {modality_range.last_id}]; sentinels are text"
                    )

    def sentinels(self) -> Dict[str, int]:
        """The special text ids that are set: name -> id."""
        candidates = {
            "eod": self.eod,
            "pad": self.pad,
            "begin_of_image": self.begin_of_image,
            "end_of_image": self.end_of_image,
        }
        return {name: token_id for name, token_id in candidates.items() if token_id is not None}

    def range_of(self, modality: str) -> Optional[Modality]:
        """The id range of `modality`, or None when the vocabulary has none."""
        return next((r for r in self.ranges if r.name == modality), None)

    def modality_ids(
        self, token_ids: Union[torch.Tensor, numpy.ndarray]
    ) -> Union[torch.Tensor, numpy.ndarray]:
        """Modality id of every token: [*] token ids -> [*] int64 (0 text, 1 image, 2 speech).

        Works on torch tensors (any device, no host sync) and numpy arrays alike.
        """
        xp = torch if isinstance(token_ids, torch.Tensor) else numpy
        modality = xp.zeros_like(token_ids, dtype=xp.int64)
        for modality_range in self.ranges:
            inside = (token_ids >= modality_range.first_id) & (token_ids <= modality_range.last_id)
            modality = xp.where(inside, MODALITY_NAMES.index(modality_range.name), modality)
        return modality

    @property
    def modality_layout(self) -> ModalityLayout:
        """The model's modality layout of this vocabulary, with the same modality ids."""
        return ModalityLayout(tuple(sorted(self.ranges, key=lambda r: MODALITY_NAMES.index(r.name))))

    def to_dict(self) -> Dict[str, Any]:
        layout = asdict(self)
        layout["ranges"] = [asdict(r) for r in self.ranges]
        return layout

    @classmethod
    def from_dict(cls, layout: Dict[str, Any]) -> "VocabularyLayout":
        fields = dict(layout)
        fields["ranges"] = tuple(Modality(**r) for r in fields["ranges"])
        return cls(**fields)


def sidecar_path(path_prefix: str) -> str:
    """Where the layout of the dataset at `path_prefix` (no .bin/.idx suffix) is written."""
    return path_prefix + SIDECAR_SUFFIX


def write_sidecar(path: str, layout: VocabularyLayout, source: Dict[str, Any]) -> None:
    """Write `layout` and a description of how the data was made (`source`) as JSON."""
    document = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "vocabulary": layout.to_dict(),
        "source": source,
    }
    with open(path, "w", encoding="utf-8") as sidecar:
        json.dump(document, sidecar, indent=2, sort_keys=True)
        sidecar.write("\n")


def read_sidecar(path: str) -> VocabularyLayout:
    """Read the layout written by `write_sidecar`; raises ValueError naming the file if malformed."""
    with open(path, encoding="utf-8") as sidecar:
        document = json.load(sidecar)
    if document.get("format") != SIDECAR_FORMAT or document.get("version") != SIDECAR_VERSION:
        raise ValueError(
            f"{path}: not a {SIDECAR_FORMAT!r} version {SIDECAR_VERSION} file "
            f"(format {document.get('format')!r}, version {document.get('version')!r})"
        )
    try:
        return VocabularyLayout.from_dict(document["vocabulary"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: bad vocabulary layout: {error}") from error
