"""`moma-preprocess`: JSON lines of text and image codes -> megatron indexed datasets.

Flags follow Megatron-LM's tools/preprocess_data.py (`--input`, `--output-prefix`, `--json-keys`,
`--workers`, `--partitions`, `--append-eod`, `--log-interval`, `--tokenizer-type`,
`--tokenizer-model`, `--vocab-size`); the image flags are ours. The record format is in
records.py, the code-file layouts in image_codes.py, the output files in dataset_writer.py.

The vocabulary is laid out as: the text tokenizer's ids [0, V); the begin/end-of-image sentinels
(the tokenizer's own, the ids given, or V and V+1 appended); the image codes, by
`--image-code-offset` (default: the first id after those) or by `--image-vocab-map`. Token ids
are stored as uint16 when the vocabulary has fewer than 65,500 ids, else int32.

`--workers` processes encode records in order (the output does not depend on the worker count);
`--partitions` splits the input into that many contiguous parts, each written to its own
temporary dataset and merged in order at the end, as Megatron-LM's tool does (here one worker pool
serves all parts in turn). A bad record stops the run with a message naming the file, line and
field (exit status 1) unless `--skip-bad` is given, which lists rejected records with their
reasons in `{output_prefix}_rejected.jsonl`.
"""

import argparse
import contextlib
import multiprocessing
import os
import sys
import time
from typing import Iterator, List, Optional, Tuple

from megatron.core.datasets.indexed_dataset import DType
from tqdm import tqdm

from megatron_moma.command_line import (
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    ArgumentError,
    CommandLineParser,
    report_argument_error,
)
from megatron_moma.data.dataset_writer import MixedModalDatasetWriter
from megatron_moma.data.image_codes import (
    CodeError,
    ImageVocabulary,
    image_vocabulary_from_map,
    image_vocabulary_from_offset,
)
from megatron_moma.data.records import BadRecord, RecordEncoder
from megatron_moma.data.tokenizers import BYTE_LEVEL, TOKENIZER_TYPES, build_tokenizer
from megatron_moma.data.vocabulary import VocabularyLayout
from megatron_moma.modality.layout import Modality

ENCODE_CHUNK_SIZE = 16


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="moma-preprocess", description=__doc__.split("\n")[0],
                               allow_abbrev=False)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="JSON-lines file of records")
    group.add_argument(
        "--json-keys", nargs="+", default=["text"], help="record fields to write, one dataset each"
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=BYTE_LEVEL)
    group.add_argument("--tokenizer-model", help="local folder of a Hugging Face tokenizer")
    group.add_argument(
        "--vocab-size", type=POSITIVE_INT, help="total vocabulary size (padded); default: the largest id + 1"
    )
    group = parser.add_argument_group("image codes")
    group.add_argument(
        "--codebook-size", type=POSITIVE_INT, help="number of VQ codes, e.g. 8192 for Chameleon"
    )
    group.add_argument("--image-code-offset", type=NON_NEGATIVE_INT, help="vocabulary id of code 0")
    group.add_argument(
        "--image-vocab-map", help="JSON code -> id map (a list, or Chameleon's IMGIMG names)"
    )
    group.add_argument(
        "--codes-per-image", type=POSITIVE_INT, help="exact number of codes every image must have"
    )
    group.add_argument("--begin-of-image-id", type=NON_NEGATIVE_INT)
    group.add_argument("--end-of-image-id", type=NON_NEGATIVE_INT)
    group = parser.add_argument_group("output data")
    group.add_argument(
        "--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx/.vocab.json"
    )
    group.add_argument(
        "--append-eod", action="store_true", help="end every document with the end-of-document id"
    )
    group.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip bad records, listing them in {prefix}_rejected.jsonl",
    )
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=POSITIVE_INT, default=1, help="encoding processes")
    group.add_argument(
        "--partitions", type=POSITIVE_INT, default=1, help="contiguous input parts, merged at the end"
    )
    group.add_argument(
        "--log-interval", type=POSITIVE_INT, default=1000, help="documents between progress lines"
    )
    return parser


def build_vocabulary(
    tokenizer, args: argparse.Namespace
) -> Tuple[VocabularyLayout, Optional[ImageVocabulary]]:
    """The vocabulary layout (module docstring) and the image-code mapping, from the flags."""
    next_free = tokenizer.vocab_size
    has_images = args.codebook_size is not None or args.image_vocab_map is not None
    sentinels = {}
    for name, flag in (
        ("begin_of_image", args.begin_of_image_id),
        ("end_of_image", args.end_of_image_id),
    ):
        sentinels[name] = flag if flag is not None else getattr(tokenizer, name)
        if sentinels[name] is None and has_images:
            sentinels[name], next_free = next_free, next_free + 1
    image_vocabulary = _image_vocabulary(tokenizer, args, next_free)
    ranges = (
        ()
        if image_vocabulary is None
        else (Modality("image", image_vocabulary.first_id, image_vocabulary.last_id),)
    )
    largest = max(
        [
            tokenizer.vocab_size - 1,
            *(r.last_id for r in ranges),
            *(i for i in sentinels.values() if i is not None),
        ]
    )
    if args.vocab_size is not None and args.vocab_size <= largest:
        raise ValueError(
            f"--vocab-size {args.vocab_size} is too small: the layout uses ids up to {largest}"
        )
    vocab_size = args.vocab_size if args.vocab_size is not None else largest + 1
    layout = VocabularyLayout(vocab_size, ranges, tokenizer.eod, tokenizer.pad, **sentinels)
    return layout, image_vocabulary


def _image_vocabulary(
    tokenizer, args: argparse.Namespace, next_free: int
) -> Optional[ImageVocabulary]:
    if args.image_vocab_map is not None:
        if args.image_code_offset is not None:
            raise ValueError("give --image-code-offset or --image-vocab-map, not both")
        if not os.path.isfile(args.image_vocab_map):
            raise ValueError(f"--image-vocab-map {args.image_vocab_map}: no such file")
        image_vocabulary = image_vocabulary_from_map(args.image_vocab_map, args.codes_per_image)
        if args.codebook_size not in (None, image_vocabulary.codebook_size):
            raise ValueError(
                f"--codebook-size {args.codebook_size} disagrees with the "
                f"{image_vocabulary.codebook_size} codes of --image-vocab-map"
            )
        return image_vocabulary
    if args.codebook_size is None:
        if args.image_code_offset is not None or args.codes_per_image is not None:
            raise ValueError("image flags need --codebook-size (or --image-vocab-map)")
        return None
    offset = args.image_code_offset if args.image_code_offset is not None else next_free
    if offset < tokenizer.vocab_size:
        raise ValueError(
            f"--image-code-offset {offset} overlaps the text tokenizer's ids [0, {tokenizer.vocab_size})"
        )
    return image_vocabulary_from_offset(args.codebook_size, offset, args.codes_per_image)


_worker_encoder: Optional[RecordEncoder] = None


def _set_worker_encoder(encoder: RecordEncoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _encode_line(numbered_line: Tuple[int, bytes]) -> Tuple[bool, object, int]:
    """(line number, raw line) -> (ok, documents or a rejection, bytes read).

    A rejection is {"line", "reason", "record"}: what `--skip-bad` lists.
    """
    line_number, raw = numbered_line
    where = f"{_worker_encoder.input_name} line {line_number}"
    try:
        documents, bytes_read = _worker_encoder.encode(line_number, raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        reason = f"{where}: not valid UTF-8 ({error.reason} at byte {error.start})"
    except BadRecord as error:
        reason = str(error)
    except Exception as error:  # whatever else a record triggers is still named by file and line
        reason = f"{where}: cannot encode the record ({type(error).__name__}: {error})"
    else:
        return True, documents, bytes_read
    record = raw.decode("utf-8", errors="replace").rstrip("\n")
    return False, {"line": line_number, "reason": reason, "record": record}, len(raw)


def _numbered_lines(path: str) -> Iterator[Tuple[int, bytes]]:
    """Non-blank lines of `path` with their 1-based line numbers."""
    with open(path, "rb") as lines:
        for line_number, raw in enumerate(lines, start=1):
            if raw.strip():
                yield line_number, raw


def _partition_starts(records: int, partitions: int) -> List[int]:
    """Index of the first record of each of `partitions` contiguous parts of `records` records."""
    partitions = max(1, min(partitions, records))
    return [records * i // partitions for i in range(partitions)]


class _Throughput:
    """Progress bar and Megatron-style 'Processed N documents (docs/s, MB/s)' log lines."""

    def __init__(self, total: int, log_interval: int):
        self.start = time.monotonic()
        self.documents = 0
        self.bytes = 0
        self.log_interval = log_interval
        self.bar = tqdm(total=total, unit="doc", file=sys.stderr, disable=None)

    def update(self, bytes_read: int) -> None:
        self.documents += 1
        self.bytes += bytes_read
        self.bar.update(1)
        if self.documents % self.log_interval == 0:
            self.bar.write(f"Processed {self.summary()}.", file=sys.stderr)

    def summary(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        return (
            f"{self.documents} documents ({self.documents / elapsed:.1f} docs/s, "
            f"{self.bytes / elapsed / 1024 / 1024:.2f} MB/s)"
        )

    def close(self) -> None:
        self.bar.close()


def _encoded_lines(
    encoder: RecordEncoder, path: str, workers: int
) -> Iterator[Tuple[bool, object, int]]:
    _set_worker_encoder(encoder)
    if workers == 1:
        yield from map(_encode_line, _numbered_lines(path))
        return
    with multiprocessing.get_context("fork").Pool(workers, _set_worker_encoder, (encoder,)) as pool:
        yield from pool.imap(_encode_line, _numbered_lines(path), chunksize=ENCODE_CHUNK_SIZE)


def preprocess(args: argparse.Namespace, encoder: RecordEncoder, source: dict) -> List[str]:
    """Encode every record and publish the datasets; raises BadRecord on the first bad record
    (unless --skip-bad). Returns the paths written."""
    records = sum(1 for _ in _numbered_lines(args.input))
    starts = set(_partition_starts(records, args.partitions))
    dtype = DType.optimal_dtype(encoder.layout.vocab_size)
    rejected = [] if args.skip_bad else None
    progress = _Throughput(total=records, log_interval=args.log_interval)
    with MixedModalDatasetWriter(args.output_prefix, encoder.json_keys, dtype) as writer:
        with contextlib.closing(_encoded_lines(encoder, args.input, args.workers)) as encoded:
            for record, (ok, result, bytes_read) in enumerate(encoded):
                if record in starts:
                    writer.start_partition()
                progress.update(bytes_read)
                if ok:
                    writer.add(result)
                elif rejected is not None:
                    rejected.append(result)
                else:
                    raise BadRecord(result["reason"])
        progress.close()
        if writer.documents == 0:
            raise BadRecord(f"{args.input}: no records to write ({len(rejected or [])} rejected)")
        written = writer.commit(encoder.layout, source, rejected)
    print(
        f"Done: {progress.summary()}; {writer.documents} written, {len(rejected or [])} rejected.",
        file=sys.stderr,
    )
    return written


def _source(
    args: argparse.Namespace, tokenizer, image_vocabulary: Optional[ImageVocabulary]
) -> dict:
    """How the data was made, for the sidecar (nothing that varies between identical runs)."""
    return {
        "input": args.input,
        "tokenizer": tokenizer.describe(),
        "append_eod": args.append_eod,
        "image_codes": (
            None
            if image_vocabulary is None
            else {
                "codebook_size": image_vocabulary.codebook_size,
                "first_id": image_vocabulary.first_id,
                "vocab_map": args.image_vocab_map,
                "codes_per_image": image_vocabulary.codes_per_image,
            }
        ),
    }


def _check_paths(args: argparse.Namespace) -> None:
    if not os.path.isfile(args.input):
        raise ArgumentError(f"--input {args.input!r} is not a file")
    if not os.access(args.input, os.R_OK):
        raise ArgumentError(f"--input {args.input!r} cannot be read by this user")
    folder = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(folder):
        raise ArgumentError(f"the folder of --output-prefix {args.output_prefix!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ArgumentError(f"the folder of --output-prefix {args.output_prefix!r} cannot be "
                            "written by this user")


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _check_paths(args)
        try:
            tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
            layout, image_vocabulary = build_vocabulary(tokenizer, args)
        except (ValueError, CodeError, OSError, ImportError) as error:
            raise ArgumentError(str(error)) from error
    except ArgumentError as error:
        return report_argument_error("moma-preprocess", error)
    encoder = RecordEncoder(
        tokenizer,
        layout,
        image_vocabulary,
        tuple(args.json_keys),
        args.append_eod,
        base_dir=os.path.dirname(os.path.abspath(args.input)),
        input_name=args.input,
    )
    try:
        written = preprocess(args, encoder, _source(args, tokenizer, image_vocabulary))
    except BadRecord as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # reading --input or writing beside --output-prefix
        print(f"error: {error.filename or args.output_prefix}: {error.strerror or error} (--input "
              f"{args.input}, --output-prefix {args.output_prefix}); nothing was written",
              file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
