"""The digits sample corpus: real images, both caption directions, every code-file format,
deterministic, and it preprocesses into documents whose modality ids agree with their modes."""

import json

import numpy
import pytest
import torch
from sklearn.datasets import load_digits

from megatron_moma.data.dataset import MixedModalDocuments
from megatron_moma.data.preprocess import main as preprocess
from megatron_moma.data.sample_corpus import DIGIT_NAMES, main as make_sample_data
from megatron_moma.data.tokenizers import ByteLevelTokenizer
from megatron_moma.data.vocabulary import read_sidecar

IMAGES = 12
BOI, EOI, EOD, FIRST_CODE_ID = 258, 259, 256, 260


def expected_codes(number):
    """Pixel levels 0..16 rounded to 8 levels (half up), row-major: [64]."""
    pixels = load_digits().images[number]
    return numpy.floor(pixels * 7 / 16 + 0.5).astype(int).reshape(-1).tolist()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    assert make_sample_data(["--output-dir", str(folder), "--num-images", str(IMAGES)]) == 0
    return folder


def records(folder):
    return [json.loads(line) for line in (folder / "digits.jsonl").read_text().splitlines()]


def image_and_caption(record):
    kinds = [next(iter(segment)) for segment in record["text"]]
    assert kinds == (
        ["text", "image"] if record["direction"] == "caption-image" else ["image", "text"]
    )
    return (
        record["text"][kinds.index("image")]["image"],
        record["text"][kinds.index("text")]["text"],
    )


def test_captions_name_the_digit_in_both_directions(corpus):
    written = records(corpus)
    assert [r["label"] for r in written] == load_digits().target[:IMAGES].tolist()
    assert {r["direction"] for r in written} == {"caption-image", "image-caption"}
    for record in written:
        _, caption = image_and_caption(record)
        label = record["label"]
        assert DIGIT_NAMES[label] in caption or str(label) in caption, caption


def test_code_files_hold_the_quantized_digits_in_each_format(corpus):
    for number, record in enumerate(records(corpus)):
        image, caption = image_and_caption(record)
        if number % 4 == 0:
            assert image == expected_codes(number)  # inline
            continue
        assert image == f"codes/{number:04d}.{('npy', 'npz', 'pth')[number % 4 - 1]}"
        path = corpus / image
        if path.suffix == ".npy":  # LlamaGen: (1, N)
            codes = numpy.load(path)
            assert codes.shape == (1, 64)
        elif path.suffix == ".npz":
            codes = numpy.load(path)["codes"]
            assert codes.shape == (8, 8)
        else:  # Emu3: {"images": (h, w), "texts": ...}
            saved = torch.load(path, weights_only=True)
            assert saved["texts"] == caption and saved["images"].shape == (8, 8)
            codes = saved["images"].numpy()
        assert codes.reshape(-1).tolist() == expected_codes(number)


def test_same_seed_same_corpus_and_prefixes_do_not_depend_on_the_count(corpus, tmp_path):
    assert (
        make_sample_data(["--output-dir", str(tmp_path / "again"), "--num-images", str(IMAGES)])
        == 0
    )
    assert (tmp_path / "again" / "digits.jsonl").read_bytes() == (
        corpus / "digits.jsonl"
    ).read_bytes()
    assert make_sample_data(["--output-dir", str(tmp_path / "fewer"), "--num-images", "5"]) == 0
    assert records(tmp_path / "fewer") == records(corpus)[:5]
    assert (
        make_sample_data(
            ["--output-dir", str(tmp_path / "seed"), "--num-images", str(IMAGES), "--seed", "5"]
        )
        == 0
    )
    assert records(tmp_path / "seed") != records(corpus)


def test_preprocessed_corpus_round_trips_and_modality_ids_match_the_modes(corpus):
    prefix = corpus / "digits"
    flags = ["--codebook-size", "8", "--codes-per-image", "64", "--append-eod", "--workers", "2"]
    assert (
        preprocess(
            ["--input", str(corpus / "digits.jsonl"), "--output-prefix", str(prefix), *flags]
        )
        == 0
    )
    documents = MixedModalDocuments(f"{prefix}_text_document")
    layout = read_sidecar(f"{prefix}_text_document.vocab.json")
    tokenizer = ByteLevelTokenizer()
    assert len(documents) == IMAGES
    for number, record in enumerate(records(corpus)):
        _, caption = image_and_caption(record)
        image = [BOI] + [FIRST_CODE_ID + code for code in expected_codes(number)] + [EOI]
        text = tokenizer.tokenize(caption)
        expected = (
            text + image + [EOD] if record["direction"] == "caption-image" else image + text + [EOD]
        )
        tokens = documents.get(number)
        assert tokens.tolist() == expected
        # Modality from the stored modes (sentinels are text), against the layout's function of ids.
        first, last = documents.indexed.document_indices[number : number + 2]
        sequences, modes = documents.indexed[int(first) : int(last)]
        from_modes = sum(
            (
                [0] + [1] * (len(s) - 2) + [0] if m == 1 else [0] * len(s)
                for s, m in zip(sequences, modes)
            ),
            [],
        )
        assert layout.modality_ids(tokens).tolist() == from_modes
