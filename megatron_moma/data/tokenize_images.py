"""`moma-tokenize-images`: images -> the VQ code files moma-preprocess reads, and codes -> images.

Input (`--input`): a folder (its .png/.jpg/.jpeg/.bmp/.gif/.webp files, recursively, in sorted
order) or a JSON-lines file of {"image": path} records (paths relative to the file's folder; an
optional "codes" names the code file to write, relative to `--output-dir`). Every image is read
as RGB (transparency composited on white) and resized to `--image-size` square pixels.

Output (`--output-dir`, which must not exist or be empty; written whole or not at all): one .npy
(h, w) int32 code grid per image (the folder layout of the input, `.npy` for the image suffix),
`manifest.jsonl` ({"image", "codes"} per image, the order of the input) and `tokenizer.json`
(the backend, its codebook size and grid, the reconstruction error over the images).

Backends:
- the patch codebook (megatron_moma/data/patch_codebook.py): `--codebook FILE`, fitted first on
  the input images with `--fit-codebook` (k-means with `--seed`, saved to FILE so later runs give
  the same codes);
- a VQ tokenizer from a local Hugging Face folder, `--hf-model DIR` (megatron_moma/data/hf_vq.py:
  transformers' Emu3 or Chameleon VQ-VAE).

`--decode` goes the other way: `--input` is a folder of .npy code grids or a JSON-lines file of
{"codes": path} records (a manifest.jsonl), and one PNG per code file is written to
`--output-dir`; where a record also names its "image", the reconstruction error is reported.
"""

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import numpy
from tqdm import tqdm

from megatron_moma.data import patch_codebook

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
BATCH = 256


class InputError(ValueError):
    """Input that cannot be tokenized; the message names the file, line and what was expected."""


@dataclass(frozen=True)
class Item:
    """One image or code file to convert: its path, and the output path relative to the output."""

    source: str
    output: str
    image: Optional[str] = None  # when decoding: the original image, for the error


def read_image(path: str, size: int) -> numpy.ndarray:
    """An image file -> [size, size, 3] uint8 RGB (alpha composited on white, resized)."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGBA")
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read image {path!r}: {error}") from error
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, image).convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return numpy.asarray(image, dtype=numpy.uint8)


def write_png(path: str, pixels: numpy.ndarray) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path)


def list_items(path: str, decode: bool) -> List[Item]:
    """The items of `--input` (module docstring), in order."""
    if os.path.isdir(path):
        suffixes = (".npy",) if decode else IMAGE_SUFFIXES
        found = []
        for folder, _, names in os.walk(path):
            found += [os.path.join(folder, name) for name in names
                      if os.path.splitext(name)[1].lower() in suffixes]
        if not found:
            raise InputError(f"folder {path!r} holds no {'/'.join(suffixes)} files")
        target = ".png" if decode else ".npy"
        return [Item(source, os.path.splitext(os.path.relpath(source, path))[0] + target)
                for source in sorted(found)]
    if not os.path.isfile(path):
        raise InputError(f"--input {path!r} is neither a folder nor a JSON-lines file")
    return list(_items_from_jsonl(path, decode))


def _items_from_jsonl(path: str, decode: bool) -> Iterator[Item]:
    base = os.path.dirname(os.path.abspath(path))
    field = "codes" if decode else "image"
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{path} line {number}: not valid JSON ({error})") from error
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise InputError(f"{path} line {number}: expected an object with a {field!r} path")
            source = os.path.join(base, record[field])
            if decode:
                output = os.path.splitext(record[field])[0] + ".png"
                image = record.get("image")
                yield Item(source, output, os.path.join(base, image) if image else None)
            else:
                output = record.get("codes") or os.path.splitext(record[field])[0] + ".npy"
                yield Item(source, output)


def _batches(items: Sequence[Item]) -> Iterator[Sequence[Item]]:
    for start in range(0, len(items), BATCH):
        yield items[start:start + BATCH]


def build_backend(args: argparse.Namespace, items: Sequence[Item]):
    """The patch codebook (fitted first with --fit-codebook) or the Hugging Face VQ model."""
    if args.hf_model is not None:
        from megatron_moma.data.hf_vq import HuggingFaceVQ

        return HuggingFaceVQ(args.hf_model)
    if args.fit_codebook:
        images = numpy.stack([read_image(item.source, args.image_size)
                              for item in tqdm(items, desc="reading images to fit", unit="image")])
        print(f"fitting {args.codebook_size} codes of {args.patch_size}x{args.patch_size} patches "
              f"(k-means, seed {args.seed}, {args.kmeans_iterations} iterations)", file=sys.stderr)
        codebook = patch_codebook.fit(images, args.codebook_size, args.patch_size, args.seed,
                                      args.kmeans_iterations)
        codebook.save(args.codebook)
        return codebook
    if not os.path.isfile(args.codebook):
        raise InputError(f"codebook {args.codebook!r} not found (fit one with --fit-codebook)")
    return patch_codebook.load(args.codebook)


def describe(backend) -> dict:
    if isinstance(backend, patch_codebook.PatchCodebook):
        return {"backend": "patch_codebook", "codebook_size": backend.codebook_size,
                "patch_size": backend.patch_size, "image_size": backend.image_size,
                "seed": backend.seed}
    return backend.describe()


def encode(backend, items: Sequence[Item], image_size: int, output: str) -> dict:
    """Write every item's code grid under `output`; returns tokenizer.json's contents."""
    squared, values, grid = 0.0, 0, None
    for batch in tqdm(list(_batches(items)), desc="tokenizing", unit="batch"):
        images = numpy.stack([read_image(item.source, image_size) for item in batch])
        codes = backend.encode(images)
        grid = list(codes.shape[1:])
        reconstructed = backend.decode(codes)
        if reconstructed is not None:
            squared += float(((images.astype(numpy.float64) - reconstructed) ** 2).sum())
            values += images.size
        for item, grid_codes in zip(batch, codes):
            path = os.path.join(output, item.output)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            numpy.save(path, grid_codes.astype(numpy.int32))
    with open(os.path.join(output, "manifest.jsonl"), "w", encoding="utf-8") as manifest:
        for item in items:
            manifest.write(json.dumps({"image": os.path.relpath(item.source, output),
                                       "codes": item.output}) + "\n")
    return {**describe(backend), "images": len(items), "grid": grid,
            "reconstruction": _error(squared, values, len(items))}


def _error(squared: float, values: int, images: int) -> Optional[dict]:
    if values == 0:
        return None
    mse = squared / values
    psnr = float("inf") if mse == 0 else float(10.0 * numpy.log10(255.0 ** 2 / mse))
    return {"mse": mse, "psnr_db": psnr, "images": images}


def decode(backend, items: Sequence[Item], output: str) -> dict:
    """Write every item's code grid as a PNG under `output`; returns tokenizer.json's contents."""
    squared, values, compared = 0.0, 0, 0
    for item in tqdm(items, desc="decoding", unit="image"):
        try:
            codes = numpy.load(item.source, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise InputError(f"cannot read code file {item.source!r}: {error}") from error
        pixels = backend.decode(codes[None])
        if pixels is None:
            raise InputError(f"the backend {describe(backend)['backend']} cannot decode codes")
        write_png(os.path.join(output, item.output), pixels[0])
        if item.image is not None:
            original = read_image(item.image, pixels.shape[1])
            squared += float(((original.astype(numpy.float64) - pixels[0]) ** 2).sum())
            values, compared = values + original.size, compared + 1
    return {**describe(backend), "decoded": len(items),
            "reconstruction": _error(squared, values, compared)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moma-tokenize-images", description=__doc__.split("\n")[0],
                                     epilog="See the module docstring of "
                                            "megatron_moma.data.tokenize_images for the formats.")
    parser.add_argument("--input", required=True, help="a folder, or a JSON-lines file")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--decode", action="store_true", help="codes -> PNG images")
    backend = parser.add_mutually_exclusive_group(required=True)
    backend.add_argument("--codebook", help="the patch codebook (.npz)")
    backend.add_argument("--hf-model", help="a local Hugging Face VQ-VAE folder")
    parser.add_argument("--fit-codebook", action="store_true",
                        help="fit the patch codebook on the input images first, save to --codebook")
    parser.add_argument("--codebook-size", type=int, default=512)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=None,
                        help="square side the images are resized to (default: the codebook's, "
                             "32 when fitting, the model's resolution for --hf-model)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--kmeans-iterations", type=int, default=20)
    return parser


def run(args: argparse.Namespace) -> dict:
    """Everything into a temporary folder beside --output-dir, renamed into place at the end."""
    if args.fit_codebook and (args.codebook is None or args.decode):
        raise InputError("--fit-codebook needs --codebook FILE to save to, and no --decode")
    if os.path.exists(args.output_dir) and (not os.path.isdir(args.output_dir)
                                            or os.listdir(args.output_dir)):
        raise InputError(f"--output-dir {args.output_dir!r} exists and is not an empty folder")
    items = list_items(args.input, args.decode)
    backend = build_backend(args, [] if args.decode else items)
    if args.image_size is None:
        args.image_size = 32 if args.fit_codebook else backend.image_size
    if isinstance(backend, patch_codebook.PatchCodebook) and args.image_size != backend.image_size:
        raise InputError(f"--image-size {args.image_size} differs from the codebook's "
                         f"{backend.image_size}")
    output = os.path.abspath(args.output_dir)
    partial = output + ".tmp"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        summary = (decode(backend, items, partial) if args.decode
                   else encode(backend, items, args.image_size, partial))
        with open(os.path.join(partial, "tokenizer.json"), "w", encoding="utf-8") as out:
            json.dump(summary, out, indent=2)
        if os.path.isdir(output):
            os.rmdir(output)
        os.replace(partial, output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import PIL  # noqa: F401
    except ImportError:
        print("error: moma-tokenize-images needs Pillow: pip install 'megatron-moma[data]'",
              file=sys.stderr)
        return 1
    try:
        summary = run(args)
    except (InputError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    error = summary.get("reconstruction")
    error_text = (f"; reconstruction MSE {error['mse']:.1f} (0-255 scale), PSNR "
                  f"{error['psnr_db']:.1f} dB over {error['images']} images" if error else "")
    count = summary.get("images", summary.get("decoded"))
    print(f"wrote {count} {'images' if args.decode else 'code files'} to {args.output_dir}"
          f"{error_text}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
