"""The real mixed-modal corpus of `moma-sample-data --corpus real`, from package-registry files.

Images: the 64x64 PNG emoji (skin-tone variants included) of two vendors of the npm packages
`emoji-datasource-google` (Noto Emoji, Apache-2.0) and `emoji-datasource-twitter` (Twemoji,
CC-BY-4.0), composited on white and resized to `image_size` (32) square pixels. Captions: the
English label and tags of each emoji from `emojibase-data` (MIT), in a template naming the vendor,
caption then image (generation) or image then caption (captioning), drawn at random per image.
Plain-text documents, interleaved at random among the pairs: the glosses of Debian's
`wordnet-base` (WordNet 3.0 licence) in runs of consecutive synsets, and the quotations of
`fortunes-min` (BSD), up to `text_bytes` bytes of UTF-8.

The images are tokenized with a patch codebook fitted on them (moma-tokenize-images
--fit-codebook: 512 codes of 4x4 patches, an 8x8 grid per image by default). Output, in a folder
built whole beside `--output-dir` and renamed into place:

  real.jsonl         records in moma-preprocess's format: {"id", "source", "direction", "text"}
  images/{vendor}/   the resized PNGs;  images.jsonl  {"image", "codes"} per image
  codes/{vendor}/    one (8, 8) .npy code grid per image, and codes/tokenizer.json
  codebook.npz       the fitted codebook (decode codes back with moma-tokenize-images --decode)
  SOURCES.md         every package, its version and licence;  licenses/  their licence files
"""

import json
import os
import shutil
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy
from tqdm import tqdm

from megatron_moma.data import registry_sources, tokenize_images

EMOJI_VENDORS = {
    "google": ("emoji-datasource-google", "16.0.0",
               "Apache-2.0 (Noto Emoji images; the package's code and metadata: MIT)"),
    "twitter": ("emoji-datasource-twitter", "16.0.0",
                "CC-BY-4.0 (Twemoji graphics by Twitter, Inc. and other contributors; "
                "the package's code and metadata: MIT)"),
}
VENDOR_NAMES = {"google": "Google", "twitter": "Twitter"}
EMOJIBASE = ("emojibase-data", "17.0.0", "MIT")
WORDNET = ("wordnet-base", "WordNet 3.0 licence (Princeton University; permissive, the notice "
                           "kept in licenses/wordnet-base.txt)")
FORTUNES = ("fortunes-min", "BSD (The Regents of the University of California; see "
                            "licenses/fortunes-min.txt)")
FORTUNE_FILES = ("fortunes", "literature", "riddles")
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
GLOSSES_PER_DOCUMENT = (4, 16)

CAPTION_BEFORE_IMAGE = (
    "an emoji of {label}:",
    "{vendor} emoji: {label}.",
    "draw the {label} emoji.",
    "a small picture of {label} ({tags}):",
    "here is the {vendor} {label} emoji:",
)
CAPTION_AFTER_IMAGE = (
    "this is the emoji {label}.",
    "the {vendor} emoji for {label}.",
    "that picture shows {label}; tags: {tags}.",
    "{label}, drawn by {vendor}.",
)


class SourceError(ValueError):
    """A source file that cannot be parsed; the message names the file and what was expected."""


@dataclass(frozen=True)
class Emoji:
    """One emoji image of one vendor: its code points (upper-case hex, no FE0F), image, label."""

    vendor: str
    hexcode: str
    image: str
    label: str
    tags: Tuple[str, ...]


@dataclass(frozen=True)
class Sources:
    """The unpacked packages' root folders, by package name."""

    roots: Dict[str, str]
    versions: Dict[str, str]


def fetch_sources(cache: str, vendors=tuple(EMOJI_VENDORS)) -> Sources:
    """Every package the corpus needs, fetched into `cache` (registry_sources.py)."""
    wanted = [("npm", *EMOJI_VENDORS[vendor][:2]) for vendor in vendors]
    wanted += [("npm", *EMOJIBASE[:2]), ("deb", WORDNET[0], None), ("deb", FORTUNES[0], None)]
    roots, versions = {}, {}
    for registry, name, version in tqdm(wanted, desc="fetching sources", unit="package"):
        package = (registry_sources.npm_package(cache, name, version) if registry == "npm"
                   else registry_sources.debian_package(cache, name))
        roots[name], versions[name] = package.root, package.version
    return Sources(roots, versions)


def _key(hexcode: str) -> str:
    """emoji-datasource's and emojibase's spellings of a sequence, made comparable."""
    return "-".join(part for part in hexcode.upper().split("-") if part != "FE0F")


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as source:
            return json.load(source)
    except (OSError, json.JSONDecodeError) as error:
        raise SourceError(f"cannot read {path!r} as JSON: {error}") from error


def emoji_labels(emojibase_root: str) -> Dict[str, Tuple[str, Tuple[str, ...]]]:
    """emojibase-data's en/data.json -> {key: (label, tags)}, skin-tone variants included
    (they take their base emoji's tags)."""
    path = os.path.join(emojibase_root, "en", "data.json")
    entries = _load_json(path)
    if not isinstance(entries, list):
        raise SourceError(f"{path}: expected a JSON list of emoji")
    labels = {}
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"hexcode", "label"} <= entry.keys():
            raise SourceError(f"{path}: entry {number} has no hexcode and label")
        tags = tuple(entry.get("tags", ()))
        labels[_key(entry["hexcode"])] = (entry["label"], tags)
        for skin in entry.get("skins", ()):
            labels[_key(skin["hexcode"])] = (skin["label"], tags)
    return labels


def vendor_emoji(datasource_root: str, vendor: str,
                 labels: Dict[str, Tuple[str, Tuple[str, ...]]]) -> List[Emoji]:
    """The emoji of one emoji-datasource package with a 64x64 image and an emojibase label."""
    path = os.path.join(datasource_root, "emoji.json")
    entries = _load_json(path)
    folder = os.path.join(datasource_root, "img", vendor, "64")
    found = []
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or "unified" not in entry or "image" not in entry:
            raise SourceError(f"{path}: entry {number} has no unified code points and image")
        variants = [entry] + list((entry.get("skin_variations") or {}).values())
        for variant in variants:
            image = os.path.join(folder, variant["image"])
            label = labels.get(_key(variant["unified"]))
            if variant.get(f"has_img_{vendor}") and label is not None and os.path.isfile(image):
                found.append(Emoji(vendor, _key(variant["unified"]), image, *label))
    return found


def wordnet_glosses(wordnet_root: str) -> Iterator[str]:
    """'lemma, lemma: gloss' for every synset of WordNet's data.{noun,verb,adj,adv}, in order."""
    for name in WORDNET_FILES:
        path = os.path.join(wordnet_root, "usr", "share", "wordnet", name)
        if not os.path.isfile(path):
            raise SourceError(f"{path} not found: is this an unpacked wordnet-base package?")
        with open(path, encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, start=1):
                if line.startswith("  "):  # the licence header
                    continue
                fields, _, gloss = line.partition(" | ")
                parts = fields.split(" ")
                if not gloss or len(parts) < 6:
                    raise SourceError(f"{path} line {number}: expected 'offset lex ss_type "
                                      f"w_cnt word lex_id ... | gloss'")
                count = int(parts[3], 16)
                lemmas = [parts[4 + 2 * i].replace("_", " ") for i in range(count)]
                yield f"{', '.join(lemmas)}: {gloss.strip()}"


def fortunes(fortunes_root: str) -> Iterator[str]:
    """The quotations of fortunes-min's files (separated by lines holding '%')."""
    for name in FORTUNE_FILES:
        path = os.path.join(fortunes_root, "usr", "share", "games", "fortunes", name)
        if not os.path.isfile(path):
            raise SourceError(f"{path} not found: is this an unpacked fortunes-min package?")
        with open(path, encoding="utf-8", errors="replace") as source:
            for quotation in source.read().split("\n%\n"):
                quotation = quotation.strip("%\n")
                if quotation.strip():
                    yield quotation


def text_documents(sources: Sources, text_bytes: int, rng: numpy.random.Generator) -> List[str]:
    """Plain-text documents up to `text_bytes` UTF-8 bytes: every fortune, then runs of 4-16
    consecutive WordNet glosses starting at random places (no gloss twice)."""
    documents = list(fortunes(sources.roots[FORTUNES[0]]))
    glosses = list(wordnet_glosses(sources.roots[WORDNET[0]]))
    runs, start = [], 0
    while start < len(glosses):
        length = int(rng.integers(*GLOSSES_PER_DOCUMENT, endpoint=True))
        runs.append("\n".join(glosses[start:start + length]))
        start += length
    documents += [runs[i] for i in rng.permutation(len(runs))]
    chosen, total = [], 0
    for document in documents:
        size = len(document.encode("utf-8"))
        if total + size > text_bytes:
            break
        chosen.append(document)
        total += size
    return chosen


def caption(rng: numpy.random.Generator, emoji: Emoji, caption_first: bool) -> str:
    templates = CAPTION_BEFORE_IMAGE if caption_first else CAPTION_AFTER_IMAGE
    template = templates[rng.integers(len(templates))]
    tags = [tag for tag in emoji.tags if tag not in emoji.label.split()] or [emoji.label]
    picked = [tags[i] for i in sorted(rng.choice(len(tags), min(3, len(tags)), replace=False))]
    return template.format(label=emoji.label, vendor=VENDOR_NAMES[emoji.vendor],
                           tags=", ".join(picked))


def write_images(emoji: List[Emoji], folder: str, image_size: int) -> List[dict]:
    """Resized RGB PNGs under `folder`/images; returns images.jsonl's records."""
    records = []
    for item in tqdm(emoji, desc="resizing images", unit="image"):
        name = f"{item.vendor}/{item.hexcode.lower()}"
        tokenize_images.write_png(os.path.join(folder, "images", name + ".png"),
                                  tokenize_images.read_image(item.image, image_size))
        records.append({"image": f"images/{name}.png", "codes": f"{name}.npy"})
    return records


def write_sources(sources: Sources, folder: str, counts: Dict[str, int]) -> None:
    """SOURCES.md and licenses/: every package, its version, licence and use."""
    os.makedirs(os.path.join(folder, "licenses"))
    licences = {package: licence for package, _, licence in EMOJI_VENDORS.values()}
    licences[EMOJIBASE[0]] = EMOJIBASE[2]
    licences[WORDNET[0]], licences[FORTUNES[0]] = WORDNET[1], FORTUNES[1]
    uses = {EMOJI_VENDORS[vendor][0]: f"{counts.get(vendor, 0)} emoji images (64x64 PNG)"
            for vendor in EMOJI_VENDORS}
    uses[EMOJIBASE[0]] = "English labels and tags of the emoji (captions)"
    uses[WORDNET[0]] = "synset glosses (plain-text documents)"
    uses[FORTUNES[0]] = "quotations (plain-text documents)"
    lines = ["# Sources of this corpus", "",
             "Built by `moma-sample-data --corpus real` from package-registry downloads only.",
             "", "| package | registry | version | licence | used for |", "|---|---|---|---|---|"]
    for name, root in sources.roots.items():
        registry = "npm" if root.endswith(os.sep + "package") else "Debian"
        lines.append(f"| {name} | {registry} | {sources.versions[name]} | {licences[name]} | "
                     f"{uses[name]} |")
        licence_file = (os.path.join(root, "LICENSE") if registry == "npm"
                        else os.path.join(root, "usr", "share", "doc", name, "copyright"))
        if os.path.isfile(licence_file):
            shutil.copyfile(licence_file, os.path.join(folder, "licenses", f"{name}.txt"))
    lines += ["", "Twemoji graphics: Copyright 2019 Twitter, Inc and other contributors, "
                  "licensed under CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/).",
              "Noto Emoji images: Copyright Google Inc., licensed under the Apache License 2.0."]
    with open(os.path.join(folder, "SOURCES.md"), "w", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")


def build(sources: Sources, output_dir: str, seed: int, text_bytes: int, image_size: int = 32,
          codebook_size: int = 512, patch_size: int = 4, max_images: Optional[int] = None) -> dict:
    """The whole corpus (module docstring) into `output_dir` (absent or empty), all or nothing.
    Returns a summary: counts of pairs, text documents, bytes and the codebook's error."""
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise SourceError(f"--output-dir {output_dir!r} exists and is not an empty folder")
    rng = numpy.random.default_rng(seed)
    labels = emoji_labels(sources.roots[EMOJIBASE[0]])
    emoji = [item for vendor, (package, _, _) in EMOJI_VENDORS.items() if package in sources.roots
             for item in vendor_emoji(sources.roots[package], vendor, labels)]
    if max_images is not None:
        emoji = [emoji[i] for i in sorted(rng.permutation(len(emoji))[:max_images])]
    if not emoji:
        raise SourceError("the emoji packages hold no labelled images")
    partial = os.path.abspath(output_dir) + ".tmp"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        image_records = write_images(emoji, partial, image_size)
        with open(os.path.join(partial, "images.jsonl"), "w", encoding="utf-8") as out:
            out.writelines(json.dumps(record) + "\n" for record in image_records)
        tokenized = tokenize_images.main([
            "--input", os.path.join(partial, "images.jsonl"),
            "--output-dir", os.path.join(partial, "codes"), "--fit-codebook",
            "--codebook", os.path.join(partial, "codebook.npz"),
            "--codebook-size", str(codebook_size), "--patch-size", str(patch_size),
            "--image-size", str(image_size), "--seed", str(seed)])
        if tokenized != 0:
            raise SourceError("tokenizing the images failed (moma-tokenize-images above)")
        records = []
        for item, image_record in zip(emoji, image_records):
            caption_first = bool(rng.integers(2))
            image = {"image": "codes/" + image_record["codes"]}
            text = {"text": caption(rng, item, caption_first)}
            records.append({"source": item.vendor, "label": item.label,
                            "direction": "caption-image" if caption_first else "image-caption",
                            "text": [text, image] if caption_first else [image, text]})
        documents = text_documents(sources, text_bytes, rng)
        records += [{"source": "text", "direction": "text", "text": document}
                    for document in documents]
        order = rng.permutation(len(records))
        with open(os.path.join(partial, "real.jsonl"), "w", encoding="utf-8") as out:
            for number, index in enumerate(order):
                out.write(json.dumps({"id": number, **records[index]}) + "\n")
        counts = {vendor: sum(item.vendor == vendor for item in emoji) for vendor in EMOJI_VENDORS}
        write_sources(sources, partial, counts)
        with open(os.path.join(partial, "codes", "tokenizer.json"), encoding="utf-8") as summary:
            reconstruction = json.load(summary)["reconstruction"]
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)
        os.replace(partial, output_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return {"pairs": len(emoji), "per_vendor": counts, "text_documents": len(documents),
            "text_bytes": sum(len(d.encode("utf-8")) for d in documents),
            "reconstruction": reconstruction}
