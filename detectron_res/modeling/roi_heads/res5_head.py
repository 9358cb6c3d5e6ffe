"""The C4 RoI head (detectron2's `Res5ROIHeads`): pool 14x14 from res4 per RoI, run res5, average, predict.

Training samples RoIs per image from the proposals (plus the ground-truth boxes): foreground at IoU >= 0.5 with a
ground-truth box, background below, at most 25% foreground.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.ops import box_iou

from ...layers import ROIPooler
from .fast_rcnn import FastRCNNOutputLayers


class Res5ROIHeads(nn.Module):
    def __init__(
        self,
        *,
        pooler: ROIPooler,
        res5: nn.Module,
        predictor: FastRCNNOutputLayers,
        batch_size_per_image: int,
        positive_fraction: float,
        fg_iou_thresh: float,
        bg_iou_thresh_lo: float,
        proposal_append_gt: bool,
    ):
        """
        Args:
            pooler: RoI features from res4 (14x14).
            res5: the per-RoI conv5 stage (first block stride 2).
            predictor: classifier and box regressor on the averaged res5 feature.
            batch_size_per_image, positive_fraction: RoIs sampled per image and the most foreground among them.
            fg_iou_thresh: a RoI with IoU >= this to some ground-truth box is foreground.
            bg_iou_thresh_lo: a RoI whose best IoU is in [this, fg_iou_thresh) is background; below, unused.
            proposal_append_gt: add the ground-truth boxes to the proposals in training.
        """
        super().__init__()
        self.pooler = pooler
        self.res5 = res5
        self.predictor = predictor
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh_lo = bg_iou_thresh_lo
        self.proposal_append_gt = proposal_append_gt

    @property
    def num_classes(self) -> int:
        return self.predictor.num_classes

    def box_features(self, features: Tensor, boxes: list[Tensor]) -> Tensor:
        """res4 features (N, C4, H, W) and per-image boxes -> one feature per box (sum R_i, C5)."""
        x = self.pooler(features, boxes)  # (R, C4, 14, 14)
        x = self.res5(x)  # (R, C5, 7, 7)
        return x.mean(dim=(2, 3))  # (R, C5)

    def forward(
        self,
        features: Tensor,
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        gt_boxes: list[Tensor] | None = None,
        gt_classes: list[Tensor] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """
        Returns:
            detections per image ({"boxes", "scores", "labels"}, input pixels) at inference, [] in training;
            losses {"loss_cls", "loss_box_reg"} in training, {} at inference.
        """
        if not self.training:
            logits, deltas = self.predictor(self.box_features(features, proposals))
            return self.predictor.inference(logits, deltas, proposals, image_sizes), {}
        if gt_boxes is None or gt_classes is None:
            raise ValueError("Res5ROIHeads needs gt_boxes and gt_classes in training mode")
        rois, roi_classes, roi_gt_boxes = self.label_and_sample_proposals(proposals, gt_boxes, gt_classes)
        logits, deltas = self.predictor(self.box_features(features, rois))
        losses = self.predictor.losses(
            logits, deltas, torch.cat(rois), torch.cat(roi_classes), torch.cat(roi_gt_boxes)
        )
        return [], losses

    @torch.no_grad()
    def label_and_sample_proposals(
        self, proposals: list[Tensor], gt_boxes: list[Tensor], gt_classes: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per image: the sampled RoIs (S, 4), their target class (S,) with K = background, and their matched
        ground-truth box (S, 4) (meaningless for background)."""
        background = self.num_classes
        rois, roi_classes, roi_gt_boxes = [], [], []
        for boxes, gt, classes in zip(proposals, gt_boxes, gt_classes):
            if self.proposal_append_gt:
                boxes = torch.cat([boxes, gt])
            if len(gt) == 0:
                best_iou = boxes.new_zeros(len(boxes))
                matched = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
                gt = boxes.new_zeros((1, 4))
                classes = torch.full((1,), background, dtype=torch.int64, device=boxes.device)
            else:
                best_iou, matched = box_iou(gt, boxes).max(dim=0)  # (R,) for (M, R) IoUs
            is_fg = best_iou >= self.fg_iou_thresh
            is_bg = ~is_fg & (best_iou >= self.bg_iou_thresh_lo)
            # the sampler's labels: 1 = candidate foreground, 0 = candidate background, -1 = unused
            labels = torch.full_like(best_iou, -1.0)
            labels[is_fg] = 1.0
            labels[is_bg] = 0.0
            positive, negative = self.sampler([labels])
            sampled = (positive[0] | negative[0]).bool()
            target = torch.where(is_fg, classes[matched], torch.full_like(matched, background))
            rois.append(boxes[sampled])
            roi_classes.append(target[sampled])
            roi_gt_boxes.append(gt[matched[sampled]])
        return rois, roi_classes, roi_gt_boxes
