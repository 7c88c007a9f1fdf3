"""A learned discrete image codebook: k-means over square RGB patches, fitted offline.

An image of `image_size` x `image_size` RGB pixels is cut into (image_size / patch_size)^2
non-overlapping patches of patch_size x patch_size x 3 values in [0, 1], row-major; each patch
becomes the index of its nearest codebook entry (squared Euclidean distance), so an image is a
(image_size / patch_size, image_size / patch_size) grid of codes. Decoding pastes each code's
entry back in its place.

Fitting is Lloyd's k-means with a fixed seed on at most `max_patches` patches drawn at random:
the initial centres are distinct patches drawn by the seed, and a centre that loses all its
patches restarts at the patch farthest from its centre. The fitted codebook is saved (`save`,
an .npz without pickles) so the same codes come out again whatever machine encodes later.
"""

import os
from dataclasses import dataclass

import numpy
import torch

ENCODE_CHUNK = 65536


@dataclass(frozen=True)
class PatchCodebook:
    """entries [codebook_size, patch_size * patch_size * 3] float32 in [0, 1]."""

    entries: numpy.ndarray
    patch_size: int
    image_size: int
    seed: int

    @property
    def codebook_size(self) -> int:
        return int(self.entries.shape[0])

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def encode(self, images: numpy.ndarray) -> numpy.ndarray:
        """[n, image_size, image_size, 3] uint8 -> [n, grid, grid] int64 codes."""
        patches = to_patches(images, self.patch_size)
        codes = nearest(torch.from_numpy(patches.reshape(-1, patches.shape[-1])),
                        torch.from_numpy(self.entries))
        return codes.numpy().reshape(images.shape[0], self.grid, self.grid)

    def decode(self, codes: numpy.ndarray) -> numpy.ndarray:
        """[n, grid, grid] (or [n, grid * grid]) codes -> [n, image_size, image_size, 3] uint8."""
        codes = numpy.asarray(codes, dtype=numpy.int64).reshape(-1, self.grid, self.grid)
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must be in [0, {self.codebook_size}), got "
                             f"{codes.min()}..{codes.max()}")
        patches = self.entries[codes]  # [n, g, g, p*p*3]
        return from_patches(patches, self.patch_size)

    def save(self, path: str) -> None:
        """Write the codebook to `path` (.npz); written whole or not at all."""
        temporary = path + ".tmp.npz"
        numpy.savez(temporary, entries=self.entries, patch_size=self.patch_size,
                    image_size=self.image_size, seed=self.seed)
        os.replace(temporary, path)


def load(path: str) -> PatchCodebook:
    """A codebook `save` wrote; ValueError naming the file if it is not one."""
    try:
        with numpy.load(path, allow_pickle=False) as archive:
            return PatchCodebook(archive["entries"].astype(numpy.float32),
                                 int(archive["patch_size"]), int(archive["image_size"]),
                                 int(archive["seed"]))
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"{path!r} is not a patch codebook written by moma-tokenize-images "
                         f"(expected an .npz with entries, patch_size, image_size, seed): "
                         f"{error}") from error


def to_patches(images: numpy.ndarray, patch_size: int) -> numpy.ndarray:
    """[n, s, s, 3] uint8 -> [n, (s / p)^2, p * p * 3] float32 in [0, 1], patches row-major."""
    n, height, width, channels = images.shape
    if height != width or height % patch_size or channels != 3:
        raise ValueError(f"images must be square RGB with a side divisible by the patch size "
                         f"{patch_size}; got shape {images.shape[1:]}")
    grid = height // patch_size
    patches = images.reshape(n, grid, patch_size, grid, patch_size, 3).transpose(0, 1, 3, 2, 4, 5)
    return patches.reshape(n, grid * grid, -1).astype(numpy.float32) / 255.0


def from_patches(patches: numpy.ndarray, patch_size: int) -> numpy.ndarray:
    """[n, g, g, p * p * 3] in [0, 1] -> [n, g * p, g * p, 3] uint8 (rounded, clipped)."""
    n, grid = patches.shape[0], patches.shape[1]
    pixels = patches.reshape(n, grid, grid, patch_size, patch_size, 3).transpose(0, 1, 3, 2, 4, 5)
    pixels = pixels.reshape(n, grid * patch_size, grid * patch_size, 3)
    return numpy.clip(numpy.rint(pixels * 255.0), 0, 255).astype(numpy.uint8)


def _squared_distances(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """[N, D], [K, D] -> [N, K] squared distances (up to each point's constant |x|^2)."""
    return (centres * centres).sum(1) - 2.0 * points @ centres.T


def nearest(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """[N, D], [K, D] -> [N] int64 index of each point's nearest centre (in chunks)."""
    if len(points) == 0:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat([_squared_distances(chunk, centres).argmin(1)
                      for chunk in points.split(ENCODE_CHUNK)])


def fit(images: numpy.ndarray, codebook_size: int, patch_size: int, seed: int,
        iterations: int = 20, max_patches: int = 200_000) -> PatchCodebook:
    """k-means (module docstring) over the patches of [n, s, s, 3] uint8 images."""
    patches = to_patches(images, patch_size)
    points = torch.from_numpy(patches.reshape(-1, patches.shape[-1]))
    generator = torch.Generator().manual_seed(seed)
    if len(points) > max_patches:
        points = points[torch.randperm(len(points), generator=generator)[:max_patches]]
    distinct = torch.unique(points, dim=0)
    if len(distinct) < codebook_size:
        raise ValueError(f"the images have {len(distinct)} distinct patches, fewer than the "
                         f"{codebook_size} codes asked for")
    centres = distinct[torch.randperm(len(distinct), generator=generator)[:codebook_size]].clone()
    for _ in range(iterations):
        assignment = nearest(points, centres)
        counts = torch.bincount(assignment, minlength=codebook_size)
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        empty = counts == 0
        centres[~empty] = sums[~empty] / counts[~empty, None]
        if empty.any():
            error = ((points - centres[assignment]) ** 2).sum(1)
            centres[empty] = points[error.topk(int(empty.sum())).indices]
    return PatchCodebook(centres.numpy().astype(numpy.float32), patch_size,
                         images.shape[1], seed)

