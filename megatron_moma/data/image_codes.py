"""Image VQ codes: reading them from the files image tokenizers write, and mapping them to ids.

Accepted code files (one image per file unless `index` picks one of several):
- `.npy`: an integer array. LlamaGen writes one (1, N) array per image; (N,) and (h, w) grids
  work too.
- `.npz`: an integer array under `key` (default: the archive's only array).
- `.pt` / `.pth` (loaded with `weights_only=True`): an integer tensor, or a dict holding one under
  `key` (default `images`, then `codes`). Emu3 writes {"images": (h, w) or (1, h, w) grid,
  "texts": ...}; only the grid is read. Emu3's own end-of-row and size-prefix tokens are not
  inserted: the grid is flattened like every other layout, and `--codes-per-image` fixes h * w.

Every array is one image read in row-major order after `index` (when given) selects entry `index`
along its first axis: (1, N), (N,), (h, w) and (1, h, w) all give the image's codes in order.

Codes become vocabulary ids either by an offset (id = offset + code) or through a vocabulary map:
a JSON list whose entry i is the id of code i, or Chameleon's name -> id vocabulary (a dict, or a
tokenizer.json holding one under model.vocab) whose `IMGIMG...` entries name the codes (letters A-J
spell the code's decimal digits). Either way the ids form one contiguous range (docs/layers.md §1).
"""

import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy
import torch

CODE_FILE_SUFFIXES = (".npy", ".npz", ".pt", ".pth")
PTH_DEFAULT_KEYS = ("images", "codes")
CHAMELEON_IMAGE_PREFIX = "IMGIMG"
_CHAMELEON_DIGITS = {chr(ord("A") + digit): str(digit) for digit in range(10)}


class CodeError(ValueError):
    """Image codes that cannot be used; the message says what was expected."""


def codes_from_array(array: Any, index: Optional[int] = None) -> numpy.ndarray:
    """One image's codes from an array-like: [...] integers -> [N] int64, row-major.

    `index` selects entry `index` along the first axis first (one image of several).
    """
    array = numpy.asarray(array)
    if index is not None:
        if array.ndim == 0 or not 0 <= index < array.shape[0]:
            raise CodeError(f"index {index} is outside the first axis of shape {array.shape}")
        array = array[index]
    if array.size == 0:
        raise CodeError(f"no codes (shape {array.shape})")
    if array.dtype.kind not in "iu":
        raise CodeError(f"codes must be integers, got {_describe_dtype(array)}")
    return array.astype(numpy.int64).reshape(-1)


def _describe_dtype(array: numpy.ndarray) -> str:
    return "non-numeric values" if array.dtype.kind in "OUS" else f"dtype {array.dtype}"


def load_code_file(
    path: str, key: Optional[str] = None, index: Optional[int] = None
) -> numpy.ndarray:
    """One image's codes from a code file (layouts in the module docstring): [N] int64."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in CODE_FILE_SUFFIXES:
        raise CodeError(
            f"code file {path!r} has suffix {suffix!r}; expected one of {CODE_FILE_SUFFIXES}"
        )
    if not os.path.isfile(path):
        raise CodeError(f"code file {path!r} not found")
    try:
        array = _read_array(path, suffix, key)
    except CodeError:
        raise
    except Exception as error:  # numpy/torch/zip raise many types for a damaged file
        raise CodeError(
            f"cannot read code file {path!r}: {type(error).__name__}: {error}"
        ) from error
    try:
        return codes_from_array(array, index)
    except CodeError as error:
        raise CodeError(f"code file {path!r}: {error}") from None


def _read_array(path: str, suffix: str, key: Optional[str]) -> Any:
    if suffix == ".npy":
        return numpy.load(path, allow_pickle=False)
    if suffix == ".npz":
        with numpy.load(path, allow_pickle=False) as archive:
            return archive[_pick_key(path, list(archive.keys()), key, ())]
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict):
        loaded = loaded[_pick_key(path, list(loaded.keys()), key, PTH_DEFAULT_KEYS)]
    if isinstance(loaded, torch.Tensor):
        return loaded.numpy()
    raise CodeError(
        f"code file {path!r} holds {type(loaded).__name__}; expected a tensor or a dict of tensors"
    )


def _pick_key(path: str, keys: list, key: Optional[str], defaults: Tuple[str, ...]) -> str:
    if key is not None:
        if key not in keys:
            raise CodeError(
                f"code file {path!r} has no key {key!r}; it has {sorted(map(str, keys))}"
            )
        return key
    for default in defaults:
        if default in keys:
            return default
    if len(keys) == 1:
        return keys[0]
    raise CodeError(
        f"code file {path!r} holds keys {sorted(map(str, keys))}; give 'key' to pick one"
    )


@dataclass(frozen=True)
class ImageVocabulary:
    """How the codes of a codebook of `codebook_size` become ids of the model's vocabulary.

    `code_to_id` is None for an offset mapping (id = first_id + code); otherwise [codebook_size]
    ids, a permutation of [first_id, first_id + codebook_size). `codes_per_image` (optional)
    is the exact number of codes every image must have.
    """

    codebook_size: int
    first_id: int
    code_to_id: Optional[numpy.ndarray] = None
    codes_per_image: Optional[int] = None

    @property
    def last_id(self) -> int:
        return self.first_id + self.codebook_size - 1

    def to_ids(self, codes: numpy.ndarray) -> numpy.ndarray:
        """[N] codes -> [N] vocabulary ids, after checking the count and the codebook range."""
        if self.codes_per_image is not None and codes.size != self.codes_per_image:
            raise CodeError(
                f"{codes.size} codes, expected {self.codes_per_image} per image (--codes-per-image)"
            )
        outside = (codes < 0) | (codes >= self.codebook_size)
        if outside.any():
            raise CodeError(
                f"code {codes[outside][0]} is outside the codebook [0, {self.codebook_size})"
            )
        if self.code_to_id is None:
            return codes + self.first_id
        return self.code_to_id[codes]


def image_vocabulary_from_offset(
    codebook_size: int, offset: int, codes_per_image: Optional[int] = None
) -> ImageVocabulary:
    """Codes 0..codebook_size-1 become ids offset..offset+codebook_size-1."""
    return ImageVocabulary(codebook_size, offset, None, codes_per_image)


def image_vocabulary_from_map(path: str, codes_per_image: Optional[int] = None) -> ImageVocabulary:
    """Read a vocabulary map (module docstring); raises CodeError naming the file if unusable."""
    with open(path, encoding="utf-8") as map_file:
        try:
            loaded = json.load(map_file)
        except json.JSONDecodeError as error:
            raise CodeError(f"vocabulary map {path!r} is not valid JSON: {error}") from error
    code_to_id = numpy.asarray(_code_to_id_list(path, loaded), dtype=numpy.int64)
    first_id = int(code_to_id.min())
    if not numpy.array_equal(
        numpy.sort(code_to_id), numpy.arange(first_id, first_id + code_to_id.size)
    ):
        raise CodeError(
            f"vocabulary map {path!r}: the ids of its {code_to_id.size} codes are not one "
            "contiguous range (each modality must own a contiguous id range)"
        )
    return ImageVocabulary(int(code_to_id.size), first_id, code_to_id, codes_per_image)


def _code_to_id_list(path: str, loaded: Any) -> list:
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"].get("vocab", {})
    if isinstance(loaded, list):
        code_to_id = loaded
    elif isinstance(loaded, dict):
        code_to_id = _chameleon_code_to_id(path, loaded)
    else:
        raise CodeError(
            f"vocabulary map {path!r}: expected a JSON list or object, got {type(loaded).__name__}"
        )
    if not code_to_id or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in code_to_id
    ):
        raise CodeError(
            f"vocabulary map {path!r}: expected a non-empty list of non-negative integer ids"
        )
    return code_to_id


def _chameleon_code_to_id(path: str, name_to_id: dict) -> list:
    """Chameleon names an image code IMGIMG + its digits spelled A-J + one closing letter."""
    id_of_code = {}
    for name, token_id in name_to_id.items():
        if not name.startswith(CHAMELEON_IMAGE_PREFIX):
            continue
        digits = "".join(
            _CHAMELEON_DIGITS.get(c, c) for c in name[len(CHAMELEON_IMAGE_PREFIX) : -1]
        )
        if not digits.isdigit():
            raise CodeError(f"vocabulary map {path!r}: cannot read a code number from {name!r}")
        id_of_code[int(digits)] = token_id
    if sorted(id_of_code) != list(range(len(id_of_code))):
        raise CodeError(
            f"vocabulary map {path!r}: its {len(id_of_code)} {CHAMELEON_IMAGE_PREFIX} entries do "
            f"not name codes 0..{len(id_of_code) - 1} exactly once"
        )
    return [id_of_code[code] for code in range(len(id_of_code))]
