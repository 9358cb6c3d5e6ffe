"""The C4 RoI head (detectron2's `Res5ROIHeads`): pool 14x14 from res4 per RoI, run res5, average, predict; with
global context (the paper's Appendix B), each RoI's feature is concatenated with the feature of its whole image.

Training samples RoIs per image from the proposals (plus the ground-truth boxes): foreground at IoU >= 0.5 with a
ground-truth box, background below, at most 25% foreground.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.ops import box_area, box_iou
from torchvision.ops._utils import convert_boxes_to_roi_format

from ...layers import ROIPooler
from ...postprocess import adjacent_scale_pairs, detection_candidates, select_detections
from ..test_time import FeaturePyramid, TestTimeAugmentation
from .fast_rcnn import FastRCNNOutputLayers

# outside training on the CPU, RoIs are pooled and run through res5 in chunks of pooled features up to this size
INFERENCE_CHUNK_BYTES = 48 << 20


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
        global_context: bool = False,
        inference_chunk: int | None = None,
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
            global_context: the whole (un-padded) image is one more RoI per image, pooled from the same res4 map
                (the paper's single-level spatial pyramid pooling of the full image) and run through the same res5;
                its averaged feature is concatenated with each of the image's RoI features, so the predictor's
                input is twice res5's width.
            inference_chunk: outside training, pool and run res5 on this many RoIs at a time (0: all at once).
                None: decided by the device of the features at each call (`chunk_size`), so that a model moved
                between devices after it was built follows the device it runs on. On the CPU, chunks whose buffers
                stay small are reused by the allocator instead of being mapped and page-faulted afresh (R50-C4: 300
                RoIs pool to 240 MB; docs/benchmarks.md); the results are the same.
        """
        super().__init__()
        self.pooler = pooler
        self.res5 = res5
        self.predictor = predictor
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh_lo = bg_iou_thresh_lo
        self.proposal_append_gt = proposal_append_gt
        self.global_context = global_context
        self.inference_chunk = inference_chunk

    @property
    def num_classes(self) -> int:
        return self.predictor.num_classes

    def box_features(self, features: Tensor, boxes: list[Tensor], image_sizes: list[tuple[int, int]]) -> Tensor:
        """res4 features (N, C4, H, W) and per-image boxes in input pixels -> one feature per box: (sum R_i, C5), or
        (sum R_i, 2 C5) with global context, each row [the box's feature, its image's whole-image feature]."""
        if not self.global_context:
            return self.res5_features(features, convert_boxes_to_roi_format(boxes))
        # one res5 pass over each image's RoIs followed by its whole-image RoI: (R + N, C4, 14, 14) -> (R + N, C5)
        with_images = [
            torch.cat([b, b.new_tensor([[0.0, 0.0, float(w), float(h)]])]) for b, (h, w) in zip(boxes, image_sizes)
        ]
        x = self.res5_features(features, convert_boxes_to_roi_format(with_images))
        counts = torch.tensor([len(b) for b in boxes], device=x.device)
        is_image = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        is_image[torch.cumsum(counts + 1, dim=0) - 1] = True  # the last row of each image
        box_features, image_features = x[~is_image], x[is_image]  # (R, C5), (N, C5)
        return torch.cat([box_features, image_features.repeat_interleave(counts, dim=0)], dim=1)

    def chunk_size(self, features: Tensor) -> int:
        """RoIs per res5 pass outside training on these res4 features (N, C4, H, W): `inference_chunk` when set;
        else on the CPU as many as pool to INFERENCE_CHUNK_BYTES of float32 (C4, S, S) features (at least 1), and
        0 (all at once) on GPUs, where the CPU's reason (big buffers mapped and page-faulted afresh at each call)
        does not hold: CUDA's caching allocator keeps them."""
        if self.inference_chunk is not None:
            return self.inference_chunk
        if features.device.type != "cpu":
            return 0
        height, width = self.pooler.output_size
        pooled_bytes = features.shape[1] * height * width * 4
        return max(1, INFERENCE_CHUNK_BYTES // pooled_bytes)

    def res5_features(self, features: Tensor, rois: Tensor) -> Tensor:
        """(R, 5) rows [image index, x1, y1, x2, y2] -> (R, C4, 14, 14) pooled -> res5 (R, C5, 7, 7) -> averaged
        (R, C5); outside training `chunk_size` RoIs at a time."""
        chunk = 0 if self.training else self.chunk_size(features)
        parts = rois.split(chunk) if chunk > 0 and len(rois) else [rois]
        return torch.cat([self.res5(self.pooler(features, part)).mean(dim=(2, 3)) for part in parts])

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
            logits, deltas = self.predictor(self.box_features(features, proposals, image_sizes))
            return self.predictor.inference(logits, deltas, proposals, image_sizes), {}
        if gt_boxes is None or gt_classes is None:
            raise ValueError("Res5ROIHeads needs gt_boxes and gt_classes in training mode")
        rois, roi_classes, roi_gt_boxes = self.label_and_sample_proposals(proposals, gt_boxes, gt_classes)
        logits, deltas = self.predictor(self.box_features(features, rois, image_sizes))
        losses = self.predictor.losses(
            logits, deltas, torch.cat(rois), torch.cat(roi_classes), torch.cat(roi_gt_boxes)
        )
        return [], losses

    # ---------------------------------------------------------------------------------------- test time (Appendix B)
    def pyramid_box_features(
        self,
        pyramid: FeaturePyramid,
        boxes: list[Tensor],
        image_sizes: list[tuple[int, int]],
        *,
        flipped: bool = False,
        reference_size: int = 224,
    ) -> Tensor:
        """`box_features` for per-image boxes in input pixels, each pooled at its two adjacent pyramid scales
        (`adjacent_scale_pairs`; both the same with one scale) and merged by element-wise max (maxout).
        With `flipped`, pooled from the mirrored images' maps. (sum R_i, C) -> the features in box order."""
        areas = torch.cat([box_area(b) for b in boxes])  # (R,) in input pixels
        scale_areas = []  # per scale: (R,) areas at that scale, from each image's own x and y factors there
        for sizes in pyramid.scale_sizes:
            factors = [(h_s / h) * (w_s / w) for (h, w), (h_s, w_s) in zip(image_sizes, sizes)]
            scale_areas.append(areas * torch.cat([areas.new_full((len(b),), f) for b, f in zip(boxes, factors)]))
        pairs = adjacent_scale_pairs(torch.stack(scale_areas, dim=1), reference_area=float(reference_size) ** 2)
        lower = upper = None
        counts = [len(b) for b in boxes]
        for index in pairs.unique().tolist() or [0]:
            rows = (pairs == index).any(dim=1)  # (R,) the RoIs pooled at this scale
            level = pyramid(index, flipped)
            level_boxes = [
                _to_scale(b[r], size, level_size, flipped)
                for b, r, size, level_size in zip(boxes, rows.split(counts), image_sizes, level.image_sizes)
            ]
            features = self.box_features(level.features, level_boxes, level.image_sizes)  # (rows, C)
            if lower is None:
                lower = features.new_empty((len(rows), features.shape[1]))
                upper = features.new_empty((len(rows), features.shape[1]))
            lower[pairs[:, 0] == index] = features[pairs[rows, 0] == index]
            upper[pairs[:, 1] == index] = features[pairs[rows, 1] == index]
        return torch.maximum(lower, upper)

    def predict(
        self,
        pyramid: FeaturePyramid,
        boxes: list[Tensor],
        image_sizes: list[tuple[int, int]],
        *,
        flip: bool = False,
        reference_size: int = 224,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Class probabilities (R_i, K) and class-specific boxes (R_i, K, 4) in input pixels for each image's
        boxes, from the pyramid's maxout features; with `flip`, the average of the unflipped and the mirrored
        predictions (the mirrored boxes mapped back)."""
        counts = [len(b) for b in boxes]
        view_probs, view_boxes = [], []  # per view: (R, K) and (R, K, 4)
        for flipped in (False, True) if flip else (False,):
            features = self.pyramid_box_features(
                pyramid, boxes, image_sizes, flipped=flipped, reference_size=reference_size
            )
            logits, deltas = self.predictor(features)
            view_probs.append(F.softmax(logits, dim=1)[:, : self.num_classes])  # background dropped
            decoded = []
            for image_deltas, image_boxes, size in zip(deltas.split(counts), boxes, image_sizes):
                if flipped:  # decode against the mirrored box, clip, mirror back
                    predicted = self.predictor.predict_boxes(image_deltas, _mirror(image_boxes, size[1]), size)
                    decoded.append(_mirror(predicted.view(-1, 4), size[1]).view(predicted.shape))
                else:
                    decoded.append(self.predictor.predict_boxes(image_deltas, image_boxes, size))
            view_boxes.append(torch.cat(decoded))
        probs = torch.stack(view_probs).mean(dim=0)
        predicted_boxes = torch.stack(view_boxes).mean(dim=0)
        return list(probs.split(counts)), list(predicted_boxes.split(counts))

    def detection_candidates(
        self,
        pyramid: FeaturePyramid,
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        test_time: TestTimeAugmentation,
    ) -> list[dict[str, Tensor]]:
        """Per image, every (RoI, class) pair scoring above the predictor's threshold: {"boxes" (C, 4), "scores"
        (C,), "labels" (C,)} in input pixels, before the NMS. With box refinement, the pairs of both passes: the
        second pools each RoI's first-pass box of its top-scoring class (one more box per RoI, so the cost of the
        head doubles at most, the paper's 300 + 300 predictions)."""
        options = {"flip": test_time.flip, "reference_size": test_time.reference_size}
        return refined_candidates(
            lambda boxes: self.predict(pyramid, boxes, image_sizes, **options),
            proposals,
            refine=test_time.refine_nms_thresh is not None,
            score_thresh=self.predictor.score_thresh,
            empty_boxes=self.predictor.empty_boxes,
        )

    def select_detections(
        self, candidates: list[dict[str, Tensor]], test_time: TestTimeAugmentation
    ) -> list[dict[str, Tensor]]:
        """Per image: per-class NMS of the candidates (at the refinement's IoU when refining, else the
        predictor's), the best `detections_per_image`, and box voting over all candidates when on."""
        nms_thresh = test_time.refine_nms_thresh
        if nms_thresh is None:
            nms_thresh = self.predictor.nms_thresh
        detections = []
        for c in candidates:
            found = select_detections(
                c["boxes"],
                c["scores"],
                c["labels"],
                nms_thresh=nms_thresh,
                max_detections=self.predictor.detections_per_image,
                vote_iou_thresh=test_time.vote_iou_thresh,
            )
            detections.append(dict(zip(("boxes", "scores", "labels"), found)))
        return detections

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


def refined_candidates(
    predict: Callable[[list[Tensor]], tuple[list[Tensor], list[Tensor]]],
    proposals: list[Tensor],
    *,
    refine: bool,
    score_thresh: float,
    empty_boxes: str,
) -> list[dict[str, Tensor]]:
    """The candidates of `Res5ROIHeads.detection_candidates` from any per-RoI predictor: `predict(boxes)` gives
    class probabilities (R_i, K) and class-specific boxes (R_i, K, 4) for per-image boxes (one model's head, or an
    ensemble's per-RoI average). With `refine`, each RoI's predicted box of its top class is predicted again and
    both passes' (RoI, class) pairs are kept."""
    probs, boxes = predict(proposals)
    if refine:
        regressed = [b[torch.arange(len(b), device=b.device), p.argmax(dim=1)] for p, b in zip(probs, boxes)]
        second_probs, second_boxes = predict(regressed)
        probs = [torch.cat(pair) for pair in zip(probs, second_probs)]
        boxes = [torch.cat(pair) for pair in zip(boxes, second_boxes)]
    candidates = []
    for image_probs, image_boxes in zip(probs, boxes):
        found = detection_candidates(image_boxes, image_probs, score_thresh=score_thresh, empty_boxes=empty_boxes)
        candidates.append(dict(zip(("boxes", "scores", "labels"), found)))
    return candidates


def _to_scale(boxes: Tensor, size: tuple[int, int], scaled_size: tuple[int, int], flipped: bool) -> Tensor:
    """(R, 4) boxes in an image of `size` (h, w) -> the same image resized to `scaled_size`, mirrored if
    `flipped`."""
    if scaled_size != size:
        sy, sx = scaled_size[0] / size[0], scaled_size[1] / size[1]
        boxes = boxes * boxes.new_tensor([sx, sy, sx, sy])
    return _mirror(boxes, scaled_size[1]) if flipped else boxes


def _mirror(boxes: Tensor, width: int) -> Tensor:
    """(R, 4) XYXY boxes in an image `width` pixels wide -> their horizontal mirror images."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
