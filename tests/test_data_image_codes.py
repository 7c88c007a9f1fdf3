"""Image code files (LlamaGen .npy, Emu3 .pth, .npz) and their mapping into the vocabulary."""

import json

import numpy
import pytest
import torch

from megatron_moma.data.image_codes import (
    CodeError,
    codes_from_array,
    image_vocabulary_from_map,
    image_vocabulary_from_offset,
    load_code_file,
)


def test_llamagen_npy_of_shape_1_by_n(tmp_path):
    path = tmp_path / "0.npy"
    numpy.save(path, numpy.array([[5, 0, 16383, 7]], dtype=numpy.int64))
    assert load_code_file(str(path)).tolist() == [5, 0, 16383, 7]


def test_llamagen_augmented_codes_pick_one_row_by_index(tmp_path):
    path = tmp_path / "0.npy"
    numpy.save(path, numpy.array([[1, 2, 3], [4, 5, 6]], dtype=numpy.int32))
    assert load_code_file(str(path), index=1).tolist() == [4, 5, 6]
    with pytest.raises(CodeError, match=r"index 2 is outside the first axis of shape \(2, 3\)"):
        load_code_file(str(path), index=2)


@pytest.mark.parametrize("grid_shape", [(2, 3), (1, 2, 3)])
def test_emu3_pth_dict_grid_is_read_row_major(tmp_path, grid_shape):
    path = tmp_path / "0.pth"
    grid = torch.tensor([[10, 11, 12], [20, 21, 22]]).reshape(grid_shape)
    torch.save({"name": "0.jpg", "images": grid, "texts": "a caption"}, path)
    assert load_code_file(str(path)).tolist() == [10, 11, 12, 20, 21, 22]


def test_pth_plain_tensor_and_explicit_key(tmp_path):
    tensor_path, dict_path = tmp_path / "t.pt", tmp_path / "d.pt"
    torch.save(torch.tensor([3, 1, 2]), tensor_path)
    torch.save({"a": torch.tensor([1]), "b": torch.tensor([9, 8])}, dict_path)
    assert load_code_file(str(tensor_path)).tolist() == [3, 1, 2]
    assert load_code_file(str(dict_path), key="b").tolist() == [9, 8]
    with pytest.raises(CodeError, match=r"holds keys \['a', 'b'\]; give 'key' to pick one"):
        load_code_file(str(dict_path))


def test_npz_single_array_by_default_and_by_key(tmp_path):
    single, double = tmp_path / "s.npz", tmp_path / "d.npz"
    numpy.savez(single, codes=numpy.array([[1, 2], [3, 4]]))
    numpy.savez(double, codes=numpy.array([7]), other=numpy.array([8]))
    assert load_code_file(str(single)).tolist() == [1, 2, 3, 4]
    assert load_code_file(str(double), key="other").tolist() == [8]
    with pytest.raises(CodeError, match="has no key 'missing'"):
        load_code_file(str(double), key="missing")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("x.png", b"", "has suffix '.png'; expected one of"),
        ("gone.npy", None, "not found"),
        ("broken.npy", b"not a numpy file", "cannot read code file .*broken.npy"),
        ("broken.pth", b"\x00\x01", "cannot read code file .*broken.pth"),
    ],
)
def test_unusable_code_files_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CodeError, match=message):
        load_code_file(str(path))


def test_codes_must_be_integers_and_present():
    with pytest.raises(CodeError, match="codes must be integers, got dtype float32"):
        codes_from_array(numpy.array([1.0, 2.0], dtype=numpy.float32))
    with pytest.raises(CodeError, match="non-numeric values"):
        codes_from_array(numpy.array(["1", "2"]))
    with pytest.raises(CodeError, match=r"no codes \(shape \(0,\)\)"):
        codes_from_array(numpy.array([], dtype=numpy.int64))


def test_offset_mapping_checks_codebook_and_count():
    vocabulary = image_vocabulary_from_offset(codebook_size=8, offset=100, codes_per_image=3)
    assert (vocabulary.first_id, vocabulary.last_id) == (100, 107)
    assert vocabulary.to_ids(numpy.array([0, 5, 7])).tolist() == [100, 105, 107]
    with pytest.raises(CodeError, match=r"code 8 is outside the codebook \[0, 8\)"):
        vocabulary.to_ids(numpy.array([0, 8, 1]))
    with pytest.raises(CodeError, match=r"code -1 is outside the codebook \[0, 8\)"):
        vocabulary.to_ids(numpy.array([-1, 0, 1]))
    with pytest.raises(CodeError, match=r"2 codes, expected 3 per image \(--codes-per-image\)"):
        vocabulary.to_ids(numpy.array([0, 1]))


def test_vocabulary_map_as_a_list(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps([12, 10, 11, 13]))
    vocabulary = image_vocabulary_from_map(str(path))
    assert (vocabulary.codebook_size, vocabulary.first_id, vocabulary.last_id) == (4, 10, 13)
    assert vocabulary.to_ids(numpy.array([0, 1, 2, 3, 0])).tolist() == [12, 10, 11, 13, 12]


def chameleon_names(count):
    """Chameleon's image token names: IMGIMG + digits spelled A-J + Z (code 10 -> IMGIMGBAZ)."""
    return [
        "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z" for code in range(count)
    ]


@pytest.mark.parametrize("wrapped_in_tokenizer_json", [False, True])
def test_chameleon_vocabulary_map(tmp_path, wrapped_in_tokenizer_json):
    names = chameleon_names(12)
    assert names[10] == "IMGIMGBAZ" and names[3] == "IMGIMGDZ"
    ids = [4 + (code * 5) % 12 for code in range(12)]  # a permutation of 4..15
    vocab = {"<s>": 0, "</s>": 1, "<racm3:break>": 16, "<eoss>": 17, **dict(zip(names, ids))}
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"model": {"vocab": vocab}} if wrapped_in_tokenizer_json else vocab))
    vocabulary = image_vocabulary_from_map(str(path), codes_per_image=3)
    assert (vocabulary.codebook_size, vocabulary.first_id, vocabulary.last_id) == (12, 4, 15)
    assert vocabulary.to_ids(numpy.array([0, 10, 11])).tolist() == [4, 4 + 50 % 12, 4 + 55 % 12]


@pytest.mark.parametrize(
    "content, message",
    [
        ([10, 12], "not one contiguous range"),
        ([], "non-empty list"),
        ({"IMGIMGAZ": 5, "IMGIMGCZ": 6}, "do not name codes 0..1 exactly once"),
        ("just a string", "expected a JSON list or object"),
    ],
)
def test_unusable_vocabulary_maps(tmp_path, content, message):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(content))
    with pytest.raises(CodeError, match=message):
        image_vocabulary_from_map(str(path))
