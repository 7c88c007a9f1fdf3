"""JSON-lines records -> documents of text and image sequences, with precise errors.

A record is a JSON object. Each JSON key (`--json-keys`, default `text`) holds either a string
(plain text, as in Megatron-LM) or a list of segments, in order:
    {"text": "a caption"}                         text
    {"image": [5, 17, 3, ...]}                    inline codes (a flat list or a grid of lists)
    {"image": "codes/0001.npy"}                   a code file (image_codes.py lists the layouts)
    {"image": {"path": "x.npz", "key": "codes", "index": 0}}
Relative code-file paths are relative to the folder of the JSON-lines file.

Each key's value becomes one document of the IndexedDataset for that key, made of sequences
(megatron's multimodal items): a text segment is one text sequence (mode 0; empty text is
dropped), an image is one image sequence (mode 1) holding [begin_of_image, ids..., end_of_image].
The sentinels are text ids inside the image sequence (docs/layers.md §1). With `append_eod` the
end-of-document id ends the last text sequence, or forms a text sequence of its own after a final
image.
"""

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy

from megatron_moma.data.image_codes import (
    CodeError,
    ImageVocabulary,
    codes_from_array,
    load_code_file,
)
from megatron_moma.data.vocabulary import IMAGE, TEXT, VocabularyLayout

SEGMENT_KINDS = ("text", "image")
IMAGE_REFERENCE_FIELDS = ("path", "key", "index")


class BadRecord(ValueError):
    """A record that cannot be encoded: the message names file, line, field and what was expected."""


@dataclass(frozen=True)
class EncodedDocument:
    """One document: tokens [T]; lengths [S] and modes [S] of its sequences (sum(lengths) == T)."""

    tokens: numpy.ndarray
    lengths: List[int]
    modes: List[int]


@dataclass
class RecordEncoder:
    """Encodes one JSON line into one document per JSON key (format in the module docstring)."""

    tokenizer: Any
    layout: VocabularyLayout
    image_vocabulary: Optional[ImageVocabulary]
    json_keys: Tuple[str, ...]
    append_eod: bool
    base_dir: str
    input_name: str

    def encode(self, line_number: int, line: str) -> Tuple[Dict[str, EncodedDocument], int]:
        """Returns each key's document and the bytes read (the line and its code files)."""
        where = f"{self.input_name} line {line_number}"
        record = _parse_object(where, line)
        documents, files_bytes = {}, 0
        for key in self.json_keys:
            if key not in record:
                raise BadRecord(
                    f"{where}: missing field {key!r} (expected a string or a list of segments)"
                )
            field_where = where if len(self.json_keys) == 1 else f"{where}, field {key!r}"
            documents[key], key_bytes = self._encode_field(field_where, key, record[key])
            files_bytes += key_bytes
        return documents, len(line.encode("utf-8")) + files_bytes

    def _encode_field(self, where: str, key: str, value: Any) -> Tuple[EncodedDocument, int]:
        if isinstance(value, str):
            segments = [{"text": value}]
        elif isinstance(value, list):
            segments = value
        else:
            raise BadRecord(
                f"{where}: field {key!r} must be a string or a list of segments, got {_kind(value)}"
            )
        sequences, files_bytes = [], 0
        for number, segment in enumerate(segments, start=1):
            sequence, segment_bytes = self._encode_segment(f"{where}, segment {number}", segment)
            files_bytes += segment_bytes
            if sequence[0].size:
                sequences.append(sequence)
        if not sequences:
            raise BadRecord(
                f"{where}: field {key!r} has no tokens (expected non-empty text or an image)"
            )
        if self.append_eod:
            sequences = _with_eod(sequences, self.layout.eod)
        return _document(sequences), files_bytes

    def _encode_segment(self, where: str, segment: Any) -> Tuple[Tuple[numpy.ndarray, int], int]:
        if not (
            isinstance(segment, dict) and len(segment) == 1 and next(iter(segment)) in SEGMENT_KINDS
        ):
            got = sorted(segment) if isinstance(segment, dict) else _kind(segment)
            raise BadRecord(
                f"{where}: expected an object with exactly one key of {list(SEGMENT_KINDS)}, got {got}"
            )
        kind, value = next(iter(segment.items()))
        where = f"{where} {kind!r}"
        if kind == "text":
            return (self._text_ids(where, value), TEXT), 0
        ids, files_bytes = self._image_ids(where, value)
        return (ids, IMAGE), files_bytes

    def _text_ids(self, where: str, text: Any) -> numpy.ndarray:
        if not isinstance(text, str):
            raise BadRecord(f"{where}: expected a string, got {_kind(text)}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise BadRecord(f"{where}: character {error.start} is a lone UTF-16 surrogate "
                            f"(\\u{ord(text[error.start]):04x}); expected text that is valid "
                            "Unicode") from None
        ids = numpy.asarray(self.tokenizer.tokenize(text), dtype=numpy.int64)
        not_text = self.layout.modality_ids(ids) != TEXT
        if not_text.any():
            raise BadRecord(
                f"{where}: the tokenizer produced id {ids[not_text][0]}, which the vocabulary "
                "layout gives to another modality"
            )
        return ids

    def _image_ids(self, where: str, value: Any) -> Tuple[numpy.ndarray, int]:
        if self.image_vocabulary is None:
            raise BadRecord(
                f"{where}: no image vocabulary configured (pass --codebook-size or --image-vocab-map)"
            )
        try:
            codes, files_bytes, code_file = self._image_codes(value)
        except CodeError as error:
            raise BadRecord(f"{where}: {error}") from None
        try:
            ids = self.image_vocabulary.to_ids(codes)
        except CodeError as error:
            source = "" if code_file is None else f"code file {code_file!r}: "
            raise BadRecord(f"{where}: {source}{error}") from None
        return (
            numpy.concatenate([[self.layout.begin_of_image], ids, [self.layout.end_of_image]]),
            files_bytes,
        )

    def _image_codes(self, value: Any) -> Tuple[numpy.ndarray, int, Optional[str]]:
        """(codes [N], bytes of the code file read, its path or None for inline codes)."""
        if isinstance(value, list):
            return _inline_codes(value), 0, None
        if isinstance(value, str):
            value = {"path": value}
        if not isinstance(value, dict) or not isinstance(value.get("path"), str):
            raise CodeError(
                f"expected a list of codes, a code-file path, or an object with 'path', got {_kind(value)}"
            )
        unknown = sorted(set(value) - set(IMAGE_REFERENCE_FIELDS))
        if unknown:
            raise CodeError(
                f"unknown fields {unknown}; an image reference has {list(IMAGE_REFERENCE_FIELDS)}"
            )
        index = value.get("index")
        if index is not None and (not isinstance(index, int) or isinstance(index, bool)):
            raise CodeError(f"'index' must be an integer, got {_kind(index)}")
        path = os.path.join(self.base_dir, value["path"])
        codes = load_code_file(path, value.get("key"), index)
        return codes, os.path.getsize(path), path


def _inline_codes(value: list) -> numpy.ndarray:
    try:
        array = numpy.asarray(value)
    except (ValueError, OverflowError):
        raise CodeError(
            "inline codes must be a flat list or a rectangular grid of integers"
        ) from None
    return codes_from_array(array)


def _parse_object(where: str, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise BadRecord(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    except RecursionError:
        raise BadRecord(f"{where}: JSON nested too deeply to read (expected a record of text "
                        "and image segments)") from None
    if not isinstance(record, dict):
        raise BadRecord(f"{where}: expected a JSON object, got {_kind(record)}")
    return record


def _with_eod(
    sequences: List[Tuple[numpy.ndarray, int]], eod: int
) -> List[Tuple[numpy.ndarray, int]]:
    last_ids, last_mode = sequences[-1]
    if last_mode == TEXT:
        return sequences[:-1] + [(numpy.append(last_ids, eod), TEXT)]
    return sequences + [(numpy.array([eod], dtype=numpy.int64), TEXT)]


def _document(sequences: List[Tuple[numpy.ndarray, int]]) -> EncodedDocument:
    return EncodedDocument(
        tokens=numpy.concatenate([ids for ids, _ in sequences]).astype(numpy.int64),
        lengths=[int(ids.size) for ids, _ in sequences],
        modes=[mode for _, mode in sequences],
    )


def _kind(value: Any) -> str:
    """A JSON value's type in JSON's words, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
