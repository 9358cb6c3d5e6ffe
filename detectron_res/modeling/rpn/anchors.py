"""Anchors on one feature map: A = sizes x aspect ratios boxes centred on every feature cell."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def make_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """(A, 4) XYXY anchors centred on (0, 0); for each size, one anchor per ratio h / w, all of area size**2."""
    anchors = []
    for size in sizes:
        area = float(size) ** 2
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = w * ratio
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)


class AnchorGenerator(nn.Module):
    """Anchors for a single stride-`stride` feature map, in input-image pixels.

    The order is (H, W, A), matching the RPN head's predictions once permuted from (N, A, H, W).
    """

    def __init__(self, *, sizes: Sequence[float], aspect_ratios: Sequence[float], stride: int, offset: float = 0.0):
        """
        Args:
            sizes: anchor sides (square root of the area) in input pixels.
            aspect_ratios: anchor height / width ratios.
            stride: feature map stride in input pixels.
            offset: anchor centres sit at (i + offset) * stride; 0 (detectron2) puts the first at the corner.
        """
        super().__init__()
        self.stride = stride
        self.offset = offset
        self.register_buffer("cell_anchors", make_cell_anchors(sizes, aspect_ratios), persistent=False)

    @property
    def num_anchors(self) -> int:
        """Anchors per feature cell (A)."""
        return self.cell_anchors.shape[0]

    def forward(self, feature_size: tuple[int, int]) -> Tensor:
        """(H, W) of the feature map -> (H*W*A, 4) anchors."""
        height, width = feature_size
        device = self.cell_anchors.device
        shifts_x = (torch.arange(width, dtype=torch.float32, device=device) + self.offset) * self.stride
        shifts_y = (torch.arange(height, dtype=torch.float32, device=device) + self.offset) * self.stride
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
        return (shifts + self.cell_anchors.reshape(1, -1, 4)).reshape(-1, 4)  # (H*W, A, 4) -> (H*W*A, 4)
