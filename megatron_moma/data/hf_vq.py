"""A VQ image tokenizer from a local Hugging Face folder: transformers' Emu3 or Chameleon VQ-VAE.

The folder holds the VQ-VAE alone (`config.json` with `model_type` "emu3_vqgan" or
"chameleon_vqgan", and its weights), as `Emu3VQVAE.save_pretrained` / `ChameleonVQVAE.
save_pretrained` write it (a full Emu3 or Chameleon checkpoint keeps it at `model.vqmodel`:
save that module on its own). Nothing is downloaded (`local_files_only`).

Pixels go in scaled to [-1, 1], as both models' image processors give them. Emu3's VQ-VAE encodes
and decodes, so its reconstruction error is reported; transformers' Chameleon VQ-VAE has no
decoder (only the encoder Chameleon needs to read images), so its codes cannot be turned back
into images. Works with transformers 4.56 (encode returns the codes) and 5.x (a model output
holding them).
"""

import json
import os
from typing import Optional

import numpy
import torch

MODEL_TYPES = {"emu3_vqgan": "Emu3VQVAE", "chameleon_vqgan": "ChameleonVQVAE"}


class HuggingFaceVQ:
    """encode: [n, s, s, 3] uint8 -> [n, s / f, s / f] int64 codes; decode: back (Emu3 only)."""

    def __init__(self, path: str, image_size: Optional[int] = None):
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise ValueError(f"--hf-model {path!r} has no config.json")
        with open(config_path, encoding="utf-8") as config_file:
            model_type = json.load(config_file).get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"--hf-model {path!r}: model_type {model_type!r} is not a VQ-VAE "
                             f"this tool reads (expected one of {sorted(MODEL_TYPES)}; for a "
                             f"full Emu3/Chameleon checkpoint save its model.vqmodel alone)")
        try:
            import transformers
        except ImportError as error:
            raise ValueError("--hf-model needs transformers: pip install 'megatron-moma[hf]'") \
                from error
        model_class = getattr(transformers, MODEL_TYPES[model_type], None)
        if model_class is None:
            raise ValueError(f"transformers {transformers.__version__} has no "
                             f"{MODEL_TYPES[model_type]}; install transformers>=4.56")
        self.path, self.model_type = path, model_type
        self.model = model_class.from_pretrained(path, local_files_only=True).eval()
        config = self.model.config
        self.codebook_size = int(config.codebook_size if model_type == "emu3_vqgan"
                                 else config.num_embeddings)
        self.factor = 2 ** (len(config.channel_multiplier) - 1)
        self.image_size = image_size or getattr(config, "resolution", None) or 8 * self.factor

    def describe(self) -> dict:
        return {"backend": "hf_vq", "model": os.path.abspath(self.path),
                "model_type": self.model_type, "codebook_size": self.codebook_size,
                "downsample_factor": self.factor, "image_size": self.image_size}

    @torch.no_grad()
    def encode(self, images: numpy.ndarray) -> numpy.ndarray:
        if images.shape[1] % self.factor or images.shape[2] % self.factor:
            raise ValueError(f"image sides {images.shape[1:3]} are not multiples of the model's "
                             f"downsampling factor {self.factor}")
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        pixels = pixels.to(self.model.dtype)
        if self.model_type == "emu3_vqgan":
            sizes = torch.tensor([images.shape[1:3]] * len(images))
            output = self.model.encode(pixels, sizes)
            codes = getattr(output, "image_tokens", output)  # 5.x: a model output; 4.56: a list
            codes = torch.stack(list(codes))
        else:
            output = self.model.encode(pixels)
            codes = output.image_tokens if hasattr(output, "image_tokens") else output[2]
        grid = (images.shape[1] // self.factor, images.shape[2] // self.factor)
        return codes.reshape(len(images), *grid).long().numpy()

    @torch.no_grad()
    def decode(self, codes: numpy.ndarray) -> Optional[numpy.ndarray]:
        """[n, h, w] codes -> [n, h * f, w * f, 3] uint8; None for Chameleon (no decoder)."""
        if self.model_type != "emu3_vqgan":
            return None
        codes = torch.as_tensor(numpy.asarray(codes), dtype=torch.long)
        if codes.ndim == 2:  # one image's flat codes cannot be given a shape: ask for grids
            raise ValueError(f"codes of shape {tuple(codes.shape)}: expected [n, h, w] grids")
        pixels = self.model.decode(codes).float().clamp(-1, 1)
        return ((pixels + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
