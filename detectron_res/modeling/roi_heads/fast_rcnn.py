"""Fast R-CNN outputs: a (K+1)-way classifier and class-specific box regression (4K), their losses and decoding.

Class indices are 0..K-1 for objects and K for background (detectron2's convention).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import clip_boxes_to_image

from ...postprocess import EMPTY_BOX_RULES, per_class_nms


class FastRCNNOutputLayers(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        box_coder: BoxCoder,
        smooth_l1_beta: float,
        score_thresh: float,
        nms_thresh: float,
        detections_per_image: int,
        empty_boxes: str = "before_nms",
    ):
        """
        Args:
            in_channels: length of the per-RoI feature (2048 after res5 of R50/101).
            num_classes: K object classes, background excluded.
            box_coder: proposal <-> box delta transform (weights 10, 10, 5, 5).
            smooth_l1_beta: transition point of the box loss.
            score_thresh, nms_thresh, detections_per_image: inference post-processing, see `per_class_nms`.
            empty_boxes: when detections with an empty box are dropped (MODEL.ROI_HEADS.EMPTY_BOXES): "before_nms"
                or "after_rescale" (detectron2's rule), see `postprocess.EMPTY_BOX_RULES`.
        """
        super().__init__()
        self.num_classes = num_classes
        self.cls_score = nn.Linear(in_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        self.box_coder = box_coder
        self.smooth_l1_beta = smooth_l1_beta
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image
        if empty_boxes not in EMPTY_BOX_RULES:
            raise ValueError(f"empty_boxes must be one of {list(EMPTY_BOX_RULES)}, got {empty_boxes!r}")
        self.empty_boxes = empty_boxes

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(R, C) RoI features -> class logits (R, K+1), box deltas (R, 4K), in float32 also under autocast (the
        losses and box decoding that follow stay in float32)."""
        return self.cls_score(x).float(), self.bbox_pred(x).float()

    def losses(
        self, logits: Tensor, deltas: Tensor, proposals: Tensor, gt_classes: Tensor, gt_boxes: Tensor
    ) -> dict[str, Tensor]:
        """
        Args:
            logits (R, K+1), deltas (R, 4K): predictions for the sampled RoIs of the whole batch.
            proposals (R, 4): the sampled RoIs; gt_classes (R,): target class, K = background;
            gt_boxes (R, 4): matched ground-truth box (ignored for background).
        Returns:
            "loss_cls": mean log loss; "loss_box_reg": smooth L1 over the foreground RoIs' deltas of their
            ground-truth class, summed and divided by the number of sampled RoIs.
        """
        if len(logits) == 0:  # no RoI at all: keep the graph, contribute nothing
            zero = logits.sum() * 0.0 + deltas.sum() * 0.0
            return {"loss_cls": zero, "loss_box_reg": zero}
        loss_cls = F.cross_entropy(logits, gt_classes)
        foreground = gt_classes < self.num_classes
        fg_classes = gt_classes[foreground]
        # (R, 4K) -> (R, K, 4) -> (F, 4): the deltas of each foreground RoI's own class
        fg_deltas = deltas.view(len(deltas), self.num_classes, 4)[foreground, fg_classes]
        targets = self.box_coder.encode_single(gt_boxes[foreground], proposals[foreground])
        loss_box = F.smooth_l1_loss(fg_deltas, targets, beta=self.smooth_l1_beta, reduction="sum")
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box / len(gt_classes)}

    def predict_boxes(self, deltas: Tensor, proposals: Tensor, image_size: tuple[int, int]) -> Tensor:
        """(R, 4K) deltas applied to (R, 4) proposals -> (R, K, 4) boxes clipped to the image."""
        boxes = self.box_coder.decode_single(deltas, proposals)  # (R, 4K)
        boxes = clip_boxes_to_image(boxes.view(-1, 4), image_size)
        return boxes.view(len(proposals), self.num_classes, 4)

    def inference(
        self, logits: Tensor, deltas: Tensor, proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Per image: softmax scores, class-specific boxes, per-class NMS, top-k.
        Returns dicts {"boxes" (D, 4), "scores" (D,), "labels" (D,)} in input-image pixels."""
        probs = F.softmax(logits, dim=1)[:, : self.num_classes]  # (R, K), background dropped
        results = []
        for image_probs, image_deltas, image_proposals, image_size in zip(
            probs.split([len(p) for p in proposals]),
            deltas.split([len(p) for p in proposals]),
            proposals,
            image_sizes,
        ):
            boxes = self.predict_boxes(image_deltas, image_proposals, image_size)
            boxes, scores, labels = per_class_nms(
                boxes,
                image_probs,
                score_thresh=self.score_thresh,
                nms_thresh=self.nms_thresh,
                max_detections=self.detections_per_image,
                empty_boxes=self.empty_boxes,
            )
            results.append({"boxes": boxes, "scores": scores, "labels": labels})
        return results

