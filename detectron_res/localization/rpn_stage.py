"""The RPN stage: the ResNet trunk (to res4, as the detector's) and the class-specific RPN, trained on random crops
(`LocCropMapper`) and tested fully convolutionally on the whole image, at one scale or several, or on its central
crop (LOC.TEST_MODE; an input's ``window`` says which region of the original image it shows).

Input dicts as the detector's (``image`` uint8 (3, h, w) RGB, ``height``/``width`` of the original); training also
needs ``gt_boxes``, ``gt_classes``, ``image_classes`` (and optionally ``ignore_boxes``). At inference ``classes`` (0-based, best first) says which
classes to localise; without it the RPN's own image-level scores pick the `candidate_classes` best. With a
``pyramid`` (the test mapper's multi-scale images) each scale's boxes are merged before the per-class NMS.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image

from ..modeling.rpn.class_specific_rpn import ClassSpecificRPN, select_per_class
from ..structures import batch_images


class LocalizationRPN(nn.Module):
    def __init__(
        self,
        *,
        backbone: nn.Module,
        rpn: ClassSpecificRPN,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: str = "RGB",
        size_divisibility: int,
        candidate_classes: int,
    ):
        """
        Args:
            backbone: (N, 3, H, W) normalised images -> (N, C4, H/16, W/16) features.
            rpn: the class-specific RPN on those features.
            pixel_mean, pixel_std: per-channel statistics on the 0-255 scale, in `input_format`'s order.
            input_format: the channel order the trunk takes, "RGB" or "BGR" (MSRA/Caffe weights); images are RGB.
            size_divisibility: the padded batch's sides are multiples of this.
            candidate_classes: classes localised per image when the input names none (the RPN's best by image score).
        """
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        self.input_format = input_format
        self.size_divisibility = size_divisibility
        self.candidate_classes = candidate_classes

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def features(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """uint8 (3, h_i, w_i) images -> trunk features of the normalised, padded batch and the (h_i, w_i)."""
        images = [im.flip(0) for im in images] if self.input_format == "BGR" else images  # (RGB) -> (BGR)
        normalised = [(im.to(self.device).float() - self.pixel_mean) / self.pixel_std for im in images]
        batch, sizes = batch_images(normalised, size_divisibility=self.size_divisibility)
        return self.backbone(batch), sizes

    def forward(self, batched_inputs: list[dict]) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if not self.training:
            return self.inference(batched_inputs)
        features, sizes = self.features([x["image"] for x in batched_inputs])
        return self.rpn.losses(
            features,
            sizes,
            [x["gt_boxes"].to(self.device) for x in batched_inputs],
            [x["gt_classes"].to(self.device) for x in batched_inputs],
            [x["image_classes"].to(self.device) for x in batched_inputs],
            [x["ignore_boxes"].to(self.device) if "ignore_boxes" in x else torch.zeros((0, 4), device=self.device)
             for x in batched_inputs],
        )

    @torch.no_grad()
    def inference(self, batched_inputs: list[dict]) -> list[dict[str, Tensor]]:
        """Per image {"boxes" (D, 4) in original pixels, "scores" (D,), "labels" (D,): the best boxes of each class
        asked for, grouped by class in the order of "classes"; "classes" (K,); "class_scores" (C,), the RPN's
        image-level class scores at the input scale}."""
        features, sizes = self.features([x["image"] for x in batched_inputs])
        class_scores = self.rpn.image_class_scores(features)
        classes = [
            torch.as_tensor(x["classes"], dtype=torch.long, device=self.device)
            if "classes" in x
            else scores.topk(min(self.candidate_classes, len(scores))).indices
            for x, scores in zip(batched_inputs, class_scores)
        ]
        num_scales = {len(x["pyramid"]) for x in batched_inputs if "pyramid" in x}
        if not (num_scales and len(num_scales) == 1 and all("pyramid" in x for x in batched_inputs)):
            scale_results = [self._to_original(self.rpn.class_boxes(features, sizes, classes), sizes, batched_inputs)]
        else:  # the boxes of every scale of the pyramid (the input scale's class scores pick the candidates)
            scale_results = []
            for index in range(num_scales.pop()):
                images = [x["pyramid"][index] for x in batched_inputs]
                scale_features, scale_sizes = self.features(images)
                boxes = self.rpn.class_boxes(scale_features, scale_sizes, classes)
                scale_results.append(self._to_original(boxes, scale_sizes, batched_inputs))
        results = []
        for image_index, image_classes in enumerate(classes):
            merged = {key: torch.cat([r[image_index][key] for r in scale_results]) for key in ("boxes", "scores", "labels")}
            if len(scale_results) > 1:
                column = {int(c): k for k, c in enumerate(image_classes.tolist())}
                columns = torch.tensor([column[int(c)] for c in merged["labels"].tolist()], dtype=torch.long)
                merged = select_per_class(
                    merged["boxes"], merged["scores"], columns.to(self.device), image_classes,
                    nms_thresh=self.rpn.nms_thresh, topk=self.rpn.post_nms_topk, min_size=self.rpn.min_size,
                )
            results.append({**merged, "classes": image_classes, "class_scores": class_scores[image_index]})
        return results

    @staticmethod
    def _to_original(
        results: list[dict[str, Tensor]], sizes: list[tuple[int, int]], batched_inputs: list[dict]
    ) -> list[dict[str, Tensor]]:
        """Boxes in an input of size (h, w) -> the original image's pixels: the input shows the input's ``window``
        of the original ([x1, y1, x2, y2], a center crop's) or, without one, the whole image."""
        out = []
        for result, (h, w), x in zip(results, sizes, batched_inputs):
            x1, y1, x2, y2 = (float(v) for v in x["window"]) if "window" in x else (0.0, 0.0, x["width"], x["height"])
            scale = result["boxes"].new_tensor([(x2 - x1) / w, (y2 - y1) / h] * 2)
            boxes = result["boxes"] * scale + result["boxes"].new_tensor([x1, y1, x1, y1])
            out.append({**result, "boxes": clip_boxes_to_image(boxes, (x["height"], x["width"]))})
        return out


def best_per_class(result: dict[str, Tensor], *, image_size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Each class of ``result["classes"]`` (in that order) with its best box, from a result grouped by class:
    (classes (K,), boxes (K, 4), scores (K,)). A class left without any box (all removed as empty) gets the whole
    (height, width) image and score 0, so that it still counts as a class guess."""
    height, width = image_size
    classes = result["classes"].to(result["labels"].device)
    boxes = result["boxes"].new_tensor([0.0, 0.0, width, height]).repeat(len(classes), 1)
    scores = result["scores"].new_zeros(len(classes))
    for k, label in enumerate(classes.tolist()):
        hits = (result["labels"] == label).nonzero().flatten()
        if len(hits):
            best = hits[result["scores"][hits].argmax()]
            boxes[k], scores[k] = result["boxes"][best], result["scores"][best]
    return classes, boxes, scores
