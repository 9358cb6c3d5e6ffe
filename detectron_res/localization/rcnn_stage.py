"""The R-CNN stage (the paper's Appendix C): each RPN box cropped from the image, warped to 224x224 and classified by a
whole ResNet with per-class box regressors, which re-scores and refines the box.

Two forms of its classifier (LOC.RCNN.CLS_LOSS): the paper's "two sibling fc layers for cls and reg, also in a
per-class form" (``sigmoid``, `PerClassLogisticOutputs`): C logistic outputs, each RoI training only the output of the
class it is labelled with, as the class-specific RPN's anchors do; or Fast R-CNN's (C+1)-way softmax (``softmax``,
`FastRCNNOutputLayers`), in which the classes of one box compete.

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
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou, clip_boxes_to_image, roi_align

from ..modeling.roi_heads import FastRCNNOutputLayers

CLS_LOSSES = ("sigmoid", "softmax")


def crop_and_warp(images: Tensor, boxes: list[Tensor], *, size: int, sampling_ratio: int) -> Tensor:
    """(N, 3, H, W) images and per image (P_i, 4) continuous XYXY boxes in its pixels -> (sum P_i, 3, size, size):
    each box's region bilinearly resampled to size x size, `sampling_ratio` points per output pixel and axis
    averaged (0: enough to cover the bin, as an anti-aliased shrink). Pixel i covers [i, i + 1), its value sitting at
    i + 0.5 (``aligned=True``)."""
    return roi_align(
        images, [b.to(images.dtype) for b in boxes], output_size=size, spatial_scale=1.0,
        sampling_ratio=sampling_ratio, aligned=True,
    )


class PerClassLogisticOutputs(nn.Module):
    """The paper's per-class output layers of the R-CNN stage: C logistic outputs (no background) and 4C deltas.

    As the class-specific RPN's anchors, each training RoI trains one class's output: the class of the ground-truth
    box it overlaps most, towards 1 when it overlaps that box by at least the foreground IoU, else towards 0; the
    other classes' outputs get no target. A box's score for class c is then sigmoid(logit_c), independent of the
    other classes (no competition inside a box, unlike a softmax), and on ImageNet, one class per image, nothing
    is learnt about classes absent from an image: which classes are present is the image classifier's question.
    """

    def __init__(self, *, in_channels: int, num_classes: int, box_coder: BoxCoder, smooth_l1_beta: float):
        """
        Args:
            in_channels: length of the pooled feature of a crop.
            num_classes: C object classes (C logistic outputs, C x 4 deltas).
            box_coder: RoI <-> box delta transform (MODEL.ROI_HEADS.BBOX_REG_WEIGHTS).
            smooth_l1_beta: transition point of the box loss.
        """
        super().__init__()
        self.num_classes = num_classes
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)  # Fast R-CNN's initialisation
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        self.box_coder = box_coder
        self.smooth_l1_beta = smooth_l1_beta

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(R, D) pooled features -> logits (R, C), deltas (R, 4C), in float32 also under autocast."""
        return self.cls_score(x).float(), self.bbox_pred(x).float()

    def losses(
        self, logits: Tensor, deltas: Tensor, proposals: Tensor, target_classes: Tensor, foreground: Tensor,
        gt_boxes: Tensor,
    ) -> dict[str, Tensor]:
        """
        Args:
            logits (R, C), deltas (R, 4C): predictions for the batch's RoIs; proposals (R, 4): the RoIs.
            target_classes (R,): the class whose output each RoI trains (-1: none, a RoI of an image without boxes).
            foreground (R,): whether the RoI overlaps that class's box by the foreground IoU (target 1, else 0).
            gt_boxes (R, 4): the box a foreground RoI regresses to.
        Returns:
            "loss_cls": binary log loss of each RoI's target-class output, summed and divided by R; "loss_box_reg":
            smooth L1 of the foreground RoIs' deltas of their class, summed and divided by R (as Fast R-CNN's).
        """
        if len(logits) == 0:  # no RoI at all: keep the graph, contribute nothing
            zero = logits.sum() * 0.0 + deltas.sum() * 0.0
            return {"loss_cls": zero, "loss_box_reg": zero}
        trained = target_classes >= 0
        # (R, C) -> (T,): each RoI's output of its target class
        chosen = logits[trained, target_classes[trained]]
        loss_cls = F.binary_cross_entropy_with_logits(chosen, foreground[trained].float(), reduction="sum")
        positive = foreground & trained
        # (R, 4C) -> (R, C, 4) -> (P, 4): the deltas of each foreground RoI's class
        own = deltas.view(len(deltas), self.num_classes, 4)[positive, target_classes[positive]]
        targets = self.box_coder.encode_single(gt_boxes[positive], proposals[positive])
        loss_box = F.smooth_l1_loss(own, targets, beta=self.smooth_l1_beta, reduction="sum")
        return {"loss_cls": loss_cls / len(logits), "loss_box_reg": loss_box / len(logits)}

    @staticmethod
    def scores(logits: Tensor, labels: Tensor) -> Tensor:
        """(R, C) logits, (R,) classes -> (R,) each box's logistic score for its class."""
        return logits[torch.arange(len(logits), device=logits.device), labels].sigmoid()


def softmax_scores(logits: Tensor, labels: Tensor) -> Tensor:
    """(R, C+1) logits, (R,) classes -> (R,) each box's softmax probability of its class (Fast R-CNN's score)."""
    return F.softmax(logits, dim=1)[torch.arange(len(logits), device=logits.device), labels]


class RCNNLocalizer(nn.Module):
    def __init__(
        self,
        *,
        trunk: nn.Module,
        res5: nn.Module,
        predictor: PerClassLogisticOutputs | FastRCNNOutputLayers,
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
            predictor: the classifier and 4C box regressors on the pooled feature: `PerClassLogisticOutputs` (C
                logistic outputs, the paper's) or `FastRCNNOutputLayers` (a (C+1)-way softmax).
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

    @property
    def cls_loss(self) -> str:
        """"sigmoid" (per-class logistic outputs) or "softmax" ((C+1)-way), from the predictor."""
        return "sigmoid" if isinstance(self.predictor, PerClassLogisticOutputs) else "softmax"

    def checkpoint_mismatch(self, state_dict: dict[str, Tensor]) -> str | None:
        """Why `state_dict` was trained with the other LOC.RCNN.CLS_LOSS (C + 1 outputs against C), or None."""
        weight = state_dict.get("predictor.cls_score.weight")
        if weight is None or weight.dim() != 2:
            return None
        theirs = {self.num_classes: "sigmoid", self.num_classes + 1: "softmax"}.get(int(weight.shape[0]))
        if theirs is None or theirs == self.cls_loss:
            return None
        return (
            f"its R-CNN classifier has {weight.shape[0]} outputs (LOC.RCNN.CLS_LOSS={theirs}) but the model has "
            f"LOC.RCNN.CLS_LOSS={self.cls_loss}; set LOC.RCNN.CLS_LOSS={theirs} to use it"
        )

    def network(self, crops: Tensor) -> tuple[Tensor, Tensor]:
        """(R, 3, S, S) crops -> class logits (R, C) or (R, C+1), box deltas (R, 4C)."""
        features = self.res5(self.trunk(crops))  # (R, 3, S, S) -> (R, C5, S/32, S/32)
        return self.predictor(features.mean(dim=(2, 3)))

    def forward(self, batched_inputs: list[dict]) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if not self.training:
            return self.inference(batched_inputs)
        rois = [x["rois"].to(self.device) for x in batched_inputs]
        classes, foreground, matched = self.label_rois(
            rois, [x["gt_boxes"].to(self.device) for x in batched_inputs], [x["gt_classes"].to(self.device) for x in batched_inputs]
        )
        logits, deltas = self.network(self.crops([x["image"] for x in batched_inputs], rois))
        if isinstance(self.predictor, PerClassLogisticOutputs):
            return self.predictor.losses(logits, deltas, torch.cat(rois), classes, foreground, matched)
        softmax_classes = torch.where(foreground, classes, torch.full_like(classes, self.num_classes))  # C: background
        return self.predictor.losses(logits, deltas, torch.cat(rois), softmax_classes, matched)

    @torch.no_grad()
    def label_rois(
        self, rois: list[Tensor], gt_boxes: list[Tensor], gt_classes: list[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Over the batch: each RoI's class, that of the ground-truth box it overlaps most (-1 in an image without
        boxes) (R,); whether that IoU is >= fg_iou_thresh (R,) (the softmax's background is every other RoI); and
        the box of a foreground RoI (zeros for the others) (R, 4)."""
        all_classes, all_foreground, all_matched = [], [], []
        for image_rois, boxes, classes in zip(rois, gt_boxes, gt_classes):
            target = torch.full((len(image_rois),), -1, dtype=torch.long, device=image_rois.device)
            foreground = torch.zeros(len(image_rois), dtype=torch.bool, device=image_rois.device)
            matched = torch.zeros_like(image_rois)
            if len(boxes):
                iou, nearest = box_iou(image_rois, boxes).max(dim=1)
                target = classes[nearest].long()
                foreground = iou >= self.fg_iou_thresh
                matched[foreground] = boxes[nearest[foreground]]
            all_classes.append(target)
            all_foreground.append(foreground)
            all_matched.append(matched)
        return torch.cat(all_classes), torch.cat(all_foreground), torch.cat(all_matched)

    @torch.no_grad()
    def inference(self, batched_inputs: list[dict]) -> list[dict[str, Tensor]]:
        """Per image {"boxes" (P, 4) refined, "scores" (P,), "labels" (P,)}: each proposal re-scored for its own
        label (its logistic output, or its softmax probability) and regressed with that label's deltas, in the
        pixels of the image it was cropped from."""
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
                per_class = isinstance(self.predictor, PerClassLogisticOutputs)
                scores.append((self.predictor.scores if per_class else softmax_scores)(logits, chunk_labels))
                # (R, 4C) -> (R, C, 4) -> (R, 4): each proposal's deltas of its own class
                own = deltas.view(len(chunk), self.num_classes, 4)[rows, chunk_labels]
                boxes.append(self.predictor.box_coder.decode_single(own, chunk))
            size = (int(image.shape[-2]), int(image.shape[-1]))
            refined = clip_boxes_to_image(torch.cat(boxes), size) if boxes else proposals.new_zeros((0, 4))
            results.append(
                {"boxes": refined, "scores": torch.cat(scores) if scores else proposals.new_zeros((0,)), "labels": labels}
            )
        return results
