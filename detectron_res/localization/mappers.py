"""Mappers of the localization pipeline: records -> model inputs.

- `LocCropMapper` (RPN stage, training): the classification network's scale augmentation, as the paper trains its
  localization RPN: the shorter side resized to a random length in `scale_range`, a random `crop_size` square crop,
  a random horizontal flip; the boxes follow, and a box the crop cuts to less than `min_visible` of its area leaves
  the targets for ``ignore_boxes`` (anchors on it are not trained as negatives; the classes stay in
  ``image_classes``).
- `RoIMapper` (R-CNN stage, training): the whole image (optionally flipped) with one RoI of the record's pool and
  the ground truth; the model crops and warps the RoI itself, batched.
- `OriginalImageMapper` (inference): the RPN's test input (the detector's test mapper: the whole image at one scale
  or several; or `CenterCropTestMapper`: the central square) plus the decoded image at full resolution, from which
  the R-CNN stage crops.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from ..data.mapper import (
    BadImageError,
    DatasetMapper,
    check_image_array,
    read_image_rgb,
    resize_image,
    resize_shortest_edge_shape,
)
from ..structures.boxes import clip_boxes


def _read_checked(record: dict) -> np.ndarray:
    image = read_image_rgb(record["file_name"])
    height, width = image.shape[:2]
    if (height, width) != (record["height"], record["width"]):
        raise BadImageError(
            f"{record['file_name']}: decoded image is {height}x{width} (HxW) but the data set says "
            f"{record['height']}x{record['width']}"
        )
    return image


def _targets(record: dict) -> tuple[np.ndarray, np.ndarray]:
    annotations = [ann for ann in record.get("annotations") or () if not ann.get("iscrowd", 0)]
    boxes = np.array([ann["bbox"] for ann in annotations], dtype=np.float64).reshape(-1, 4)
    classes = np.array([ann["category_id"] for ann in annotations], dtype=np.int64)
    return clip_boxes(boxes, height=record["height"], width=record["width"]), classes


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def _flip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    flipped = boxes.copy()
    flipped[:, 0], flipped[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return flipped


class LocCropMapper:
    """RPN-stage training sample: a random square crop of a randomly rescaled, randomly flipped image.

    Output: ``image`` uint8 (3, crop, crop), ``gt_boxes`` float32 (M, 4) in the crop, ``gt_classes`` (M,),
    ``ignore_boxes`` (I, 4) (the visible parts of boxes cut below `min_visible`), ``image_classes`` (K,) (every class of the record, whether or not its box survived the crop), and the record's
    ``file_name``, ``image_id``, ``height``, ``width``.
    """

    def __init__(
        self, *, crop_size: int, scale_range: tuple[int, int], hflip_prob: float = 0.5, min_visible: float = 0.5
    ) -> None:
        low, high = (int(v) for v in scale_range)
        if not crop_size <= low <= high:
            raise ValueError(
                f"the scale range {list(scale_range)} must satisfy crop size ({crop_size}) <= low <= high: the crop is "
                "taken from the rescaled image"
            )
        if not 0.0 <= hflip_prob <= 1.0 or not 0.0 < min_visible <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1] and min_visible in (0, 1], got {hflip_prob}, {min_visible}")
        self.crop_size = int(crop_size)
        self.scale_range = (low, high)
        self.hflip_prob = hflip_prob
        self.min_visible = min_visible

    def __call__(self, record: dict, *, rng: np.random.Generator | None = None) -> dict:
        rng = rng if rng is not None else np.random.default_rng(np.random.randint(2**31))
        image = _read_checked(record)
        boxes, classes = _targets(record)
        height, width = image.shape[:2]
        short_side = int(rng.integers(self.scale_range[0], self.scale_range[1] + 1))
        scale = short_side / min(height, width)
        new_h, new_w = max(self.crop_size, round(height * scale)), max(self.crop_size, round(width * scale))
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)  # bilinear
        top = int(rng.integers(new_h - self.crop_size + 1))
        left = int(rng.integers(new_w - self.crop_size + 1))
        image = image[top : top + self.crop_size, left : left + self.crop_size]
        scaled = boxes * np.array([new_w / width, new_h / height] * 2) - np.array([left, top, left, top])
        cropped = clip_boxes(scaled, height=self.crop_size, width=self.crop_size)
        if rng.random() < self.hflip_prob:
            image = image[:, ::-1]
            cropped = _flip_boxes(cropped, self.crop_size)
        # a clipped box is empty when the crop misses it (its side is 0), else has a positive area
        visible_area = (cropped[:, 2] - cropped[:, 0]) * (cropped[:, 3] - cropped[:, 1])
        full_area = (scaled[:, 2] - scaled[:, 0]) * (scaled[:, 3] - scaled[:, 1])
        visible = visible_area > 0
        keep = visible & (visible_area >= self.min_visible * full_area)
        return {
            "image": _chw(image),
            "gt_boxes": torch.from_numpy(cropped[keep].astype(np.float32)),
            "gt_classes": torch.from_numpy(classes[keep]),
            "ignore_boxes": torch.from_numpy(cropped[~keep & visible].astype(np.float32)),
            "image_classes": torch.from_numpy(np.unique(classes)),
            "file_name": record["file_name"],
            "image_id": record["image_id"],
            "height": height,
            "width": width,
        }


class RoIMapper:
    """R-CNN-stage training sample: one RoI of a record of `rcnn_training_records` (a foreground one with probability
    `fg_fraction` when the record has both kinds, else any), with the decoded image, flipped with probability
    `hflip_prob` (RoI and boxes alike): ``image`` uint8 (3, H, W), ``rois`` (1, 4), ``gt_boxes`` (M, 4),
    ``gt_classes`` (M,)."""

    def __init__(self, *, fg_fraction: float = 0.25, hflip_prob: float = 0.5) -> None:
        if not 0.0 <= hflip_prob <= 1.0 or not 0.0 <= fg_fraction <= 1.0:
            raise ValueError(f"fg_fraction and hflip_prob must be in [0, 1], got {fg_fraction}, {hflip_prob}")
        self.fg_fraction = fg_fraction
        self.hflip_prob = hflip_prob

    def pick_roi(self, record: dict, rng: np.random.Generator) -> np.ndarray:
        """The RoI (1, 4) drawn for this sample."""
        rois = np.asarray(record["rois"])
        if len(rois) == 0:
            raise ValueError(f"{record['file_name']}: no RoI for the R-CNN stage")
        foreground = np.asarray(record["roi_foreground"])
        if foreground.any() and (~foreground).any():
            choices = np.flatnonzero(foreground if rng.random() < self.fg_fraction else ~foreground)
        else:
            choices = np.arange(len(rois))
        return rois[choices[rng.integers(len(choices))]].reshape(1, 4)

    def __call__(self, record: dict, *, rng: np.random.Generator | None = None) -> dict:
        rng = rng if rng is not None else np.random.default_rng(np.random.randint(2**31))
        roi = self.pick_roi(record, rng)
        image = _read_checked(record)
        boxes, classes = _targets(record)
        if rng.random() < self.hflip_prob:
            image = image[:, ::-1]
            boxes, roi = _flip_boxes(boxes, record["width"]), _flip_boxes(roi, record["width"])
        return {
            "image": _chw(image),
            "rois": torch.from_numpy(roi.astype(np.float32)),
            "gt_boxes": torch.from_numpy(boxes.astype(np.float32)),
            "gt_classes": torch.from_numpy(classes),
            "file_name": record["file_name"],
            "image_id": record["image_id"],
            "height": record["height"],
            "width": record["width"],
        }


class CenterCropTestMapper:
    """Table 13's "center crop" test of the RPN: the image's shorter side resized to `size` (bilinear, the
    longer side uncapped), then its central `crop_size` square (the top-left corner at round((side - crop) / 2), as
    torchvision's center crop) is the RPN's input. ``window`` is that square's region in the original image's
    pixels, continuous [x1, y1, x2, y2], by which `LocalizationRPN` maps the boxes found in the crop back to the
    original image; nothing outside the square can be found.
    """

    def __init__(self, *, size: int, crop_size: int, resize_backend: str = "opencv") -> None:
        if not 1 <= int(crop_size) <= int(size):
            raise ValueError(f"the center crop ({crop_size}) must be <= the resized shorter side ({size})")
        self.size, self.crop_size, self.resize_backend = int(size), int(crop_size), resize_backend

    def map_image(self, image: np.ndarray) -> dict:
        """An (H, W, 3) uint8 RGB image -> {"image" (3, crop, crop) uint8, "height", "width", "window" (4,)}."""
        check_image_array(image)
        height, width = image.shape[:2]
        new_height, new_width = resize_shortest_edge_shape(height, width, short_side=self.size, max_size=2**31)
        new_height, new_width = max(new_height, self.crop_size), max(new_width, self.crop_size)
        resized = resize_image(image, height=new_height, width=new_width, backend=self.resize_backend)
        top = int(round((new_height - self.crop_size) / 2.0))
        left = int(round((new_width - self.crop_size) / 2.0))
        crop = resized[top : top + self.crop_size, left : left + self.crop_size]
        sx, sy = width / new_width, height / new_height
        window = [left * sx, top * sy, (left + self.crop_size) * sx, (top + self.crop_size) * sy]
        return {
            "image": _chw(crop), "height": height, "width": width, "window": torch.tensor(window, dtype=torch.float64)
        }


class OriginalImageMapper:
    """Inference: `test_mapper`'s output (the RPN's resized input, and its pyramid) plus ``original``, the decoded
    uint8 (3, height, width) image the R-CNN stage crops from; the image is decoded once.

    Any failure to load or resize an image (unreadable, a header that `image_folder_dataset` could not read, a
    resize that fails) is a `BadImageError` naming the file, so that ``DATALOADER.ON_BAD_IMAGE=skip`` skips it.
    """

    def __init__(self, *, test_mapper: DatasetMapper | CenterCropTestMapper) -> None:
        self.test_mapper = test_mapper

    def __call__(self, record: dict) -> dict:
        if record.get("unreadable"):  # image_folder_dataset in skip mode: its header could not be read
            raise BadImageError(record["unreadable"])
        try:
            image = _read_checked(record)
            output = self.test_mapper.map_image(image)
        except (BadImageError, FileNotFoundError, IsADirectoryError):
            raise  # their messages name the file
        except Exception as error:  # e.g. albumentations' pydantic errors, cv2.error: one line, naming the file
            message = " ".join(str(error).split()) or type(error).__name__
            raise BadImageError(
                f"{record['file_name']}: cannot load the image ({type(error).__name__}: {message})"
            ) from error
        output.update(original=_chw(image), image_id=record["image_id"], file_name=record["file_name"])
        return output
