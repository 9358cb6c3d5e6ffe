"""Faster R-CNN C4: ResNet trunk (to res4, once per image) -> RPN -> Res5 RoI head, trained end to end.

Input: a list of mapper dicts, each {"image": uint8 (3, h, w) RGB, already resized by the mapper, "height",
"width": the original size, and in training "gt_boxes" (M, 4) / "gt_classes" (M,) in the resized image}.
Training returns a dict of named losses; inference returns per image {"boxes" (D, 4), "scores" (D,),
"labels" (D,)} with boxes in the ORIGINAL image's pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image

from ..postprocess import nonempty_boxes
from ..structures import batch_images
from .rpn import RPN, NonFiniteProposalsError
from .roi_heads import Res5ROIHeads


def rescale_detections(
    detections: dict[str, Tensor], *, input_size: tuple[int, int], output_size: tuple[int, int]
) -> dict[str, Tensor]:
    """Maps boxes from the resized input image (h, w) back to the original (height, width), clipped; detections
    whose box is empty after that are dropped (every field of `detections` is indexed alike)."""
    scale_y = output_size[0] / input_size[0]
    scale_x = output_size[1] / input_size[1]
    boxes = detections["boxes"] * detections["boxes"].new_tensor([scale_x, scale_y, scale_x, scale_y])
    boxes = clip_boxes_to_image(boxes, output_size)
    keep = nonempty_boxes(boxes)
    return {**{key: value[keep] for key, value in detections.items()}, "boxes": boxes[keep]}


class FasterRCNN(nn.Module):
    def __init__(
        self,
        *,
        backbone: nn.Module,
        rpn: RPN,
        roi_heads: Res5ROIHeads,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int = 16,
    ):
        """
        Args:
            backbone: (N, 3, H, W) normalised images -> (N, C4, H/16, W/16) res4 features.
            rpn: proposals from the res4 features.
            roi_heads: res5 per RoI and the Fast R-CNN outputs.
            pixel_mean, pixel_std: per-channel RGB statistics on the 0-255 scale, the pretrained weights' convention.
            size_divisibility: the padded batch's sides are multiples of this.
        """
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        self.size_divisibility = size_divisibility

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_images(self, batched_inputs: list[dict]) -> tuple[Tensor, list[tuple[int, int]]]:
        """uint8 (3, h_i, w_i) images -> normalised, zero-padded (N, 3, H, W) batch and the (h_i, w_i)."""
        images = [
            (x["image"].to(self.device, non_blocking=True).float() - self.pixel_mean) / self.pixel_std
            for x in batched_inputs
        ]
        return batch_images(images, size_divisibility=self.size_divisibility)

    def forward(self, batched_inputs: list[dict]) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if not self.training:
            return self.inference(batched_inputs)
        images, image_sizes = self.preprocess_images(batched_inputs)
        gt_boxes = [x["gt_boxes"].to(self.device, non_blocking=True) for x in batched_inputs]
        gt_classes = [x["gt_classes"].to(self.device, non_blocking=True) for x in batched_inputs]
        features = self.backbone(images)
        try:
            proposals, rpn_losses = self.rpn(features, image_sizes, gt_boxes)
        except NonFiniteProposalsError as error:
            image = batched_inputs[error.image_index]
            name = image.get("file_name", f"image_id {image.get('image_id', '?')}")
            raise NonFiniteProposalsError(f"{error} Image: {name}.", image_index=error.image_index) from None
        _, detector_losses = self.roi_heads(features, proposals, image_sizes, gt_boxes, gt_classes)
        return {**rpn_losses, **detector_losses}

    @torch.no_grad()
    def inference(self, batched_inputs: list[dict]) -> list[dict[str, Tensor]]:
        """Detections per image in original image pixels."""
        images, image_sizes = self.preprocess_images(batched_inputs)
        features = self.backbone(images)
        proposals, _ = self.rpn(features, image_sizes)
        detections, _ = self.roi_heads(features, proposals, image_sizes)
        return [
            rescale_detections(d, input_size=size, output_size=(x["height"], x["width"]))
            for d, size, x in zip(detections, image_sizes, batched_inputs)
        ]
