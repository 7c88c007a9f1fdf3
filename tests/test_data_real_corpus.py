"""moma-sample-data --corpus real without the network: fixture packages in the registries' own
layouts (emoji-datasource, emojibase-data, wordnet-base, fortunes-min) placed in the fetch cache,
then every record, caption, code file, text document and licence checked against them; and the
fetcher itself, with stand-in `npm` and `apt-get` commands that hand over local packages."""

import itertools
import json
import os
import stat
import subprocess
import tarfile

import numpy
import pytest
from PIL import Image

from megatron_moma.data import patch_codebook, real_corpus, registry_sources
from megatron_moma.data.dataset import MixedModalDocuments
from megatron_moma.data.preprocess import main as preprocess
from megatron_moma.data.sample_corpus import main as sample_data
from megatron_moma.data.tokenizers import ByteLevelTokenizer

# (unified, label, tags, skin variations {unified: label})
EMOJI = [
    ("1F600", "grinning face", ["face", "grin", "happy"], {}),
    ("2764-FE0F", "red heart", ["heart", "love"], {}),
    ("1F44B", "waving hand", ["hand", "wave"], {"1F44B-1F3FB": "waving hand: light skin tone"}),
    ("1F436", "dog face", ["dog", "pet"], {}),
]
UNLABELLED = "1F9FF"  # has an image but no emojibase entry: left out
FORTUNES = {"fortunes": ["A penny saved.\n\t\t-- someone", "Look up."],
            "literature": ["Call me Ishmael."], "riddles": ["Q: Why?\nA: Because."]}
WORDNET_HEADER = "  1 This software and database is being provided to you, the LICENSEE  \n"
WORDNET = {
    "data.noun": ["00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived",
                  "00001930 03 n 02 physical_entity 0 thing 0 000 | an entity that has physical "
                  "existence"],
    "data.verb": ["00001740 29 v 01 breathe 0 000 | draw air into, and expel out of, the lungs"],
    "data.adj": ["00001740 00 a 01 able 0 000 | having the necessary means"],
    "data.adv": ["00001837 02 r 01 barely 0 000 | by a small margin"],
}


def colour(number):
    return tuple(int(v) for v in numpy.random.default_rng(number).integers(0, 256, 3))


def emoji_png(path, number):
    """A 64x64 RGBA picture with a transparent border and two coloured halves."""
    pixels = numpy.zeros((64, 64, 4), dtype=numpy.uint8)
    pixels[8:56, 8:32, :3], pixels[8:56, 32:56, :3] = colour(number), colour(number + 100)
    pixels[8:56, 8:56, 3] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGBA").save(path)


def mark(folder, registry, name, version):
    (folder / registry_sources.MARKER).write_text(
        json.dumps({"registry": registry, "name": name, "version": version}))


def make_cache(cache):
    """Every package the builder needs, unpacked in the cache as registry_sources leaves them."""
    number = 0
    for vendor, (package, version, _) in real_corpus.EMOJI_VENDORS.items():
        root = cache / "npm" / package / "package"
        entries = []
        for unified, _, _, skins in EMOJI + [(UNLABELLED, "", [], {})]:
            variations = {}
            for skin in skins:
                variations[skin.split("-")[1]] = {"unified": skin, "image": skin.lower() + ".png",
                                                  f"has_img_{vendor}": True}
                emoji_png(root / "img" / vendor / "64" / (skin.lower() + ".png"), number)
                number += 1
            entries.append({"unified": unified, "image": unified.lower() + ".png",
                            f"has_img_{vendor}": True, "skin_variations": variations or None})
            emoji_png(root / "img" / vendor / "64" / (unified.lower() + ".png"), number)
            number += 1
        # An emoji this vendor has no image of is left out.
        entries.append({"unified": "1F4A9", "image": "1f4a9.png", f"has_img_{vendor}": False})
        (root / "emoji.json").write_text(json.dumps(entries))
        (root / "LICENSE").write_text(f"licence of {package}")
        mark(root.parent, "npm", package, version)
    root = cache / "npm" / real_corpus.EMOJIBASE[0] / "package"
    (root / "en").mkdir(parents=True)
    data = [{"hexcode": unified.replace("-FE0F", ""), "label": label, "tags": tags,
             "skins": [{"hexcode": skin, "label": skin_label} for skin, skin_label in skins.items()]}
            for unified, label, tags, skins in EMOJI]
    (root / "en" / "data.json").write_text(json.dumps(data))
    (root / "LICENSE").write_text("MIT")
    mark(root.parent, "npm", real_corpus.EMOJIBASE[0], real_corpus.EMOJIBASE[1])
    wordnet = cache / "deb" / "wordnet-base"
    (wordnet / "usr" / "share" / "wordnet").mkdir(parents=True)
    for name, lines in WORDNET.items():
        (wordnet / "usr" / "share" / "wordnet" / name).write_text(
            WORDNET_HEADER + "".join(line + "  \n" for line in lines))
    mark(wordnet, "deb", "wordnet-base", "1:3.0-37")
    fortunes = cache / "deb" / "fortunes-min"
    (fortunes / "usr" / "share" / "games" / "fortunes").mkdir(parents=True)
    for name, quotations in FORTUNES.items():
        (fortunes / "usr" / "share" / "games" / "fortunes" / name).write_text(
            "\n%\n".join(quotations) + "\n%\n")
    (fortunes / "usr" / "share" / "doc" / "fortunes-min").mkdir(parents=True)
    (fortunes / "usr" / "share" / "doc" / "fortunes-min" / "copyright").write_text("BSD")
    mark(fortunes, "deb", "fortunes-min", "1:1.99.1-7.3")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    make_cache(folder / "cache")
    assert sample_data(["--corpus", "real", "--output-dir", str(folder / "corpus"), "--cache-dir",
                        str(folder / "cache"), "--codebook-size", "12", "--seed", "5"]) == 0
    records = [json.loads(line) for line in (folder / "corpus" / "real.jsonl").read_text().splitlines()]
    return folder, records


def all_labels():
    labels = {}
    for unified, label, tags, skins in EMOJI:
        labels[unified.replace("-FE0F", "").lower()] = (label, tags)
        for skin, skin_label in skins.items():
            labels[skin.lower()] = (skin_label, tags)
    return labels


def test_every_labelled_image_of_both_vendors_is_one_pair_with_its_caption(built):
    folder, records = built
    pairs = [record for record in records if record["source"] != "text"]
    labels = all_labels()
    assert sorted((r["source"], r["text"][0 if r["direction"] == "image-caption" else 1]["image"])
                  for r in pairs) == sorted(
        (vendor, f"codes/{vendor}/{code}.npy") for vendor in ("google", "twitter") for code in labels)
    assert {r["direction"] for r in pairs} == {"caption-image", "image-caption"}
    for record in pairs:
        kinds = [next(iter(segment)) for segment in record["text"]]
        assert kinds == (["text", "image"] if record["direction"] == "caption-image"
                         else ["image", "text"])
        code = os.path.basename(record["text"][kinds.index("image")]["image"])[:-4]
        label, tags = labels[code]
        text = record["text"][kinds.index("text")]["text"]
        assert record["label"] == label and label in text
        templates = (real_corpus.CAPTION_BEFORE_IMAGE if record["direction"] == "caption-image"
                     else real_corpus.CAPTION_AFTER_IMAGE)
        vendor = real_corpus.VENDOR_NAMES[record["source"]]
        # Up to 3 of the tags not already words of the label, in their order.
        free = [tag for tag in tags if tag not in label.split()] or [label]
        subsets = [", ".join(c) for c in itertools.combinations(free, min(3, len(free)))]
        assert text in {t.format(label=label, vendor=vendor, tags=subset)
                        for t in templates for subset in subsets}
    assert [r["id"] for r in records] == list(range(len(records)))


def test_code_files_decode_to_the_resized_images(built):
    folder, records = built
    corpus = folder / "corpus"
    codebook = patch_codebook.load(str(corpus / "codebook.npz"))
    assert (codebook.codebook_size, codebook.patch_size, codebook.image_size) == (12, 4, 32)
    squared = []
    for line in (corpus / "images.jsonl").read_text().splitlines():
        entry = json.loads(line)
        pixels = numpy.asarray(Image.open(corpus / entry["image"]))
        assert pixels.shape == (32, 32, 3)
        assert (pixels[0] == 255).all(), "the transparent border is composited on white"
        codes = numpy.load(corpus / "codes" / entry["codes"])
        numpy.testing.assert_array_equal(codes, codebook.encode(pixels[None])[0])
        decoded = codebook.decode(codes[None])[0].astype(float)
        squared.append(((decoded - pixels) ** 2).mean())
    summary = json.loads((corpus / "codes" / "tokenizer.json").read_text())
    assert summary["images"] == 2 * len(all_labels())
    assert summary["reconstruction"]["mse"] == pytest.approx(numpy.mean(squared))


def test_plain_text_documents_are_the_fortunes_and_wordnet_glosses(built):
    _, records = built
    documents = [record["text"] for record in records if record["source"] == "text"]
    quotations = [q for quotations in FORTUNES.values() for q in quotations]
    assert sorted(d for d in documents if ": " not in d.splitlines()[0] or d in quotations) \
        == sorted(quotations)
    glosses = "\n".join(d for d in documents if d not in quotations).splitlines()
    assert sorted(glosses) == sorted([
        "entity: that which is perceived",
        "physical entity, thing: an entity that has physical existence",
        "breathe: draw air into, and expel out of, the lungs",
        "able: having the necessary means", "barely: by a small margin"])


def test_sources_and_licences_are_recorded(built):
    folder, _ = built
    sources = (folder / "corpus" / "SOURCES.md").read_text()
    for package, version in [("emoji-datasource-google", "16.0.0"), ("emojibase-data", "17.0.0"),
                             ("emoji-datasource-twitter", "16.0.0"), ("wordnet-base", "1:3.0-37"),
                             ("fortunes-min", "1:1.99.1-7.3")]:
        assert f"| {package} | " in sources and f" | {version} | " in sources
    assert "CC-BY-4.0" in sources and "Apache-2.0" in sources
    licences = folder / "corpus" / "licenses"
    assert (licences / "emojibase-data.txt").read_text() == "MIT"
    assert (licences / "fortunes-min.txt").read_text() == "BSD"


def test_the_corpus_preprocesses_into_text_and_image_sequences(built, tmp_path):
    folder, records = built
    assert preprocess(["--input", str(folder / "corpus" / "real.jsonl"), "--output-prefix",
                       str(tmp_path / "real"), "--codebook-size", "12", "--codes-per-image", "64",
                       "--append-eod"]) == 0
    documents = MixedModalDocuments(str(tmp_path / "real_text_document"))
    assert len(documents) == len(records)
    tokenizer = ByteLevelTokenizer()
    for number, record in enumerate(records):
        tokens = documents.get(number)
        if record["source"] == "text":
            assert tokenizer.detokenize(tokens) == record["text"]
        else:
            assert (tokens >= 260).sum() == 64  # one image of 64 codes, ids 260 + code


def test_a_malformed_source_is_named_and_leaves_no_output(tmp_path, capsys):
    make_cache(tmp_path / "cache")
    noun = tmp_path / "cache" / "deb" / "wordnet-base" / "usr" / "share" / "wordnet" / "data.noun"
    noun.write_text(noun.read_text() + "garbage without a gloss\n")
    assert sample_data(["--corpus", "real", "--output-dir", str(tmp_path / "out"), "--cache-dir",
                        str(tmp_path / "cache"), "--codebook-size", "12"]) == 1
    assert f"{noun} line 4: expected 'offset lex ss_type" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_fetcher_unpacks_npm_and_debian_packages_once(tmp_path, monkeypatch):
    """Stand-in `npm` and `apt-get` on PATH hand over a local tarball and a local .deb (built
    with dpkg-deb); the fetcher unpacks them, records the version, and reuses them."""
    if subprocess.run(["which", "dpkg-deb"], capture_output=True).returncode != 0:
        pytest.skip("dpkg-deb is not installed")
    source = tmp_path / "source"
    (source / "package").mkdir(parents=True)
    (source / "package" / "emoji.json").write_text("[]")
    with tarfile.open(tmp_path / "pkg-1.0.0.tgz", "w:gz") as archive:
        archive.add(source / "package", arcname="package")
    deb_root = tmp_path / "debroot"
    (deb_root / "DEBIAN").mkdir(parents=True)
    (deb_root / "DEBIAN" / "control").write_text(
        "Package: words\nVersion: 2.5-1\nArchitecture: all\nMaintainer: t <t@t>\n"
        "Description: test\n")
    (deb_root / "usr" / "share" / "words").mkdir(parents=True)
    (deb_root / "usr" / "share" / "words" / "list").write_text("hello\n")
    subprocess.run(["dpkg-deb", "-b", str(deb_root), str(tmp_path / "words_2.5-1_all.deb")],
                   check=True, capture_output=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    executable(bin_dir / "npm", f"#!/bin/sh\necho \"$@\" >> {calls}\n"
                                f"cp {tmp_path}/pkg-1.0.0.tgz .\necho pkg-1.0.0.tgz\n")
    executable(bin_dir / "apt-get", f"#!/bin/sh\necho \"$@\" >> {calls}\n"
                                    f"cp {tmp_path}/words_2.5-1_all.deb .\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cache = str(tmp_path / "cache")
    for _ in range(2):
        npm = registry_sources.npm_package(cache, "pkg", "1.0.0")
        deb = registry_sources.debian_package(cache, "words")
    assert calls.read_text().splitlines() == ["pack pkg@1.0.0 --silent", "download words"]
    assert (npm.version, deb.version) == ("1.0.0", "2.5-1")
    assert open(os.path.join(npm.root, "emoji.json")).read() == "[]"
    assert open(os.path.join(deb.root, "usr", "share", "words", "list")).read() == "hello\n"
    assert sorted(os.listdir(cache)) == ["deb", "npm"]
    assert os.listdir(os.path.join(cache, "npm")) == ["pkg"]

    executable(bin_dir / "apt-get", "#!/bin/sh\necho 'E: Unable to locate package nope' >&2\n"
                                    "exit 100\n")
    with pytest.raises(registry_sources.FetchError, match="run `apt-get update` first"):
        registry_sources.debian_package(cache, "nope")
    assert sorted(os.listdir(os.path.join(cache, "deb"))) == ["words"]
