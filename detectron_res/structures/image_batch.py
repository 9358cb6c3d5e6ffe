"""Batching images of different sizes: zero-pad to a common size divisible by the network stride."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def batch_images(
    images: list[Tensor], *, size_divisibility: int = 16, pad_value: float = 0.0
) -> tuple[Tensor, list[tuple[int, int]]]:
    """N tensors (C, H_i, W_i) -> one (N, C, H, W) tensor padded at the bottom and right, H and W the smallest
    multiples of `size_divisibility` covering every image, and each image's (H_i, W_i)."""
    if not images:
        raise ValueError("batch_images needs at least one image")
    image_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    height = max(h for h, _ in image_sizes)
    width = max(w for _, w in image_sizes)
    if size_divisibility > 1:
        height = -(-height // size_divisibility) * size_divisibility
        width = -(-width // size_divisibility) * size_divisibility
    padded = [F.pad(im, (0, width - w, 0, height - h), value=pad_value) for im, (h, w) in zip(images, image_sizes)]
    return torch.stack(padded), image_sizes
