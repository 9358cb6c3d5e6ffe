"""The R-CNN stage (the paper's Appendix C): each RPN box cropped from the image, warped to 224x224 and classified by a
whole ResNet with a (C+1)-way classifier and per-class box regressors, which re-scores and refines the box.

The paper uses R-CNN rather than Fast R-CNN here because an ImageNet image holds one object: its RoIs overlap and
their pooled features are alike, so image-centric batches lack variety. Training is RoI-centric: every RoI of every
image is one sample (the loader shuffles all of them, see `rcnn_training_records`), and a batch holds RoIs of many
images. Crops are made on the batch with torchvision's `roi_align` (one call for all RoIs), never per box.

Training inputs: ``image`` uint8 (3, H, W), ``rois`` (P, 4) in its pixels, ``gt_boxes`` (M, 4), ``gt_classes`` (M,).
Inference inputs: ``image`` (or ``original``, preferred when present), ``proposals`` (P, 4) in that image's pixels and
``proposal_labels`` (P,): the class each proposal was found for; the output re-scores each proposal for that class
and refines it with that class's regressor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, clip_boxes_to_image, roi_align

from ..modeling.roi_heads import FastRCNNOutputLayers


def crop_and_warp(images: Tensor, boxes: list[Tensor], *, size: int, sampling_ratio: int) -> Tensor:
    """(N, 3, H, W) images and per image (P_i, 4) continuous XYXY boxes in its pixels -> (sum P_i, 3, size, size):
    each box's region bilinearly resampled to size x size, `sampling_ratio` points per output pixel and axis
    averaged (0: enough to cover the bin, as an anti-aliased shrink). Pixel i covers [i, i + 1), its value sitting at
    i + 0.5 (``aligned=True``)."""
    return roi_align(
        images, [b.to(images.dtype) for b in boxes], output_size=size, spatial_scale=1.0,
        sampling_ratio=sampling_ratio, aligned=True,
    )


class RCNNLocalizer(nn.Module):
    def __init__(
        self,
        *,
        trunk: nn.Module,
        res5: nn.Module,
        predictor: FastRCNNOutputLayers,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: str = "RGB",
        crop_size: int,
        sampling_ratio: int,
        fg_iou_thresh: float,
        crops_per_forward: int,
    ):
        """
        Args:
            trunk, res5: the ResNet (stem..res4, and res5) run on each warped crop, then global average pooling.
            predictor: (C+1)-way classifier and 4C box regressors on the pooled feature.
            pixel_mean, pixel_std: per-channel statistics on the 0-255 scale, in `input_format`'s order.
            input_format: the channel order the trunk takes, "RGB" or "BGR" (MSRA/Caffe weights); images are RGB.
            crop_size: side of the warped crops (the paper: 224).
            sampling_ratio: bilinear samples per crop pixel and axis (0 = adaptive), see `crop_and_warp`.
            fg_iou_thresh: a training RoI with IoU >= this with a ground-truth box is that box's class, else background.
            crops_per_forward: crops per network pass at inference (bounds memory; training passes the whole batch).
        """
        super().__init__()
        self.trunk = trunk
        self.res5 = res5
        self.predictor = predictor
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, -1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, -1, 1, 1), False)
        self.input_format = input_format
        self.crop_size = crop_size
        self.sampling_ratio = sampling_ratio
        self.fg_iou_thresh = fg_iou_thresh
        self.crops_per_forward = crops_per_forward

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def num_classes(self) -> int:
        return self.predictor.num_classes

    def crops(self, images: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """uint8 (3, H_i, W_i) images and (P_i, 4) boxes -> normalised (sum P_i, 3, S, S) crops (one roi_align).

        The images are padded by repeating their last row and column, so that a box at an image's border samples
        the same values in a batch as alone (roi_align clamps at the border of the whole padded tensor)."""
        height = max(int(im.shape[-2]) for im in images)
        width = max(int(im.shape[-1]) for im in images)
        batch = torch.cat(
            [
                F.pad(im.to(self.device).float()[None], (0, width - im.shape[-1], 0, height - im.shape[-2]), mode="replicate")
                for im in images
            ]
        )
        warped = crop_and_warp(batch, [b.to(self.device) for b in boxes], size=self.crop_size, sampling_ratio=self.sampling_ratio)
        if self.input_format == "BGR":
            warped = warped.flip(1)  # (R, RGB, S, S) -> (R, BGR, S, S)
        return (warped - self.pixel_mean) / self.pixel_std

    def network(self, crops: Tensor) -> tuple[Tensor, Tensor]:
        """(R, 3, S, S) crops -> class logits (R, C+1), box deltas (R, 4C)."""
        features = self.res5(self.trunk(crops))  # (R, 3, S, S) -> (R, C5, S/32, S/32)
        return self.predictor(features.mean(dim=(2, 3)))

    def forward(self, batched_inputs: list[dict]) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if not self.training:
            return self.inference(batched_inputs)
        rois = [x["rois"].to(self.device) for x in batched_inputs]
        classes, matched = self.label_rois(
            rois, [x["gt_boxes"].to(self.device) for x in batched_inputs], [x["gt_classes"].to(self.device) for x in batched_inputs]
        )
        logits, deltas = self.network(self.crops([x["image"] for x in batched_inputs], rois))
        return self.predictor.losses(logits, deltas, torch.cat(rois), classes, matched)

    @torch.no_grad()
    def label_rois(self, rois: list[Tensor], gt_boxes: list[Tensor], gt_classes: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Each RoI's target class (the best-overlapping box's class at IoU >= fg_iou_thresh, else C = background)
        and that box (zeros where there is none): (R,), (R, 4) over the batch."""
        all_classes, all_matched = [], []
        for image_rois, boxes, classes in zip(rois, gt_boxes, gt_classes):
            target = torch.full((len(image_rois),), self.num_classes, dtype=torch.long, device=image_rois.device)
            matched = torch.zeros_like(image_rois)
            if len(boxes):
                iou, nearest = box_iou(image_rois, boxes).max(dim=1)
                foreground = iou >= self.fg_iou_thresh
                target[foreground] = classes[nearest[foreground]].long()
                matched[foreground] = boxes[nearest[foreground]]
            all_classes.append(target)
            all_matched.append(matched)
        return torch.cat(all_classes), torch.cat(all_matched)

    @torch.no_grad()
    def inference(self, batched_inputs: list[dict]) -> list[dict[str, Tensor]]:
        """Per image {"boxes" (P, 4) refined, "scores" (P,), "labels" (P,)}: each proposal re-scored (softmax
        probability) and regressed for its own label, in the pixels of the image it was cropped from."""
        results = []
        for x in batched_inputs:
            image = x["original"] if "original" in x else x["image"]
            proposals = x["proposals"].to(self.device)
            labels = x["proposal_labels"].to(self.device).long()
            scores, boxes = [], []
            for start in range(0, len(proposals), self.crops_per_forward):
                chunk, chunk_labels = proposals[start : start + self.crops_per_forward], labels[start : start + self.crops_per_forward]
                logits, deltas = self.network(self.crops([image], [chunk]))
                rows = torch.arange(len(chunk), device=self.device)
                scores.append(F.softmax(logits, dim=1)[rows, chunk_labels])
                # (R, 4C) -> (R, C, 4) -> (R, 4): each proposal's deltas of its own class
                own = deltas.view(len(chunk), self.num_classes, 4)[rows, chunk_labels]
                boxes.append(self.predictor.box_coder.decode_single(own, chunk))
            size = (int(image.shape[-2]), int(image.shape[-1]))
            refined = clip_boxes_to_image(torch.cat(boxes), size) if boxes else proposals.new_zeros((0, 4))
            results.append(
                {"boxes": refined, "scores": torch.cat(scores) if scores else proposals.new_zeros((0,)), "labels": labels}
            )
        return results
