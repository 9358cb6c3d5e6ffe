"""Faster R-CNN C4: ResNet trunk (to res4, once per image) -> RPN -> Res5 RoI head, trained end to end.

Input: a list of mapper dicts, each {"image": uint8 (3, h, w) RGB, already resized by the mapper, "height",
"width": the original size, and in training "gt_boxes" (M, 4) / "gt_classes" (M,) in the resized image}.
Training returns a dict of named losses; inference returns per image {"boxes" (D, 4), "scores" (D,),
"labels" (D,)} with boxes in the ORIGINAL image's pixels. Inference runs in steps that an ensemble can also call
one by one (`prepare`, `propose`, `detection_candidates`, `select_detections`, `rescale`); `test_time` says which of
the paper's test-time add-ons they apply (multi-scale needs the mapper's "pyramid" images in the inputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image

from ..postprocess import nonempty_boxes
from ..structures import batch_images
from .rpn import RPN, NonFiniteProposalsError
from .roi_heads import Res5ROIHeads
from .test_time import FeaturePyramid, ScaledFeatures, TestTimeAugmentation


class PreparedBatch(NamedTuple):
    """A batch after the trunk: res4 features (N, C4, H, W) of the padded batch and each image's input (h, w)."""

    features: Tensor
    image_sizes: list[tuple[int, int]]


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
        input_format: str = "RGB",
        size_divisibility: int = 16,
        test_time: TestTimeAugmentation | None = None,
        channels_last: bool | None = None,
        inference_dtype: torch.dtype | None = None,
    ):
        """
        Args:
            backbone: (N, 3, H, W) normalised images -> (N, C4, H/16, W/16) res4 features.
            rpn: proposals from the res4 features.
            roi_heads: res5 per RoI and the Fast R-CNN outputs.
            pixel_mean, pixel_std: per-channel statistics on the 0-255 scale in `input_format`'s order, the
                pretrained weights' convention.
            input_format: the channel order the trunk takes, "RGB" (torchvision's weights) or "BGR" (MSRA/Caffe
                weights, detectron2's models); the inputs are always RGB and are reversed for "BGR".
            size_divisibility: the padded batch's sides are multiples of this.
            test_time: the test-time add-ons (multi-scale, flip, refinement, voting); default none. An attribute
                that may be changed between evaluations.
            channels_last: outside training, give the trunk its images in channels-last (NHWC) memory format, so
                that every convolution runs on NHWC tensors (oneDNN's fast layout on CPUs; no reordering between
                layers) and the RoI pooler reads the res4 map's channel vectors without a copy. The same results
                to float rounding. None: when the images are on the CPU (`trunk_batch`), decided at each call so
                that a model moved between devices after it was built follows the device it runs on.
            inference_dtype: outside training, run under autocast to this dtype (bfloat16 or float16; None: float32).
                The heads' outputs are float32, so box decoding, scores and NMS stay float32.
        """
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
        self.input_format = input_format
        self.size_divisibility = size_divisibility
        self.test_time = test_time or TestTimeAugmentation()
        self.channels_last = channels_last
        self.inference_dtype = inference_dtype

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def normalize(self, image: Tensor) -> Tensor:
        """uint8 (3, h, w) RGB image -> float (3, h, w) on the model's device in `input_format`'s channel order,
        mean subtracted and divided by std."""
        image = image.to(self.device, non_blocking=True).float()
        if self.input_format == "BGR":
            image = image.flip(0)  # (R, G, B) -> (B, G, R)
        return (image - self.pixel_mean) / self.pixel_std

    def preprocess_images(self, batched_inputs: list[dict]) -> tuple[Tensor, list[tuple[int, int]]]:
        """uint8 (3, h_i, w_i) images -> normalised, zero-padded (N, 3, H, W) batch and the (h_i, w_i)."""
        return self.batch_images([self.normalize(x["image"]) for x in batched_inputs])

    def batch_images(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Normalised (3, h_i, w_i) images -> the zero-padded (N, 3, H, W) batch for the trunk (in
        `trunk_batch`'s memory format) and the (h_i, w_i)."""
        batch, sizes = batch_images(images, size_divisibility=self.size_divisibility)
        return self.trunk_batch(batch), sizes

    def trunk_batch(self, batch: Tensor) -> Tensor:
        """The padded (N, 3, H, W) batch in the trunk's memory format: channels-last outside training when
        `channels_last` is True, or None and the batch is on the CPU. The device is a Python value also under
        `torch.jit.trace`, so an export records the layout of the device it traces on."""
        channels_last = batch.device.type == "cpu" if self.channels_last is None else self.channels_last
        if channels_last and not self.training:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def checkpoint_mismatch(self, state_dict: dict[str, Tensor]) -> str | None:
        """Why `state_dict` was trained with another setting of a model option that decides tensor shapes in a way
        a shape list would not make plain (global context), or None."""
        key = "roi_heads.predictor.cls_score.weight"
        if key not in state_dict or state_dict[key].dim() != 2:
            return None
        own = self.roi_heads.predictor.cls_score.in_features
        theirs = state_dict[key].shape[1]
        res5_width = own // 2 if self.roi_heads.global_context else own
        if theirs == own or theirs not in (res5_width, 2 * res5_width):
            return None
        trained_with = theirs == 2 * res5_width
        return (
            f"it was trained {'with' if trained_with else 'without'} global context (predictor input {theirs}) but "
            f"the model has MODEL.ROI_HEADS.GLOBAL_CONTEXT={'false' if trained_with else 'true'} (input {own}); "
            f"set MODEL.ROI_HEADS.GLOBAL_CONTEXT={'true' if trained_with else 'false'} to use it"
        )

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
        """Detections per image in original image pixels, with the add-ons of `self.test_time`."""
        prepared = self.prepare(batched_inputs)
        proposals = self.propose(prepared)
        candidates = self.detection_candidates(batched_inputs, prepared, proposals)
        return self.rescale(batched_inputs, prepared, self.select_detections(candidates))

    def inference_precision(self) -> torch.autocast:
        """The autocast context of the inference steps: to `inference_dtype` when set, else disabled."""
        dtype = self.inference_dtype or torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.inference_dtype is not None)

    def prepare(self, batched_inputs: list[dict]) -> PreparedBatch:
        """Normalise and pad the input images and run the trunk."""
        images, image_sizes = self.preprocess_images(batched_inputs)
        with self.inference_precision():
            return PreparedBatch(self.backbone(images), image_sizes)

    def propose(self, prepared: PreparedBatch) -> list[Tensor]:
        """The RPN's proposals (R_i, 4) per image, in input pixels (always at the input scale)."""
        with self.inference_precision():
            proposals, _ = self.rpn(prepared.features, prepared.image_sizes)
        return proposals

    def feature_pyramid(self, batched_inputs: list[dict], prepared: PreparedBatch) -> FeaturePyramid:
        """The res4 maps the Fast R-CNN stage pools from: the input scale's, or with multi-scale testing the
        batch's "pyramid" images at each of `test_time.scales` (a scale of the input's size reuses its features),
        and their mirror images for flip testing; each computed when first needed."""
        scales = self.test_time.scales
        if not scales:
            scale_images = [[x["image"] for x in batched_inputs]]
        else:
            for x in batched_inputs:
                found = len(x["pyramid"]) if "pyramid" in x else None
                if found != len(scales):
                    name = x.get("file_name", f"image_id {x.get('image_id', '?')}")
                    raise ValueError(
                        f"Multi-scale testing over the scales {list(scales)} needs the input's 'pyramid' images at "
                        f"those scales, but {name} has {'none' if found is None else found}: build the test mapper "
                        "from the same config (TEST.MULTI_SCALE)"
                    )
            scale_images = [[x["pyramid"][index] for x in batched_inputs] for index in range(len(scales))]
        scale_sizes = [[(int(im.shape[-2]), int(im.shape[-1])) for im in images] for images in scale_images]

        def compute(scale_index: int, flipped: bool) -> ScaledFeatures:
            if not flipped and scale_sizes[scale_index] == prepared.image_sizes:
                return ScaledFeatures(prepared.features, prepared.image_sizes)
            images = [self.normalize(image) for image in scale_images[scale_index]]
            batch, sizes = self.batch_images([image.flip(-1) for image in images] if flipped else images)
            return ScaledFeatures(self.backbone(batch), sizes)

        return FeaturePyramid(scale_sizes=scale_sizes, compute=compute)

    def detection_candidates(
        self, batched_inputs: list[dict], prepared: PreparedBatch, proposals: list[Tensor]
    ) -> list[dict[str, Tensor]]:
        """Per image, every (RoI, class) pair above the score threshold, before the NMS, in input pixels
        ({"boxes", "scores", "labels"}; with box refinement, both passes')."""
        pyramid = self.feature_pyramid(batched_inputs, prepared)
        with self.inference_precision():
            return self.roi_heads.detection_candidates(pyramid, proposals, prepared.image_sizes, self.test_time)

    def select_detections(self, candidates: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Per-class NMS, top-k and (when on) box voting of each image's candidates; input pixels."""
        return self.roi_heads.select_detections(candidates, self.test_time)

    @staticmethod
    def rescale(
        batched_inputs: list[dict], prepared: PreparedBatch, detections: list[dict[str, Tensor]]
    ) -> list[dict[str, Tensor]]:
        """Detections from input pixels to each image's original pixels, clipped, empty boxes dropped."""
        return [
            rescale_detections(d, input_size=size, output_size=(x["height"], x["width"]))
            for d, size, x in zip(detections, prepared.image_sizes, batched_inputs)
        ]
