"""RoI feature extraction from one feature map: RoIAlign (aligned by default, detectron2's ROIAlignV2) or RoIPool."""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.ops import roi_pool
from torchvision.ops import roi_align as torchvision_roi_align
from torchvision.ops._utils import convert_boxes_to_roi_format

from .roi_align import roi_align

POOLERS = ("ROIAlign", "ROIPool")
ROI_ALIGN_KERNELS = ("auto", "bag", "torchvision")


class ROIPooler(nn.Module):
    def __init__(
        self,
        *,
        kind: str,
        output_size: int,
        spatial_scale: float,
        sampling_ratio: int = 0,
        aligned: bool = True,
        roi_align_kernel: str = "auto",
    ):
        """
        Args:
            kind: "ROIAlign" (bilinear, half-pixel aligned) or "ROIPool" (max over quantised bins, Fast R-CNN).
            output_size: side of the pooled feature (14 for the C4 head).
            spatial_scale: feature stride inverse (1/16 for res4).
            sampling_ratio: ROIAlign samples per bin side; 0 = adaptive.
            aligned: ROIAlign's half-pixel shift of the box (detectron2's ROIAlignV2); False is the original
                RoIAlign (Mask R-CNN, Detectron), whose box corners fall on pixel centres.
            roi_align_kernel: "bag" (`layers.roi_align`, vectorised over channels and threads), "torchvision"
                (`torchvision.ops.roi_align`), or "auto": "bag" on the CPU, torchvision's kernel on GPUs. Both give
                the same values to float rounding.
        """
        super().__init__()
        if kind not in POOLERS:
            raise ValueError(f"Unknown RoI pooler {kind!r}; expected one of {POOLERS}")
        if roi_align_kernel not in ROI_ALIGN_KERNELS:
            raise ValueError(f"Unknown RoIAlign kernel {roi_align_kernel!r}; expected one of {ROI_ALIGN_KERNELS}")
        self.kind = kind
        self.output_size = (output_size, output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.roi_align_kernel = roi_align_kernel

    def forward(self, features: Tensor, boxes: list[Tensor] | Tensor) -> Tensor:
        """(N, C, H, W) features and N lists of (R_i, 4) input-pixel boxes, or (R, 5) rows [image index, x1, y1,
        x2, y2] -> (R, C, S, S)."""
        rois = boxes if isinstance(boxes, Tensor) else convert_boxes_to_roi_format(boxes)
        if len(rois) == 0:
            return features.new_zeros((0, features.shape[1], *self.output_size))
        if self.kind == "ROIPool":
            return roi_pool(features, rois.to(features.dtype), self.output_size, self.spatial_scale)
        kernel = self.roi_align_kernel
        if kernel == "auto":
            kernel = "torchvision" if features.device.type == "cuda" else "bag"
        if kernel == "torchvision":
            rois = rois.to(features.dtype)
            scale, ratio = self.spatial_scale, self.sampling_ratio
            return torchvision_roi_align(features, rois, self.output_size, scale, ratio, aligned=self.aligned)
        return roi_align(  # the box coordinates keep their own precision (float32 beside bfloat16 features)
            features,
            rois,
            output_size=self.output_size[0],
            spatial_scale=self.spatial_scale,
            sampling_ratio=self.sampling_ratio,
            aligned=self.aligned,
        )

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"aligned={self.aligned}, roi_align_kernel={self.roi_align_kernel}"
        )
