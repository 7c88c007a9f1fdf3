"""moma-preprocess: round trips through megatron's IndexedDataset, workers/partitions, bad input.

Expected ids are written out by hand: the byte-level tokenizer maps text to its UTF-8 bytes and
has end-of-document 256, pad 257, begin-of-image 258, end-of-image 259; with --codebook-size 16
the image codes take ids 260..275 (code c -> 260 + c).
"""

import json
import os
import subprocess
import sys

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_moma.data.preprocess import main
from megatron_moma.data.tokenizers import ByteLevelTokenizer
from megatron_moma.data.vocabulary import VocabularyLayout, read_sidecar
from megatron_moma.modality.layout import Modality

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOD, BOI, EOI, IMAGE_0 = 256, 258, 259, 260
IMAGE_FLAGS = ["--codebook-size", "16", "--codes-per-image", "4"]

RECORDS = [
    {"text": "hi"},
    {"text": [{"text": "ab"}, {"image": [0, 1, 2, 15]}]},
    {"text": [{"image": "codes/llamagen.npy"}, {"text": "c"}]},
    {
        "text": [
            {"image": "codes/emu3.pth"},
            {"text": ""},
            {"image": {"path": "codes/grid.npz", "key": "codes"}},
        ]
    },
]
# (sequences, modes) of each record's document with --append-eod.
EXPECTED_DOCUMENTS = [
    ([[104, 105, EOD]], [0]),
    ([[97, 98], [BOI, 260, 261, 262, 275, EOI], [EOD]], [0, 1, 0]),
    ([[BOI, 263, 264, 265, 266, EOI], [99, EOD]], [1, 0]),
    ([[BOI, 267, 268, 269, 270, EOI], [BOI, 271, 272, 273, 274, EOI], [EOD]], [1, 1, 0]),
]


def write_code_files(folder):
    os.makedirs(folder / "codes", exist_ok=True)
    numpy.save(folder / "codes" / "llamagen.npy", numpy.array([[3, 4, 5, 6]]))
    torch.save(
        {"images": torch.tensor([[7, 8], [9, 10]]), "texts": "unused"},
        folder / "codes" / "emu3.pth",
    )
    numpy.savez(
        folder / "codes" / "grid.npz",
        codes=numpy.array([[11, 12], [13, 14]]),
        other=numpy.array([0]),
    )


def write_jsonl(path, lines):
    """Write records (dicts) or raw lines (str/bytes) one per line."""
    with open(path, "wb") as output:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            output.write((line.encode("utf-8") if isinstance(line, str) else line) + b"\n")


@pytest.fixture
def corpus(tmp_path):
    write_code_files(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", RECORDS)
    return tmp_path


def read_documents(prefix):
    """Megatron's reader: [(sequences, modes)] per document, and the token dtype."""
    dataset = IndexedDataset(prefix, multimodal=True)
    bounds = dataset.document_indices
    documents = []
    for first, last in zip(bounds[:-1], bounds[1:]):
        sequences, modes = dataset[int(first) : int(last)]
        documents.append(([s.tolist() for s in sequences], modes.tolist()))
    return documents, dataset.index.dtype


def run(folder, *flags, prefix="out"):
    return main(
        ["--input", str(folder / "data.jsonl"), "--output-prefix", str(folder / prefix), *flags]
    )


def test_round_trip_ids_modes_and_document_boundaries(corpus):
    assert run(corpus, *IMAGE_FLAGS, "--append-eod") == 0
    documents, dtype = read_documents(str(corpus / "out_text_document"))
    assert documents == EXPECTED_DOCUMENTS
    assert dtype == numpy.uint16
    tokenizer = ByteLevelTokenizer()
    texts = [
        tokenizer.detokenize(s)
        for sequences, modes in documents
        for s, m in zip(sequences, modes)
        if m == 0
    ]
    assert texts == ["hi", "ab", "", "c", ""]  # the lone EOD sequences detokenize to ""


def test_sidecar_records_the_vocabulary_layout(corpus):
    assert run(corpus, *IMAGE_FLAGS) == 0
    expected = VocabularyLayout(
        276,
        (Modality("image", 260, 275),),
        eod=256,
        pad=257,
        begin_of_image=258,
        end_of_image=259,
    )
    assert read_sidecar(str(corpus / "out_text_document.vocab.json")) == expected
    source = json.loads((corpus / "out_text_document.vocab.json").read_text())["source"]
    assert source["documents"] == 4
    assert source["tokens"] == {"text": 2 + 2 + 1, "image": 4 * 6, "speech": 0}


def test_without_append_eod_documents_end_with_their_last_segment(corpus):
    assert run(corpus, *IMAGE_FLAGS) == 0
    documents, _ = read_documents(str(corpus / "out_text_document"))
    assert documents[0] == ([[104, 105]], [0])
    assert documents[3] == (
        [[BOI, 267, 268, 269, 270, EOI], [BOI, 271, 272, 273, 274, EOI]],
        [1, 1],
    )


def test_workers_and_partitions_give_identical_files(tmp_path):
    write_code_files(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", RECORDS * 13)
    outputs = {}
    for name, flags in {
        "w1": [],
        "w4": ["--workers", "4"],
        "w4p3": ["--workers", "4", "--partitions", "3"],
    }.items():
        assert run(tmp_path, *IMAGE_FLAGS, "--append-eod", *flags, prefix=name) == 0
        outputs[name] = [
            (tmp_path / f"{name}_text_document{suffix}").read_bytes() for suffix in (".bin", ".idx")
        ]
    assert outputs["w1"] == outputs["w4"] == outputs["w4p3"]
    documents, _ = read_documents(str(tmp_path / "w4p3_text_document"))
    assert documents == EXPECTED_DOCUMENTS * 13


def test_progress_log_reports_throughput(corpus, capsys):
    assert run(corpus, *IMAGE_FLAGS, "--log-interval", "2") == 0
    log = capsys.readouterr().err
    assert "Processed 2 documents (" in log and "Processed 4 documents (" in log
    assert " docs/s, " in log and " MB/s)" in log


@pytest.mark.parametrize(
    "vocab_size, dtype", [(65499, numpy.uint16), (65500, numpy.int32), (65536, numpy.int32)]
)
def test_token_dtype_follows_the_vocabulary_size(corpus, vocab_size, dtype):
    assert run(corpus, *IMAGE_FLAGS, "--vocab-size", str(vocab_size)) == 0
    documents, stored = read_documents(str(corpus / "out_text_document"))
    assert stored == dtype
    assert documents[1] == ([[97, 98], [BOI, 260, 261, 262, 275, EOI]], [0, 1])


def test_vocabulary_map_and_explicit_sentinels(corpus):
    # Chameleon-like: image ids inside a padded vocabulary, sentinels chosen by the user.
    (corpus / "map.json").write_text(json.dumps([1000 + (5 * code) % 16 for code in range(16)]))
    flags = [
        "--image-vocab-map",
        str(corpus / "map.json"),
        "--begin-of-image-id",
        "300",
        "--end-of-image-id",
        "301",
        "--vocab-size",
        "65536",
    ]
    assert run(corpus, *flags) == 0
    documents, dtype = read_documents(str(corpus / "out_text_document"))
    assert dtype == numpy.int32
    assert documents[1] == (
        [[97, 98], [300, 1000, 1005, 1010, 1011, 301]],
        [0, 1],
    )  # codes 0, 1, 2, 15
    layout = read_sidecar(str(corpus / "out_text_document.vocab.json"))
    assert layout.range_of("image") == Modality("image", 1000, 1015)
    assert (layout.begin_of_image, layout.end_of_image, layout.vocab_size) == (300, 301, 65536)


def test_explicit_image_code_offset(corpus):
    assert run(corpus, *IMAGE_FLAGS, "--image-code-offset", "300") == 0
    documents, _ = read_documents(str(corpus / "out_text_document"))
    assert documents[1] == ([[97, 98], [BOI, 300, 301, 302, 315, EOI]], [0, 1])
    layout = read_sidecar(str(corpus / "out_text_document.vocab.json"))
    assert (layout.range_of("image"), layout.vocab_size) == (Modality("image", 300, 315), 316)


def test_several_json_keys_write_one_dataset_each(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", [{"text": "x", "caption": [{"image": [1, 2, 3, 4]}]}])
    assert run(tmp_path, *IMAGE_FLAGS, "--json-keys", "text", "caption") == 0
    assert read_documents(str(tmp_path / "out_text_document"))[0] == [([[120]], [0])]
    assert read_documents(str(tmp_path / "out_caption_document"))[0] == [
        ([[BOI, 261, 262, 263, 264, EOI]], [1])
    ]


GOOD_LINE = json.dumps({"text": [{"text": "ok"}, {"image": [1, 2, 3, 4]}]})
BAD_RECORDS = {
    "invalid json": (
        '{"text": "a",}',
        "line 2: not valid JSON (Expecting property name enclosed in double quotes at column 14)",
    ),
    "not an object": ("[1, 2]", "line 2: expected a JSON object, got a list"),
    "missing field": (
        '{"body": "x"}',
        "line 2: missing field 'text' (expected a string or a list of segments)",
    ),
    "field type": (
        '{"text": 5}',
        "line 2: field 'text' must be a string or a list of segments, got a number (5)",
    ),
    "no tokens": (
        '{"text": [{"text": ""}]}',
        "line 2: field 'text' has no tokens (expected non-empty text or an image)",
    ),
    "unknown segment": (
        '{"text": [{"txt": "a"}]}',
        "line 2, segment 1: expected an object with exactly one key of ['text', 'image'], got ['txt']",
    ),
    "two kinds": (
        '{"text": [{"text": "a", "image": [1]}]}',
        "line 2, segment 1: expected an object with exactly one key of ['text', 'image'], got ['image', 'text']",
    ),
    "text type": (
        '{"text": [{"text": 3}]}',
        "line 2, segment 1 'text': expected a string, got a number (3)",
    ),
    "outside codebook": (
        '{"text": [{"text": "a"}, {"image": [1, 2, 3, 16]}]}',
        "line 2, segment 2 'image': code 16 is outside the codebook [0, 16)",
    ),
    "negative code": (
        '{"text": [{"image": [-1, 2, 3, 4]}]}',
        "line 2, segment 1 'image': code -1 is outside the codebook [0, 16)",
    ),
    "codes per image": (
        '{"text": [{"image": [1, 2, 3]}]}',
        "line 2, segment 1 'image': 3 codes, expected 4 per image (--codes-per-image)",
    ),
    "float codes": (
        '{"text": [{"image": [1.5, 2, 3, 4]}]}',
        "line 2, segment 1 'image': codes must be integers, got dtype float64",
    ),
    "string codes": (
        '{"text": [{"image": ["a", 2, 3, 4]}]}',
        "line 2, segment 1 'image': codes must be integers, got non-numeric values",
    ),
    "ragged grid": (
        '{"text": [{"image": [[1, 2], [3]]}]}',
        "line 2, segment 1 'image': inline codes must be a flat list or a rectangular grid of integers",
    ),
    "image value": (
        '{"text": [{"image": 7}]}',
        "line 2, segment 1 'image': expected a list of codes, a code-file path, or an object with 'path', got a number (7)",
    ),
    "reference field": (
        '{"text": [{"image": {"path": "codes/llamagen.npy", "row": 0}}]}',
        "line 2, segment 1 'image': unknown fields ['row']; an image reference has ['path', 'key', 'index']",
    ),
    "missing file": (
        '{"text": [{"image": "codes/gone.npy"}]}',
        "line 2, segment 1 'image': code file '{folder}/codes/gone.npy' not found",
    ),
    "file suffix": (
        '{"text": [{"image": "codes/picture.png"}]}',
        "line 2, segment 1 'image': code file '{folder}/codes/picture.png' has suffix '.png'; expected one of ('.npy', '.npz', '.pt', '.pth')",
    ),
    "damaged file": (
        '{"text": [{"image": "codes/damaged.npy"}]}',
        "line 2, segment 1 'image': cannot read code file '{folder}/codes/damaged.npy'",
    ),
    "float file": (
        '{"text": [{"image": "codes/float.npy"}]}',
        "line 2, segment 1 'image': code file '{folder}/codes/float.npy': codes must be integers, got dtype float32",
    ),
    "ambiguous npz": (
        '{"text": [{"image": "codes/grid.npz"}]}',
        "line 2, segment 1 'image': code file '{folder}/codes/grid.npz' holds keys ['codes', 'other']; give 'key' to pick one",
    ),
    "file too short": (
        '{"text": [{"image": {"path": "codes/emu3.pth", "index": 0}}]}',
        "line 2, segment 1 'image': code file '{folder}/codes/emu3.pth': 2 codes, expected 4 per image (--codes-per-image)",
    ),
    "file outside codebook": (
        '{"text": [{"image": "codes/big.npy"}]}',
        "line 2, segment 1 'image': code file '{folder}/codes/big.npy': code 99 is outside the codebook [0, 16)",
    ),
    "lone surrogate": (
        '{"text": [{"text": "a\\ud800b"}]}',
        "line 2, segment 1 'text': character 1 is a lone UTF-16 surrogate (\\ud800); expected text that is valid Unicode",
    ),
    "deep nesting": (
        '{"text": ' + "[" * 100000 + "]" * 100000 + "}",
        "line 2: JSON nested too deeply to read",
    ),
    "deep inline codes": (
        '{"text": [{"image": ' + "[" * 200 + "1" + "]" * 200 + "}]}",
        "line 2, segment 1 'image': ",
    ),
    "invalid utf-8": (
        b'{"text": "\xff"}',
        "line 2: not valid UTF-8 (invalid start byte at byte 10)",
    ),
}


def write_bad_corpus(folder, bad_line):
    write_code_files(folder)
    (folder / "codes" / "damaged.npy").write_bytes(b"not numpy")
    numpy.save(folder / "codes" / "float.npy", numpy.zeros((1, 4), dtype=numpy.float32))
    numpy.save(folder / "codes" / "big.npy", numpy.array([1, 2, 3, 99]))
    write_jsonl(folder / "data.jsonl", [GOOD_LINE, bad_line, GOOD_LINE])


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_fails_with_file_line_and_field_and_leaves_no_output(tmp_path, capsys, case):
    bad_line, message = BAD_RECORDS[case]
    write_bad_corpus(tmp_path, bad_line)
    (tmp_path / "out_text_document.bin").write_bytes(b"previous run")
    before = sorted(os.listdir(tmp_path))
    assert run(tmp_path, *IMAGE_FLAGS, "--workers", "2") == 1
    expected = f"error: {tmp_path}/data.jsonl " + message.format(folder=tmp_path)
    assert expected in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before  # no partial dataset, no temporary folder
    assert (tmp_path / "out_text_document.bin").read_bytes() == b"previous run"


def test_text_ids_inside_the_image_range_are_refused(tmp_path, capsys):
    # A vocabulary map that puts the image codes on byte ids 200..215: U+0200 is bytes 200, 128.
    (tmp_path / "map.json").write_text(json.dumps(list(range(200, 216))))
    write_jsonl(tmp_path / "data.jsonl", [{"text": "a\u0200"}])
    assert run(tmp_path, "--image-vocab-map", str(tmp_path / "map.json")) == 1
    assert (
        f"error: {tmp_path}/data.jsonl line 1, segment 1 'text': the tokenizer produced id 200, "
        "which the vocabulary layout gives to another modality"
    ) in capsys.readouterr().err


def test_images_without_an_image_vocabulary_are_refused(tmp_path, capsys):
    write_jsonl(tmp_path / "data.jsonl", [GOOD_LINE])
    assert run(tmp_path) == 1
    assert (
        "line 1, segment 2 'image': no image vocabulary configured (pass --codebook-size or --image-vocab-map)"
    ) in capsys.readouterr().err


def test_several_fields_are_named_in_messages(tmp_path, capsys):
    write_jsonl(tmp_path / "data.jsonl", [{"text": "x", "caption": [{"image": [1, 2, 3, 99]}]}])
    assert run(tmp_path, *IMAGE_FLAGS, "--json-keys", "text", "caption") == 1
    assert (
        "line 1, field 'caption', segment 1 'image': code 99 is outside the codebook [0, 16)"
        in capsys.readouterr().err
    )


def test_skip_bad_keeps_good_records_and_lists_the_rejected(tmp_path, capsys):
    write_code_files(tmp_path)
    lines = [RECORDS[1], BAD_RECORDS["outside codebook"][0], RECORDS[2], '{"text": "a",}']
    write_jsonl(tmp_path / "data.jsonl", lines)
    assert run(tmp_path, *IMAGE_FLAGS, "--append-eod", "--skip-bad", "--workers", "2") == 0
    documents, _ = read_documents(str(tmp_path / "out_text_document"))
    assert documents == [EXPECTED_DOCUMENTS[1], EXPECTED_DOCUMENTS[2]]
    rejected = [
        json.loads(line) for line in (tmp_path / "out_rejected.jsonl").read_text().splitlines()
    ]
    assert [entry["line"] for entry in rejected] == [2, 4]
    assert rejected[0]["reason"].endswith(
        "line 2, segment 2 'image': code 16 is outside the codebook [0, 16)"
    )
    assert rejected[1]["reason"].endswith(
        "line 4: not valid JSON (Expecting property name enclosed in double quotes at column 14)"
    )
    assert [entry["record"] for entry in rejected] == [lines[1], lines[3]]
    assert "4 documents" in capsys.readouterr().err


def test_skip_bad_with_nothing_left_fails_without_output(tmp_path, capsys):
    write_jsonl(tmp_path / "data.jsonl", ["[1]", "{}"])
    assert run(tmp_path, "--skip-bad") == 1
    assert (
        f"error: {tmp_path}/data.jsonl: no records to write (2 rejected)" in capsys.readouterr().err
    )
    assert sorted(os.listdir(tmp_path)) == ["data.jsonl"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--codebook-size", "16", "--image-code-offset", "100"],
            "--image-code-offset 100 overlaps the text tokenizer's ids [0, 260)",
        ),
        (
            ["--codebook-size", "16", "--vocab-size", "270"],
            "--vocab-size 270 is too small: the layout uses ids up to 275",
        ),
        (["--codes-per-image", "4"], "image flags need --codebook-size (or --image-vocab-map)"),
        (
            ["--codebook-size", "16", "--begin-of-image-id", "256"],
            "begin_of_image id 256 is also the eod id",
        ),
        (["--workers", "0"], "argument --workers: expected an integer >= 1, got '0'"),
        (["--log-interval", "x"], "argument --log-interval: expected an integer >= 1, got 'x'"),
        (["--codebook-size", "-3"], "argument --codebook-size: expected an integer >= 1, got '-3'"),
        (
            ["--codebook-size", "16", "--codes-per-image", "0"],
            "argument --codes-per-image: expected an integer >= 1, got '0'",
        ),
        (["--image-vocab-map", "nowhere.json"], "--image-vocab-map nowhere.json: no such file"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_inconsistent_flags_exit_2_with_one_line(corpus, capsys, flags, message):
    assert run(corpus, *flags) == 2
    error = capsys.readouterr().err
    assert error.startswith("moma-preprocess: error: ") and error.count("\n") == 1, error
    assert message in error
    assert not any(name.startswith("out") or name.startswith(".out") for name in os.listdir(corpus))


def test_an_output_folder_that_refuses_files_is_named_without_a_traceback(corpus, capsys):
    """/proc takes no new files, whatever the user (the tests may run as root, for whom
    permission bits do not stop a write)."""
    assert main(["--input", str(corpus / "data.jsonl"), "--output-prefix", "/proc/out",
                 *IMAGE_FLAGS]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: /proc/") and "--output-prefix /proc/out" in error, error
    assert "Traceback" not in error and "nothing was written" in error


def test_tool_script_exits_non_zero_on_bad_input(tmp_path):
    write_bad_corpus(tmp_path, BAD_RECORDS["outside codebook"][0])
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPOSITORY, "tools", "preprocess_mm_data.py"),
            "--input",
            str(tmp_path / "data.jsonl"),
            "--output-prefix",
            str(tmp_path / "out"),
            *IMAGE_FLAGS,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "line 2, segment 2 'image': code 16 is outside the codebook [0, 16)" in result.stderr
    assert not any(
        name.startswith("out") or name.startswith(".out") for name in os.listdir(tmp_path)
    )


def test_hugging_face_tokenizer_from_a_local_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[EOS]": 0, "[PAD]": 1, "hello": 2, "world": 3, "[UNK]": 4}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    ).save_pretrained(tmp_path / "tokenizer")
    write_jsonl(
        tmp_path / "data.jsonl", [{"text": [{"text": "hello world"}, {"image": [1, 2, 3, 4]}]}]
    )
    flags = [
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        str(tmp_path / "tokenizer"),
    ]
    assert run(tmp_path, *flags, *IMAGE_FLAGS, "--append-eod") == 0
    # Text ids 0..4; begin/end-of-image appended as 5 and 6; codes from 7.
    assert read_documents(str(tmp_path / "out_text_document"))[0] == [
        ([[2, 3], [5, 8, 9, 10, 11, 6], [0]], [0, 1, 0])
    ]
    layout = read_sidecar(str(tmp_path / "out_text_document.vocab.json"))
    assert (layout.eod, layout.pad, layout.vocab_size) == (0, 1, 23)
