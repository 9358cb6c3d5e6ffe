"""Region Proposal Network on res4 (class-agnostic), as in Faster R-CNN and the ResNet paper's Appendix A.

Training: anchors matched to ground truth at IoU 0.7 / 0.3 (plus each box's best anchors), 256 anchors sampled per
image at 1:1, log loss on objectness and smooth L1 on the deltas of the positives. Proposals: top-k anchors by
objectness, decoded, clipped, NMS at 0.7, top-k again. Proposals carry no gradient (approximate joint training).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.ops import box_iou, clip_boxes_to_image, nms

from ...postprocess import nonempty_boxes
from .anchors import AnchorGenerator


class NonFiniteProposalsError(FloatingPointError):
    """The RPN produced a NaN or infinite box or score in training; `image_index` is the image's place in the batch."""

    def __init__(self, message: str, *, image_index: int):
        super().__init__(message)
        self.image_index = image_index


def sample_anchors(
    labels: Tensor,
    anchors: Tensor,
    *,
    image_size: tuple[int, int],
    boundary_thresh: float,
    sampler: BalancedPositiveNegativeSampler,
) -> Tensor:
    """One image's anchor labels (R,) (1 positive, 0 negative, -1 ignored) -> the sampled ones: anchors crossing the
    (height, width) image by more than `boundary_thresh` pixels are ignored first (a negative threshold keeps them
    all), then `sampler` picks the positives and negatives; every other anchor becomes -1."""
    labels = labels.clone()
    if boundary_thresh >= 0:
        height, width = image_size
        t = boundary_thresh
        inside = (anchors[:, 0] >= -t) & (anchors[:, 1] >= -t) & (anchors[:, 2] < width + t) & (anchors[:, 3] < height + t)
        labels[~inside] = -1.0
    positive, negative = sampler([labels])
    sampled = torch.full_like(labels, -1.0)
    sampled[positive[0].bool()] = 1.0
    sampled[negative[0].bool()] = 0.0
    return sampled


def topk_count(values: Tensor, k: int) -> int | Tensor:
    """min(k, len(values)); while tracing (export), computed in the graph, so that a trace made on a large image
    still runs on one with fewer than k values."""
    if not torch.jit.is_tracing():
        return min(k, values.shape[0])
    return torch._shape_as_tensor(values)[0].clamp(max=k)


def select_proposals(
    scores: Tensor,
    deltas: Tensor,
    anchors: Tensor,
    *,
    clip: Callable[[Tensor], Tensor],
    box_coder: BoxCoder,
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_thresh: float,
    min_size: float,
) -> tuple[Tensor, Tensor]:
    """One image's proposals: its top `pre_nms_topk` anchors by objectness, decoded, clipped by `clip`, without
    empty or non-finite boxes, NMS, the top `post_nms_topk`.

    Args:
        scores (R,), deltas (R, 4), anchors (R, 4): objectness and regression of every anchor.
    Returns:
        proposals (P, 4) by descending objectness, and which of the top-k decoded boxes and scores were finite (K,).
    """
    scores, index = scores.topk(topk_count(scores, pre_nms_topk))
    boxes = box_coder.decode_single(deltas[index], anchors[index])
    finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
    boxes = clip(boxes)
    keep = nonempty_boxes(boxes, min_size) & finite
    boxes, scores = boxes[keep], scores[keep]
    keep = nms(boxes, scores, nms_thresh)[:post_nms_topk]
    return boxes[keep], finite


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 convs for A objectness logits and 4A anchor deltas per feature cell."""

    def __init__(self, *, in_channels: int, head_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, head_channels, kernel_size=3, padding=1)
        self.objectness_logits = nn.Conv2d(head_channels, num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(head_channels, num_anchors * 4, kernel_size=1)
        for layer in (self.conv, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(N, C, H, W) -> objectness (N, A, H, W), deltas (N, 4A, H, W), in float32 also under autocast (the
        losses, box decoding and NMS that follow stay in float32)."""
        x = F.relu(self.conv(features))
        return self.objectness_logits(x).float(), self.anchor_deltas(x).float()


class RPN(nn.Module):
    def __init__(
        self,
        *,
        head: RPNHead,
        anchor_generator: AnchorGenerator,
        box_coder: BoxCoder,
        positive_iou: float,
        negative_iou: float,
        batch_size_per_image: int,
        positive_fraction: float,
        boundary_thresh: float,
        pre_nms_topk: tuple[int, int],
        post_nms_topk: tuple[int, int],
        nms_thresh: float,
        min_size: float,
        smooth_l1_beta: float,
        loss_weight: float = 1.0,
    ):
        """
        Args:
            head: predicts objectness and deltas from the res4 features.
            anchor_generator: the anchors of the res4 map.
            box_coder: anchor <-> box delta transform.
            positive_iou, negative_iou: IoU thresholds of positive and negative anchors.
            batch_size_per_image, positive_fraction: anchors sampled per image for the losses, and the most
                positives among them.
            boundary_thresh: anchors crossing the image border by more than this are ignored in training;
                negative keeps all anchors.
            pre_nms_topk, post_nms_topk: (training, inference) proposals kept before and after NMS, per image.
            nms_thresh: IoU threshold of the proposals' NMS.
            min_size: proposals with a side not larger than this are dropped.
            smooth_l1_beta: transition point of the box loss.
            loss_weight: multiplies both RPN losses.
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

    def forward(
        self, features: Tensor, image_sizes: list[tuple[int, int]], gt_boxes: list[Tensor] | None = None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """
        Args:
            features: (N, C, H, W) res4 features of the padded batch.
            image_sizes: (height, width) of each image before padding.
            gt_boxes: training only: (M_i, 4) ground-truth boxes per image, input pixels.
        Returns:
            proposals: per image, (P_i, 4) boxes sorted by objectness (no gradient);
            losses: {"loss_rpn_cls", "loss_rpn_loc"} in training, else {}.
        """
        objectness, deltas = self.head(features)
        num_images, num_anchors, height, width = objectness.shape
        anchors = self.anchor_generator((height, width))  # (H*W*A, 4)
        # (N, A, H, W) -> (N, H, W, A) -> (N, H*W*A)
        objectness = objectness.permute(0, 2, 3, 1).reshape(num_images, -1)
        # (N, A*4, H, W) -> (N, A, 4, H, W) -> (N, H, W, A, 4) -> (N, H*W*A, 4)
        deltas = deltas.view(num_images, num_anchors, 4, height, width).permute(0, 3, 4, 1, 2).reshape(num_images, -1, 4)

        proposals = self.find_top_proposals(anchors, objectness.detach(), deltas.detach(), image_sizes)
        if not self.training:
            return proposals, {}
        if gt_boxes is None:
            raise ValueError("RPN needs gt_boxes in training mode")
        labels, matched_boxes = self.label_and_sample_anchors(anchors, gt_boxes, image_sizes)
        return proposals, self.losses(anchors, objectness, deltas, labels, matched_boxes)

    @torch.no_grad()
    def label_and_sample_anchors(
        self, anchors: Tensor, gt_boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """Returns labels (N, R) with 1 = sampled positive, 0 = sampled negative, -1 = not sampled, and the
        matched ground-truth box (N, R, 4) of every anchor (zeros where there is none)."""
        all_labels, all_matched = [], []
        for boxes, (height, width) in zip(gt_boxes, image_sizes):
            if len(boxes) == 0:
                labels = torch.zeros(len(anchors), dtype=torch.float32, device=anchors.device)
                matched = torch.zeros_like(anchors)
            else:
                matches = self.matcher(box_iou(boxes, anchors))  # (R,): gt index, or -1 below / -2 between
                labels = (matches >= 0).to(torch.float32)
                labels[matches == Matcher.BETWEEN_THRESHOLDS] = -1.0
                matched = boxes[matches.clamp(min=0)]
            all_labels.append(
                sample_anchors(
                    labels, anchors, image_size=(height, width), boundary_thresh=self.boundary_thresh,
                    sampler=self.sampler,
                )
            )
            all_matched.append(matched)
        return torch.stack(all_labels), torch.stack(all_matched)

    def losses(
        self, anchors: Tensor, objectness: Tensor, deltas: Tensor, labels: Tensor, matched_boxes: Tensor
    ) -> dict[str, Tensor]:
        """Objectness log loss over the sampled anchors, smooth L1 over the positives; both summed and divided
        by the number of anchors sampled per batch (detectron2's normalisation)."""
        normalizer = self.batch_size_per_image * labels.shape[0]
        sampled = labels >= 0
        loss_cls = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled], reduction="sum")
        positive = labels == 1  # (N, R)
        anchors_of_positives = anchors.unsqueeze(0).expand_as(matched_boxes)[positive]
        targets = self.box_coder.encode_single(matched_boxes[positive], anchors_of_positives)
        loss_loc = F.smooth_l1_loss(deltas[positive], targets, beta=self.smooth_l1_beta, reduction="sum")
        return {
            "loss_rpn_cls": loss_cls * (self.loss_weight / normalizer),
            "loss_rpn_loc": loss_loc * (self.loss_weight / normalizer),
        }

    @torch.no_grad()
    def find_top_proposals(
        self, anchors: Tensor, objectness: Tensor, deltas: Tensor, image_sizes: list[tuple[int, int]]
    ) -> list[Tensor]:
        """Per image: top-k by objectness, decode, clip, drop empty boxes, NMS, top-k."""
        pre_nms_topk = self.pre_nms_topk[0 if self.training else 1]
        post_nms_topk = self.post_nms_topk[0 if self.training else 1]
        proposals = []
        for image_index, (scores, image_deltas, image_size) in enumerate(zip(objectness, deltas, image_sizes)):
            boxes, finite = select_proposals(
                scores, image_deltas, anchors, clip=partial(clip_boxes_to_image, size=image_size),
                box_coder=self.box_coder, pre_nms_topk=pre_nms_topk, post_nms_topk=post_nms_topk,
                nms_thresh=self.nms_thresh, min_size=self.min_size,
            )
            if self.training and not finite.all():
                raise NonFiniteProposalsError(
                    f"The RPN predicted {int((~finite).sum())} non-finite proposal boxes or scores for image "
                    f"{image_index} of the batch: training has diverged.",
                    image_index=image_index,
                )
            proposals.append(boxes)
        return proposals
