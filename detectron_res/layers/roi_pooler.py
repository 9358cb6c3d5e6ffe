"""RoI feature extraction from one feature map: RoIAlign (aligned, detectron2's ROIAlignV2) or RoIPool."""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.ops import roi_align, roi_pool

POOLERS = ("ROIAlign", "ROIPool")


class ROIPooler(nn.Module):
    def __init__(self, *, kind: str, output_size: int, spatial_scale: float, sampling_ratio: int = 0):
        """
        Args:
            kind: "ROIAlign" (bilinear, half-pixel aligned) or "ROIPool" (max over quantised bins, Fast R-CNN).
            output_size: side of the pooled feature (14 for the C4 head).
            spatial_scale: feature stride inverse (1/16 for res4).
            sampling_ratio: ROIAlign samples per bin side; 0 = adaptive.
        """
        super().__init__()
        if kind not in POOLERS:
            raise ValueError(f"Unknown RoI pooler {kind!r}; expected one of {POOLERS}")
        self.kind = kind
        self.output_size = (output_size, output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio

    def forward(self, features: Tensor, boxes: list[Tensor]) -> Tensor:
        """(N, C, H, W) features and N lists of (R_i, 4) input-pixel boxes -> (sum R_i, C, S, S)."""
        if sum(len(b) for b in boxes) == 0:
            return features.new_zeros((0, features.shape[1], *self.output_size))
        boxes = [b.to(features.dtype) for b in boxes]
        if self.kind == "ROIAlign":
            return roi_align(
                features, boxes, self.output_size, self.spatial_scale, self.sampling_ratio, aligned=True
            )
        return roi_pool(features, boxes, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, output_size={self.output_size}, spatial_scale={self.spatial_scale}"

