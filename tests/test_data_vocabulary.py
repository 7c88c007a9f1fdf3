"""Vocabulary layout: token id -> modality id, validation, and the JSON sidecar."""

import json

import numpy
import pytest
import torch

from megatron_moma.data.vocabulary import (
    IMAGE,
    SPEECH,
    VocabularyLayout,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)
from megatron_moma.modality.layout import Modality


def three_modality_layout() -> VocabularyLayout:
    """Text everywhere but image [40, 59] and speech [60, 69]; sentinels 0-3 are text."""
    return VocabularyLayout(
        vocab_size=100,
        ranges=(Modality("speech", 60, 69), Modality("image", 40, 59)),
        eod=0,
        pad=3,
        begin_of_image=1,
        end_of_image=2,
    )


TOKENS = [0, 1, 39, 40, 59, 60, 69, 70, 99, 2]
EXPECTED_MODALITIES = [0, 0, 0, 1, 1, 2, 2, 0, 0, 0]


def test_modality_ids_of_numpy_tokens():
    modality = three_modality_layout().modality_ids(numpy.array(TOKENS, dtype=numpy.uint16))
    assert modality.dtype == numpy.int64
    assert modality.tolist() == EXPECTED_MODALITIES


def test_modality_ids_of_torch_tokens_keep_their_shape():
    tokens = torch.tensor([TOKENS, TOKENS[::-1]])
    modality = three_modality_layout().modality_ids(tokens)
    assert modality.dtype == torch.int64 and modality.shape == (2, 10)
    assert modality.tolist() == [EXPECTED_MODALITIES, EXPECTED_MODALITIES[::-1]]


@pytest.mark.parametrize(
    "ranges, sentinels, message",
    [
        ((Modality("image", 10, 20), Modality("speech", 20, 30)), {}, "overlaps"),
        (
            (Modality("image", 10, 20),),
            {"begin_of_image": 15},
            "begin_of_image id 15 lies in the image range",
        ),
        ((Modality("image", 10, 20),), {"eod": 10}, "eod id 10 lies in the image range"),
        ((Modality("image", 90, 100),), {}, "outside the vocabulary of 100 ids"),
        ((Modality("image", 10, 20), Modality("image", 30, 40)), {}, "one id range"),
        ((), {"pad": 100}, r"pad id 100 is outside the vocabulary \[0, 100\)"),
        (
            (),
            {"begin_of_image": 5, "end_of_image": 5},
            "end_of_image id 5 is also the begin_of_image id",
        ),
        ((), {"pad": 7, "end_of_image": 7}, "end_of_image id 7 is also the pad id"),
        ((Modality("video", 10, 20),), {}, r"name must be one of \('image', 'speech'\)"),
        ((Modality("speech", 10, 20),), {}, "first of .* without gaps"),
    ],
)
def test_layout_rejects_inconsistent_ranges_and_sentinels(ranges, sentinels, message):
    fields = dict({"eod": 0}, **sentinels)
    with pytest.raises(ValueError, match=message):
        VocabularyLayout(100, ranges, **fields)


def test_text_is_not_a_range():
    with pytest.raises(ValueError, match="text is the implicit modality"):
        Modality("text", 0, 5)
    with pytest.raises(ValueError, match="first_id <= last_id"):
        Modality("image", 5, 4)


def test_model_modality_ids_agree_with_the_dataset_vocabulary():
    """The model numbers modalities by position in its layout, the dataset by name."""
    layout = three_modality_layout().modality_layout
    assert layout.names.index("image") == IMAGE and layout.names.index("speech") == SPEECH
    tokens = torch.tensor(TOKENS)
    assert torch.equal(layout.modality_ids(tokens), three_modality_layout().modality_ids(tokens))


def test_sidecar_round_trip(tmp_path):
    layout = three_modality_layout()
    path = sidecar_path(str(tmp_path / "corpus_text_document"))
    assert path.endswith("corpus_text_document.vocab.json")
    write_sidecar(path, layout, {"tokenizer": {"type": "ByteLevel"}})
    assert read_sidecar(path) == layout
    written = json.loads(open(path).read())
    assert written["vocabulary"]["ranges"] == [
        {"name": "speech", "first_id": 60, "last_id": 69},
        {"name": "image", "first_id": 40, "last_id": 59},
    ]
    assert written["source"] == {"tokenizer": {"type": "ByteLevel"}}


def test_sidecar_of_another_format_is_refused_with_its_path(tmp_path):
    path = tmp_path / "other.vocab.json"
    path.write_text(json.dumps({"format": "something else", "version": 1}))
    with pytest.raises(
        ValueError, match="other.vocab.json: not a 'megatron-moma vocabulary layout'"
    ):
        read_sidecar(str(path))
