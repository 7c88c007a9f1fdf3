"""moma-tokenize-images --hf-model on tiny randomly initialised transformers VQ-VAEs built here:
the codes equal the nearest codebook entries of the model's own encoder output, Emu3's decode is
the model's decode, and Chameleon (no decoder in transformers) refuses --decode clearly."""

import json

import numpy
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from megatron_moma.data.hf_vq import HuggingFaceVQ  # noqa: E402
from megatron_moma.data.tokenize_images import main as tokenize_images  # noqa: E402

SIZE, CODES = 16, 64
TINY = dict(base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Save a tiny Emu3 and a tiny Chameleon VQ-VAE (downsampling 2: 8x8 codes of 16x16)."""
    folder = tmp_path_factory.mktemp("hf_vq")
    torch.manual_seed(0)
    emu3 = transformers.Emu3VQVAE(transformers.Emu3VQVAEConfig(
        codebook_size=CODES, embed_dim=4, latent_channels=4, temporal_downsample_factor=1,
        hidden_size=32, num_attention_heads=1, **TINY))
    emu3.save_pretrained(folder / "emu3")
    chameleon = transformers.ChameleonVQVAE(transformers.ChameleonVQVAEConfig(
        embed_dim=4, num_embeddings=CODES, latent_channels=4, resolution=SIZE, **TINY))
    chameleon.save_pretrained(folder / "chameleon")
    return folder


def images(count=3, seed=0):
    return (numpy.random.default_rng(seed).random((count, SIZE, SIZE, 3)) * 255).astype(numpy.uint8)


def nearest_entries(latent, embedding):
    """[n, c, h, w] latents -> [n, h, w] index of the nearest embedding row (brute force)."""
    vectors = latent.permute(0, 2, 3, 1).reshape(-1, latent.shape[1]).double()
    distances = torch.cdist(vectors, embedding.double())
    return distances.argmin(1).reshape(latent.shape[0], latent.shape[2], latent.shape[3])


@torch.no_grad()
def test_chameleon_codes_are_the_nearest_entries_of_its_encoder_output(models):
    backend = HuggingFaceVQ(str(models / "chameleon"))
    assert backend.codebook_size == CODES and backend.image_size == SIZE
    pixels = images()
    model = backend.model
    scaled = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    latent = model.quant_conv(model.encoder(scaled))
    expected = nearest_entries(latent, model.quantize.embedding.weight)
    numpy.testing.assert_array_equal(backend.encode(pixels), expected.numpy())
    assert backend.decode(expected.numpy()) is None


@torch.no_grad()
def test_emu3_codes_and_decoding_match_the_model(models):
    backend = HuggingFaceVQ(str(models / "emu3"))
    pixels = images()
    model = backend.model
    scaled = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    hidden = model.encoder(scaled.unsqueeze(1))  # [n, t=1, c, h, w]
    latent = model.quant_conv(hidden.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)[:, 0]
    expected = nearest_entries(latent, model.quantize.embedding.weight)
    codes = backend.encode(pixels)
    numpy.testing.assert_array_equal(codes, expected.numpy())
    reference = model.decode(torch.from_numpy(codes)).clamp(-1, 1)
    reference = ((reference + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    numpy.testing.assert_array_equal(backend.decode(codes), reference)


def test_cli_round_trip_with_the_hf_backend(models, tmp_path, capsys):
    for number, pixels in enumerate(images(2, seed=1)):
        (tmp_path / "in").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / "in" / f"{number}.png")
    assert tokenize_images(["--input", str(tmp_path / "in"), "--output-dir", str(tmp_path / "codes"),
                            "--hf-model", str(models / "emu3"), "--image-size", str(SIZE)]) == 0
    summary = json.loads((tmp_path / "codes" / "tokenizer.json").read_text())
    assert summary["backend"] == "hf_vq" and summary["model_type"] == "emu3_vqgan"
    assert summary["grid"] == [8, 8] and summary["reconstruction"]["images"] == 2
    codes = numpy.load(tmp_path / "codes" / "0.npy")
    assert codes.shape == (8, 8) and 0 <= codes.min() and codes.max() < CODES
    assert tokenize_images(["--decode", "--input", str(tmp_path / "codes" / "manifest.jsonl"),
                            "--hf-model", str(models / "emu3"),
                            "--output-dir", str(tmp_path / "back")]) == 0
    decoded = numpy.asarray(Image.open(tmp_path / "back" / "0.png"))
    expected = HuggingFaceVQ(str(models / "emu3")).decode(codes[None])[0]
    numpy.testing.assert_array_equal(decoded, expected)
    decoded_summary = json.loads((tmp_path / "back" / "tokenizer.json").read_text())
    assert decoded_summary["reconstruction"]["mse"] == pytest.approx(summary["reconstruction"]["mse"])

    capsys.readouterr()
    assert tokenize_images(["--decode", "--input", str(tmp_path / "codes"), "--hf-model",
                            str(models / "chameleon"), "--output-dir", str(tmp_path / "no")]) == 1
    assert "cannot decode codes" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_a_folder_that_is_not_a_vq_vae_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama' is not a VQ-VAE"):
        HuggingFaceVQ(str(tmp_path))
