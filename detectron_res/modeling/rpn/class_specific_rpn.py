"""The class-specific RPN of the paper's ImageNet localization system (Appendix C).

Like the detector's RPN, a 3x3 conv on the trunk's features and two sibling 1x1 convs per anchor, but per class:
`cls` has one binary logistic output per (anchor, class) and `reg` four box deltas per (anchor, class), relative
to the anchors.

Training (the paper: "8 anchors randomly sampled for each image, 1:1 positive:negative"): anchors are matched to
the ground truth as in the RPN (IoU 0.7 / 0.3, plus each box's best anchors) and `batch_size_per_image` of them are
sampled (anchors on an object that the crop cut too much are not negatives). A positive anchor trains its matched box's class: the logistic output towards 1 and that class's four
deltas towards the box. A negative anchor trains the logistic output of the image's class (the class of the
box it overlaps most; with no box in the crop, a class of the image) towards 0. The other classes' outputs of a
sampled anchor get no target at all (see docs/localization.md for why).

Inference: for each image and each class asked for (the predicted or oracle classes), the class's scores over all
anchors, top-k, decoded with the class's own deltas, clipped, NMS, and the `post_nms_topk` best boxes kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image

from ...postprocess import nonempty_boxes
from .anchors import AnchorGenerator
from .rpn import sample_anchors


class ClassSpecificRPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 convs for A*C logistic outputs and A*C*4 deltas per feature cell."""

    def __init__(self, *, in_channels: int, head_channels: int, num_anchors: int, num_classes: int):
        super().__init__()
        self.num_anchors = num_anchors
        self.num_classes = num_classes
        self.conv = nn.Conv2d(in_channels, head_channels, kernel_size=3, padding=1)
        self.cls_logits = nn.Conv2d(head_channels, num_anchors * num_classes, kernel_size=1)
        self.bbox_deltas = nn.Conv2d(head_channels, num_anchors * num_classes * 4, kernel_size=1)
        for layer in (self.conv, self.cls_logits, self.bbox_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(N, C_in, H, W) -> logits (N, R, C), deltas (N, R, C, 4), R = H*W*A in the anchors' (H, W, A) order."""
        x = F.relu(self.conv(features))
        logits, deltas = self.cls_logits(x).float(), self.bbox_deltas(x).float()  # float32 also under autocast
        n, _, height, width = logits.shape
        a, c = self.num_anchors, self.num_classes
        # (N, A*C, H, W) -> (N, A, C, H, W) -> (N, H, W, A, C) -> (N, H*W*A, C)
        logits = logits.view(n, a, c, height, width).permute(0, 3, 4, 1, 2).reshape(n, -1, c)
        # (N, A*C*4, H, W) -> (N, A, C, 4, H, W) -> (N, H, W, A, C, 4) -> (N, H*W*A, C, 4)
        deltas = deltas.view(n, a, c, 4, height, width).permute(0, 4, 5, 1, 2, 3).reshape(n, -1, c, 4)
        return logits, deltas


class ClassSpecificRPN(nn.Module):
    def __init__(
        self,
        *,
        head: ClassSpecificRPNHead,
        anchor_generator: AnchorGenerator,
        box_coder: BoxCoder,
        positive_iou: float,
        negative_iou: float,
        batch_size_per_image: int,
        positive_fraction: float,
        boundary_thresh: float,
        pre_nms_topk: int,
        post_nms_topk: int,
        nms_thresh: float,
        min_size: float,
        smooth_l1_beta: float,
        loss_weight: float = 1.0,
    ):
        """
        Args:
            head: per-class logits and deltas of every anchor.
            anchor_generator: the anchors of the feature map.
            box_coder: anchor <-> box delta transform.
            positive_iou, negative_iou: IoU thresholds of positive and negative anchors.
            batch_size_per_image, positive_fraction: anchors sampled per image (the paper: 8 at 1:1).
            boundary_thresh: anchors crossing the image border by more than this are ignored in training;
                negative keeps all anchors.
            pre_nms_topk, post_nms_topk: boxes kept per class and image before and after the NMS at inference
                (the paper's R-CNN stage takes the top 200).
            nms_thresh: IoU threshold of the per-class NMS.
            min_size: boxes with a side not larger than this are dropped.
            smooth_l1_beta: transition point of the box loss.
            loss_weight: multiplies both losses.
        """
        super().__init__()
        self.head = head
        self.anchor_generator = anchor_generator
        self.box_coder = box_coder
        self.matcher = Matcher(positive_iou, negative_iou, allow_low_quality_matches=True)
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.batch_size_per_image = batch_size_per_image
        self.boundary_thresh = boundary_thresh
        self.pre_nms_topk = pre_nms_topk
        self.post_nms_topk = post_nms_topk
        self.nms_thresh = nms_thresh
        self.min_size = min_size
        self.smooth_l1_beta = smooth_l1_beta
        self.loss_weight = loss_weight

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def predict(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(N, C_in, H, W) features -> anchors (R, 4), logits (N, R, C), deltas (N, R, C, 4)."""
        logits, deltas = self.head(features)
        anchors = self.anchor_generator(tuple(features.shape[-2:]))  # (H*W*A, 4)
        return anchors, logits, deltas

    def losses(
        self,
        features: Tensor,
        image_sizes: list[tuple[int, int]],
        gt_boxes: list[Tensor],
        gt_classes: list[Tensor],
        image_classes: list[Tensor],
        ignore_boxes: list[Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """
        Args:
            features: (N, C_in, H, W) features of the padded batch.
            image_sizes: (height, width) of each image before padding.
            gt_boxes, gt_classes: per image, the (M_i, 4) boxes in input pixels and their (M_i,) classes.
            image_classes: per image, the (K_i,) classes of the image, also those whose boxes a crop cut away
                (negatives of an image without a box in the crop train one of them).
            ignore_boxes: per image, (I_i, 4) regions (objects a crop cut too much to be targets) whose anchors with
                IoU >= the negative threshold are not sampled as negatives.
        Returns:
            {"loss_rpn_cls", "loss_rpn_loc"}: log loss over the sampled anchors' target-class outputs and smooth L1
            over the positives' target-class deltas, both summed and divided by the anchors sampled per batch.
        """
        anchors, logits, deltas = self.predict(features)
        labels, target_classes, matched_boxes = self.label_and_sample_anchors(
            anchors, gt_boxes, gt_classes, image_classes, image_sizes, ignore_boxes
        )
        normalizer = self.batch_size_per_image * len(image_sizes)
        sampled = labels >= 0  # (N, R)
        # (N, R, C) -> (S,): each sampled anchor's output of its target class
        sampled_logits = logits[sampled].gather(1, target_classes[sampled].unsqueeze(1)).squeeze(1)
        loss_cls = F.binary_cross_entropy_with_logits(sampled_logits, labels[sampled], reduction="sum")
        positive = labels == 1
        # (N, R, C, 4) -> (P, C, 4) -> (P, 4): the deltas of each positive's class
        positive_deltas = deltas[positive][torch.arange(int(positive.sum()), device=deltas.device), target_classes[positive]]
        anchors_of_positives = anchors.unsqueeze(0).expand_as(matched_boxes)[positive]
        targets = self.box_coder.encode_single(matched_boxes[positive], anchors_of_positives)
        loss_loc = F.smooth_l1_loss(positive_deltas, targets, beta=self.smooth_l1_beta, reduction="sum")
        return {
            "loss_rpn_cls": loss_cls * (self.loss_weight / normalizer),
            "loss_rpn_loc": loss_loc * (self.loss_weight / normalizer),
        }

    @torch.no_grad()
    def label_and_sample_anchors(
        self,
        anchors: Tensor,
        gt_boxes: list[Tensor],
        gt_classes: list[Tensor],
        image_classes: list[Tensor],
        image_sizes: list[tuple[int, int]],
        ignore_boxes: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Returns labels (N, R) with 1 = sampled positive, 0 = sampled negative, -1 = not sampled; the class whose
        output each anchor trains (N, R) (meaningful where sampled); and the matched box (N, R, 4) (zeros where
        there is none)."""
        if ignore_boxes is None:
            ignore_boxes = [anchors.new_zeros((0, 4)) for _ in gt_boxes]
        all_labels, all_classes, all_matched = [], [], []
        for boxes, classes, present, ignore, (height, width) in zip(
            gt_boxes, gt_classes, image_classes, ignore_boxes, image_sizes
        ):
            if len(boxes) == 0:
                if len(present) == 0:
                    raise ValueError("an image without any class cannot train the class-specific RPN")
                labels = torch.zeros(len(anchors), dtype=torch.float32, device=anchors.device)
                matched = torch.zeros_like(anchors)
                pick = torch.randint(len(present), (len(anchors),), device=anchors.device)
                target = present.to(anchors.device)[pick]
            else:
                iou = box_iou(boxes, anchors)  # (M, R)
                matches = self.matcher(iou)  # (R,): gt index, or -1 below / -2 between
                labels = (matches >= 0).to(torch.float32)
                labels[matches == Matcher.BETWEEN_THRESHOLDS] = -1.0
                nearest = iou.argmax(dim=0)  # the matched box of a positive; the most overlapped one otherwise
                matched = boxes[nearest]
                target = classes[nearest]
            if len(ignore):
                near_ignored = box_iou(ignore, anchors).max(dim=0).values >= self.matcher.low_threshold
                labels[near_ignored & (labels == 0)] = -1.0
            all_labels.append(
                sample_anchors(
                    labels, anchors, image_size=(height, width), boundary_thresh=self.boundary_thresh,
                    sampler=self.sampler,
                )
            )
            all_classes.append(target.long())
            all_matched.append(matched)
        return torch.stack(all_labels), torch.stack(all_classes), torch.stack(all_matched)

    @torch.no_grad()
    def class_boxes(
        self, features: Tensor, image_sizes: list[tuple[int, int]], classes: list[Tensor]
    ) -> list[dict[str, Tensor]]:
        """Per image, the best boxes of each class of `classes[i]` (K_i,): {"boxes" (D, 4) in input pixels,
        "scores" (D,) probabilities, "labels" (D,)}, at most `post_nms_topk` per class, grouped by class in the
        order of `classes[i]`, best first within a class."""
        anchors, logits, deltas = self.predict(features)
        results = []
        for image_logits, image_deltas, image_classes, image_size in zip(logits, deltas, classes, image_sizes):
            image_classes = image_classes.to(logits.device).long()
            # (R, C) -> (R, K) -> top-k per class: (k, K)
            class_logits = image_logits[:, image_classes]
            top_logits, index = class_logits.topk(min(self.pre_nms_topk, len(anchors)), dim=0)
            column = torch.arange(len(image_classes), device=logits.device).expand_as(index)
            # (R, C, 4) -> (k, K, 4): each kept anchor's deltas for its column's class
            boxes = self.box_coder.decode_single(
                image_deltas[index, image_classes[column]].reshape(-1, 4), anchors[index].reshape(-1, 4)
            )
            boxes = clip_boxes_to_image(boxes, image_size)
            scores = top_logits.reshape(-1).sigmoid()
            results.append(
                select_per_class(
                    boxes, scores, column.reshape(-1), image_classes, nms_thresh=self.nms_thresh,
                    topk=self.post_nms_topk, min_size=self.min_size,
                )
            )
        return results

    @torch.no_grad()
    def image_class_scores(self, features: Tensor) -> Tensor:
        """(N, C): each class's best logistic output over the image's anchors (the RPN as an image classifier)."""
        _, logits, _ = self.predict(features)
        return logits.amax(dim=1).sigmoid()


def select_per_class(
    boxes: Tensor,
    scores: Tensor,
    columns: Tensor,
    classes: Tensor,
    *,
    nms_thresh: float,
    topk: int,
    min_size: float,
) -> dict[str, Tensor]:
    """Per-class NMS and the `topk` best per class.

    Args:
        boxes (D, 4), scores (D,): candidates; columns (D,): each candidate's place in `classes` (K,).
    Returns:
        {"boxes", "scores", "labels" (= classes[column])}, grouped by column (the order of `classes`), best first.
    """
    keep = nonempty_boxes(boxes, min_size) & torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
    boxes, scores, columns = boxes[keep], scores[keep], columns[keep]
    keep = batched_nms(boxes, scores, columns, nms_thresh)  # sorted by score
    boxes, scores, columns = boxes[keep], scores[keep], columns[keep]
    order = torch.sort(columns, stable=True).indices  # by column, still best first within one
    boxes, scores, columns = boxes[order], scores[order], columns[order]
    counts = torch.bincount(columns)  # (max column + 1,): boxes per class
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(columns), device=columns.device) - starts[columns]
    keep = rank < topk
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": classes[columns[keep]]}
