"""moma-tokenize-images with the patch codebook: k-means, encode/decode against brute-force numpy,
the same codes from a saved codebook, the CLI round trip (images -> codes -> images), codes that
moma-preprocess reads, and clear errors that leave nothing behind."""

import json

import numpy
import pytest
from PIL import Image

from megatron_moma.data import patch_codebook
from megatron_moma.data.dataset import MixedModalDocuments
from megatron_moma.data.preprocess import main as preprocess
from megatron_moma.data.tokenize_images import main as tokenize_images

SIZE, PATCH = 16, 4
GRID = SIZE // PATCH


def palette_images(count, colours, seed):
    """[count, 16, 16, 3] uint8 images made of 4x4 tiles, each one of `colours` solid colours
    (every colour used): k-means with as many codes must find the colours exactly."""
    rng = numpy.random.default_rng(seed)
    palette = rng.integers(0, 256, size=(colours, 3)).astype(numpy.uint8)
    tiles = rng.integers(colours, size=(count, GRID, GRID))
    tiles.reshape(-1)[:colours] = numpy.arange(colours)
    images = palette[tiles].repeat(PATCH, axis=1).repeat(PATCH, axis=2)
    return images, palette, tiles


def brute_force_codes(images, entries):
    """Nearest entry of every 4x4 patch, one patch at a time: [n, g, g]."""
    n = images.shape[0]
    codes = numpy.zeros((n, GRID, GRID), dtype=numpy.int64)
    for i in range(n):
        for r in range(GRID):
            for c in range(GRID):
                patch = images[i, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH]
                vector = patch.reshape(-1).astype(numpy.float64) / 255.0
                codes[i, r, c] = ((entries - vector) ** 2).sum(1).argmin()
    return codes


def test_kmeans_finds_the_colours_and_decoding_restores_the_images():
    images, palette, tiles = palette_images(12, 6, seed=0)
    codebook = patch_codebook.fit(images, 6, PATCH, seed=3)
    codes = codebook.encode(images)
    assert codes.shape == (12, GRID, GRID)
    numpy.testing.assert_array_equal(codebook.decode(codes), images)
    # Each code is one colour: the codes are the tiles up to a renaming of the colours.
    renaming = {}
    for code, tile in zip(codes.reshape(-1), tiles.reshape(-1)):
        assert renaming.setdefault(int(code), int(tile)) == int(tile)
    entries = codebook.entries.reshape(6, PATCH * PATCH, 3)
    numpy.testing.assert_allclose(entries.std(axis=1), 0, atol=1e-6)


def test_encode_is_the_nearest_entry_and_the_saved_codebook_gives_the_same_codes(tmp_path):
    rng = numpy.random.default_rng(1)
    images = rng.integers(0, 256, size=(5, SIZE, SIZE, 3)).astype(numpy.uint8)
    codebook = patch_codebook.fit(images, 16, PATCH, seed=7, iterations=3)
    numpy.testing.assert_array_equal(codebook.encode(images),
                                     brute_force_codes(images, codebook.entries))
    again = patch_codebook.fit(images, 16, PATCH, seed=7, iterations=3)
    numpy.testing.assert_array_equal(again.entries, codebook.entries)
    codebook.save(str(tmp_path / "codebook.npz"))
    loaded = patch_codebook.load(str(tmp_path / "codebook.npz"))
    assert (loaded.patch_size, loaded.image_size, loaded.seed) == (PATCH, SIZE, 7)
    numpy.testing.assert_array_equal(loaded.encode(images), codebook.encode(images))
    with pytest.raises(ValueError, match="codes must be in"):
        codebook.decode(numpy.full((1, GRID, GRID), 16))


def write_pngs(folder, images, alpha=None):
    paths = []
    for number, pixels in enumerate(images):
        path = folder / ("sub" if number % 2 else "") / f"img{number}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if alpha is None:
            Image.fromarray(pixels, "RGB").save(path)
        else:
            Image.fromarray(numpy.dstack([pixels, alpha]), "RGBA").save(path)
        paths.append(path)
    return paths


def test_cli_round_trip_folder_to_codes_to_images(tmp_path, capsys):
    images, _, _ = palette_images(6, 8, seed=2)
    # A transparent pixel is composited on white before tokenizing.
    alpha = numpy.full((SIZE, SIZE), 255, dtype=numpy.uint8)
    alpha[:PATCH, :PATCH] = 0
    write_pngs(tmp_path / "images", images, alpha)
    expected = images.copy()
    expected[:, :PATCH, :PATCH] = 255
    codebook = str(tmp_path / "codebook.npz")
    assert tokenize_images(["--input", str(tmp_path / "images"), "--output-dir",
                            str(tmp_path / "codes"), "--fit-codebook", "--codebook", codebook,
                            "--codebook-size", "9", "--image-size", str(SIZE)]) == 0
    summary = json.loads((tmp_path / "codes" / "tokenizer.json").read_text())
    assert summary["backend"] == "patch_codebook" and summary["grid"] == [GRID, GRID]
    assert summary["reconstruction"]["mse"] == pytest.approx(0.0)
    manifest = [json.loads(line) for line in
                (tmp_path / "codes" / "manifest.jsonl").read_text().splitlines()]
    assert [entry["codes"] for entry in manifest] == [
        "img0.npy", "img2.npy", "img4.npy", "sub/img1.npy", "sub/img3.npy", "sub/img5.npy"]
    order = [0, 2, 4, 1, 3, 5]
    loaded = patch_codebook.load(codebook)
    for entry, number in zip(manifest, order):
        codes = numpy.load(tmp_path / "codes" / entry["codes"])
        assert codes.dtype == numpy.int32 and codes.shape == (GRID, GRID)
        numpy.testing.assert_array_equal(codes, brute_force_codes(expected[number:number + 1],
                                                                  loaded.entries)[0])

    # Decoding the manifest writes the images back and compares them with the originals.
    assert tokenize_images(["--decode", "--input", str(tmp_path / "codes" / "manifest.jsonl"),
                            "--codebook", codebook, "--output-dir", str(tmp_path / "decoded")]) == 0
    for entry, number in zip(manifest, order):
        decoded = numpy.asarray(Image.open(tmp_path / "decoded" / entry["codes"].replace(".npy", ".png")))
        numpy.testing.assert_array_equal(decoded, expected[number])
    decoded_summary = json.loads((tmp_path / "decoded" / "tokenizer.json").read_text())
    assert decoded_summary["decoded"] == 6 and decoded_summary["reconstruction"]["images"] == 6
    assert "PSNR" in capsys.readouterr().err


def test_codes_feed_moma_preprocess(tmp_path):
    images, _, _ = palette_images(3, 5, seed=4)
    paths = write_pngs(tmp_path / "pics", images)
    listing = tmp_path / "pics.jsonl"
    listing.write_text("".join(json.dumps({"image": str(path.relative_to(tmp_path)),
                                           "codes": f"c{number}.npy"}) + "\n"
                               for number, path in enumerate(paths)))
    codebook = str(tmp_path / "cb.npz")
    assert tokenize_images(["--input", str(listing), "--output-dir", str(tmp_path / "codes"),
                            "--fit-codebook", "--codebook", codebook, "--codebook-size", "5",
                            "--image-size", str(SIZE)]) == 0
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"text": [{"text": f"picture {n}"},
                                                    {"image": f"codes/c{n}.npy"}]}) + "\n"
                               for n in range(3)))
    assert preprocess(["--input", str(records), "--output-prefix", str(tmp_path / "out"),
                       "--codebook-size", "5", "--codes-per-image", str(GRID * GRID)]) == 0
    documents = MixedModalDocuments(str(tmp_path / "out_text_document"))
    for number in range(3):
        codes = numpy.load(tmp_path / "codes" / f"c{number}.npy").reshape(-1)
        tokens = documents.get(number)
        # byte-level text, then [begin_of_image 258, 260 + codes..., end_of_image 259]
        image = tokens[-(GRID * GRID + 2):]
        assert image[0] == 258 and image[-1] == 259
        numpy.testing.assert_array_equal(image[1:-1], 260 + codes)


def test_errors_name_the_problem_and_leave_nothing(tmp_path, capsys):
    listing = tmp_path / "list.jsonl"
    listing.write_text('{"image": "a.png"}\n{"picture": "b.png"}\n')
    out = tmp_path / "out"
    assert tokenize_images(["--input", str(listing), "--output-dir", str(out), "--fit-codebook",
                            "--codebook", str(tmp_path / "cb.npz")]) == 1
    assert f"{listing} line 2: expected an object with a 'image' path" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.tmp").exists()

    listing.write_text('{"image": "missing.png"}\n')
    assert tokenize_images(["--input", str(listing), "--output-dir", str(out), "--codebook",
                            str(tmp_path / "cb.npz")]) == 1
    assert "cb.npz' not found (fit one with --fit-codebook)" in capsys.readouterr().err

    (out / "keep").mkdir(parents=True)
    assert tokenize_images(["--input", str(listing), "--output-dir", str(out), "--fit-codebook",
                            "--codebook", str(tmp_path / "cb.npz")]) == 1
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert (out / "keep").is_dir()
