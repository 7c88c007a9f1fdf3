"""MixedModalDataset: samples of whole documents with modality ids and loss masks, through
megatron's BlendedMegatronDatasetBuilder (splits, blends, cached seeded order).

Corpora are written with moma-preprocess (byte-level text; codebook 4 at ids 260..263; EOD 256,
pad 257, begin/end-of-image 258/259) and every expectation below is written out by hand.
"""

import itertools
import json
import shutil

import pytest

from megatron_moma.data.preprocess import main as preprocess
from megatron_moma.data.vocabulary import VocabularyLayout
from megatron_moma.modality.layout import Modality
from megatron_moma.testing.multiprocess import run_on_ranks

EOD, PAD, BOI, EOI = 256, 257, 258, 259

# Three documents and, by hand, their tokens, modality ids and loss mask (eod_mask_loss=True):
# the loss is masked only where the input token is EOD (its label starts another document);
# begin-of-image is predicted from the text before it, every code and end-of-image are predicted,
# and so is the first text token after end-of-image.
DOCUMENTS = [
    {"text": [{"text": "ab"}, {"image": [0, 3]}]},
    {"text": [{"image": [1, 2]}, {"text": "c"}]},
    {"text": "xyz"},
]
DOCUMENT_TOKENS = [
    [97, 98, BOI, 260, 263, EOI, EOD],
    [BOI, 261, 262, EOI, 99, EOD],
    [120, 121, 122, EOD],
]
DOCUMENT_MODALITIES = [
    [0, 0, 0, 1, 1, 0, 0],
    [0, 1, 1, 0, 0, 0],
    [0, 0, 0, 0],
]
DOCUMENT_LOSS_MASKS = [
    [1, 1, 1, 1, 1, 1, 0],
    [1, 1, 1, 1, 1, 0],
    [1, 1, 1, 0],
]


def write_corpus(folder, name, records):
    """Preprocess `records`; returns the dataset path prefix."""
    folder.mkdir(exist_ok=True)
    with open(folder / f"{name}.jsonl", "w") as jsonl:
        jsonl.writelines(json.dumps(record) + "\n" for record in records)
    flags = ["--codebook-size", "4", "--codes-per-image", "2", "--append-eod"]
    assert (
        preprocess(
            [
                "--input",
                str(folder / f"{name}.jsonl"),
                "--output-prefix",
                str(folder / name),
                *flags,
            ]
        )
        == 0
    )
    return str(folder / f"{name}_text_document")


def build_samples(config_fields, sizes):
    """On a rank: build the splits and return every sample of each as lists (None: no split)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )

    from megatron_moma.data.dataset import MixedModalDataset, MixedModalDatasetConfig

    config = MixedModalDatasetConfig(**config_fields)
    splits = BlendedMegatronDatasetBuilder(MixedModalDataset, sizes, lambda: True, config).build()
    return [
        (
            None
            if split is None
            else [
                {key: value.tolist() for key, value in split[i].items() if key != "attention_mask"}
                for i in range(len(split))
            ]
        )
        for split in splits
    ]


def samples(config_fields, sizes=(None, None, None)):
    (result,) = run_on_ranks(build_samples, 1, config_fields, list(sizes), timeout=120)
    return result


def config(tmp_path, blend, **fields):
    return dict(
        dict(
            random_seed=1234,
            sequence_length=16,
            blend=blend,
            split="1,0,0",
            path_to_cache=str(tmp_path / "cache"),
        ),
        **fields,
    )


def document_order(stream, documents):
    """The order of `documents` whose concatenation is `stream` (None if there is none)."""
    for order in itertools.permutations(range(len(documents))):
        if sum((documents[i] for i in order), []) == stream:
            return order
    return None


def concatenated(lists, order):
    return sum((lists[i] for i in order), [])


def test_tokens_modalities_positions_and_loss_masks_at_boundaries(tmp_path):
    prefix = write_corpus(tmp_path / "corpus", "docs", DOCUMENTS)
    fields = config(tmp_path, ([prefix], None), eod_mask_loss=True, reset_position_ids=True)
    (sample,) = samples(fields)[0]  # 17 tokens: one sample of 16 inputs and 16 labels
    order = document_order(sample["tokens"] + sample["labels"][-1:], DOCUMENT_TOKENS)
    assert order is not None, "documents were split apart or altered"
    stream = concatenated(DOCUMENT_TOKENS, order)
    assert sample["tokens"] == stream[:16] and sample["labels"] == stream[1:]
    assert sample["modality_ids"] == concatenated(DOCUMENT_MODALITIES, order)[:16]
    assert sample["loss_mask"] == concatenated(DOCUMENT_LOSS_MASKS, order)[:16]
    assert (
        sample["position_ids"]
        == concatenated([list(range(len(d))) for d in DOCUMENT_TOKENS], order)[:16]
    )


def test_modality_loss_weights_follow_the_label_modality(tmp_path):
    prefix = write_corpus(tmp_path / "corpus", "docs", DOCUMENTS)
    fields = config(tmp_path, ([prefix], None), modality_loss_weights={"image": 0.25})
    (sample,) = samples(fields)[0]
    order = document_order(sample["tokens"] + sample["labels"][-1:], DOCUMENT_TOKENS)
    label_modalities = concatenated(DOCUMENT_MODALITIES, order)[1:]
    assert sample["loss_mask"] == [0.25 if modality == 1 else 1.0 for modality in label_modalities]
    assert sample["modality_ids"] == concatenated(DOCUMENT_MODALITIES, order)[:16]


def lettered_documents(letters):
    """Document k: three lowercase letters, an image, three uppercase letters (+ EOD)."""
    records = [
        {"text": [{"text": c * 3}, {"image": [k % 4, 3 - k % 4]}, {"text": c.upper() * 3}]}
        for k, c in enumerate(letters)
    ]
    tokens = [
        [ord(c)] * 3 + [BOI, 260 + k % 4, 263 - k % 4, EOI] + [ord(c.upper())] * 3 + [EOD]
        for k, c in enumerate(letters)
    ]
    return records, tokens


def test_splits_are_made_of_whole_documents_and_padded_with_masked_loss(tmp_path):
    records, tokens = lettered_documents("abcdef")  # 11 tokens each
    prefix = write_corpus(tmp_path / "corpus", "letters", records)
    fields = config(
        tmp_path,
        ([prefix], None),
        split="2,1,0",
        sequence_length=43,
        drop_last_partial_validation_sequence=False,
    )
    train, valid, test = samples(fields)
    assert test is None
    (train_sample,) = train  # documents 0-3: 44 tokens
    assert (
        document_order(train_sample["tokens"] + train_sample["labels"][-1:], tokens[:4]) is not None
    )
    (valid_sample,) = valid  # documents 4-5: 22 tokens, then padding
    real = valid_sample["tokens"][:22]
    assert document_order(real, tokens[4:]) is not None
    assert valid_sample["tokens"][22:] == [0] * 21  # padding shows as id 0 to the embedding
    assert valid_sample["loss_mask"] == [1.0] * 21 + [0.0] * 22  # label 21 onwards is padding


def test_blend_draws_samples_in_proportion_to_the_weights(tmp_path):
    a_prefix = write_corpus(
        tmp_path / "a", "a", [{"text": [{"text": "aa"}, {"image": [0, 0]}]}] * 5
    )
    b_prefix = write_corpus(
        tmp_path / "b", "b", [{"text": [{"text": "bb"}, {"image": [3, 3]}]}] * 5
    )
    fields = config(tmp_path, ([a_prefix, b_prefix], [1.0, 3.0]), sequence_length=4)
    train = samples(fields, sizes=(8, 0, 0))[0]
    sources = ["a" if {97, 260} & set(s["tokens"] + s["labels"]) else "b" for s in train]
    for sample, source in zip(train, sources):
        others = {98, 263} if source == "a" else {97, 260}
        assert not others & set(sample["tokens"] + sample["labels"])
    # Megatron's greedy blending: weights 1:3 over 8 samples -> exactly 2 from a, 6 from b.
    assert (len(train), sources.count("a"), sources.count("b")) == (8, 2, 6)


def test_sample_order_is_deterministic_and_set_by_the_seed(tmp_path):
    records, _ = lettered_documents("abcdef")
    prefix = write_corpus(tmp_path / "corpus", "letters", records)
    first = samples(config(tmp_path, ([prefix], None), sequence_length=5))[0]
    shutil.rmtree(tmp_path / "cache")
    again = samples(config(tmp_path, ([prefix], None), sequence_length=5))[0]
    other_seed = samples(config(tmp_path, ([prefix], None), sequence_length=5, random_seed=7))[0]
    assert len(first) == (6 * 11 - 1) // 5
    assert first == again
    assert [s["tokens"] for s in other_seed] != [s["tokens"] for s in first]


def test_vocabulary_comes_from_the_sidecars_which_must_agree(tmp_path):
    from megatron_moma.data.dataset import MixedModalDatasetConfig

    a_prefix = write_corpus(tmp_path / "a", "a", DOCUMENTS)
    found = MixedModalDatasetConfig(**config(tmp_path, ([a_prefix], None))).vocabulary
    assert found == VocabularyLayout(
        264,
        (Modality("image", 260, 263),),
        eod=EOD,
        pad=PAD,
        begin_of_image=BOI,
        end_of_image=EOI,
    )
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "b.jsonl").write_text(json.dumps({"text": [{"image": [1, 2]}]}) + "\n")
    assert (
        preprocess(
            [
                "--input",
                str(tmp_path / "b" / "b.jsonl"),
                "--output-prefix",
                str(tmp_path / "b" / "b"),
                "--codebook-size",
                "8",
            ]
        )
        == 0
    )
    with pytest.raises(
        ValueError, match="b_text_document.vocab.json: vocabulary layout .* differs from"
    ):
        MixedModalDatasetConfig(
            **config(tmp_path, ([a_prefix, str(tmp_path / "b" / "b_text_document")], None))
        )


def test_unknown_modality_in_loss_weights_is_refused(tmp_path):
    from megatron_moma.data.dataset import MixedModalDatasetConfig

    prefix = write_corpus(tmp_path / "corpus", "docs", DOCUMENTS)
    with pytest.raises(ValueError, match=r"modality_loss_weights names \['video'\]"):
        MixedModalDatasetConfig(
            **config(tmp_path, ([prefix], None), modality_loss_weights={"video": 2.0})
        )
