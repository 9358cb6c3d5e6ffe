"""Turn one data set record into the model's input: decoded RGB image, resized (and flipped), with its boxes."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would otherwise query PyPI on import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from detectron_res.postprocess.multiscale import pyramid_max_size  # noqa: E402
from detectron_res.structures.boxes import clip_boxes, nonempty_boxes  # noqa: E402

_MIN_BOX_SIDE = 1e-5  # boxes thinner than this (in resized pixels) are dropped, as in detectron2
_TRANSFORM_CACHE_SIZE = 512
RESIZE_BACKENDS = ("opencv", "pil")  # INPUT.RESIZE_BACKEND's values; see `resize_image`


class BadImageError(ValueError):
    """An image file that exists but cannot be used: not decodable, or a JPEG whose data stops early."""


def read_image_rgb(file_name: str | os.PathLike) -> np.ndarray:
    """Decode an image file with OpenCV into an (H, W, 3) uint8 RGB array (EXIF orientation applied).

    A truncated JPEG is an error: OpenCV would decode what is there, fill the rest with grey and only print a
    libjpeg warning (see :func:`jpeg_is_truncated`).

    Raises:
        FileNotFoundError: the file does not exist.
        IsADirectoryError: the path is a folder.
        BadImageError: OpenCV cannot decode it (corrupt or unsupported format), or it is a truncated JPEG.
    """
    path = os.fspath(file_name)
    if os.path.isdir(path):
        raise IsADirectoryError(f"expected an image file, got a folder: {path}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    with open(path, "rb") as stream:
        data = stream.read()
    if jpeg_is_truncated(data):
        raise BadImageError(f"truncated JPEG (its data stops before the end-of-image marker): {path}")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise BadImageError(f"corrupt or unsupported image: {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def jpeg_is_truncated(data: bytes) -> bool:
    """Whether ``data`` is a JPEG stream whose image data ends without the end-of-image marker (FFD9).

    The marker segments are walked by their lengths up to the first start-of-scan (FFDA) of the main image, so an
    EXIF thumbnail's own end marker (inside APP1, before the scan) does not count; after it, the entropy-coded data
    can only hold FF followed by 00 or a restart marker, so the first FFD9 is the real end. Bytes after that end
    (some cameras append data) are fine. Not a JPEG: False.
    """
    if data[:2] != b"\xff\xd8":
        return False
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return False  # not a marker where one must be: corrupt, left to the decoder to reject
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
        elif marker == 0xD9:
            return False
        elif marker == 0xDA:
            return data.find(b"\xff\xd9", position + 2) < 0
        else:
            position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return True  # the headers end before any image data


def resize_shortest_edge_shape(height: int, width: int, *, short_side: int, max_size: int) -> tuple[int, int]:
    """Output (height, width) that scales the shorter side to ``short_side``, capping the longer at ``max_size``.

    Same arithmetic as detectron2's ``ResizeShortestEdge``: the scale in float, sides rounded with
    ``int(x + 0.5)``, but never below 1 pixel: an image of extreme aspect ratio (4x6000) keeps a 1-pixel side where
    detectron2's arithmetic gives 0 and the resize fails.
    """
    scale = short_side / min(height, width)
    if height < width:
        new_height, new_width = float(short_side), scale * width
    else:
        new_height, new_width = scale * height, float(short_side)
    if max(new_height, new_width) > max_size:
        cap = max_size / max(new_height, new_width)
        new_height, new_width = new_height * cap, new_width * cap
    return max(1, int(new_height + 0.5)), max(1, int(new_width + 0.5))


class DatasetMapper:
    """Callable that loads and transforms one record (see ``datasets/base.py``) for the model.

    Training draws the shorter side from ``min_size`` and the flip from the ``rng`` passed in (the training loader
    gives each sample its own generator, seeded from the run's seed and the sample's place in the stream, so a
    resumed run draws the same augmentations); without one, from numpy's global random state. Inference uses
    ``min_size[0]`` and never flips.

    The output dict holds ``image`` (uint8 tensor (3, h, w), RGB), the original ``height`` and ``width``,
    ``image_id``, ``file_name`` and, when the record has an ``annotations`` list, ``gt_boxes`` (float32
    (M, 4) XYXY in the resized image) and ``gt_classes`` (int64 (M,)). Crowd annotations are never targets
    and are left out; boxes that become empty are dropped.

    With ``test_scales`` (inference only: multi-scale testing), it also holds ``pyramid``: the image resized to
    each of those shorter sides, in their order, the longer side capped at ``max_size`` scaled alike
    (`pyramid_max_size`); a scale of the same size as ``image`` is that same tensor.

    ``resize_backend`` (INPUT.RESIZE_BACKEND) picks the resize of every image it outputs: "opencv" (OpenCV's
    bilinear, the default) or "pil" (PIL's bilinear on the uint8 image, detectron2's ``ResizeTransform``: the same
    pixels as detectron2's data loader and ``DefaultPredictor``); see `resize_image`. With "pil", the boxes are
    scaled, flipped and clipped with detectron2's arithmetic (``apply_box``, then clipping to the resized image).
    """

    def __init__(
        self,
        *,
        min_size: int | Sequence[int],
        max_size: int,
        hflip_prob: float = 0.0,
        is_train: bool,
        test_scales: Sequence[int] = (),
        resize_backend: str = "opencv",
    ) -> None:
        sizes = (min_size,) if isinstance(min_size, (int, np.integer)) else tuple(min_size)
        if not sizes or not all(isinstance(size, (int, np.integer)) and size > 0 for size in sizes):
            raise ValueError(f"min_size must be a positive int or a non-empty list of them, got {min_size!r}")
        if not (isinstance(max_size, (int, np.integer)) and max_size > 0):
            raise ValueError(f"max_size must be a positive int, got {max_size!r}")
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob!r}")
        self.min_sizes: tuple[int, ...] = tuple(int(size) for size in sizes)
        self.max_size = int(max_size)
        self.hflip_prob = float(hflip_prob)
        self.is_train = is_train
        if is_train and len(test_scales):
            raise ValueError("test_scales (multi-scale testing) is for inference; use min_size when training")
        if not all(isinstance(scale, (int, np.integer)) and scale > 0 for scale in test_scales):
            raise ValueError(f"test_scales must be positive ints, got {list(test_scales)!r}")
        self.test_scales: tuple[int, ...] = tuple(int(scale) for scale in test_scales)
        if resize_backend not in RESIZE_BACKENDS:
            raise ValueError(f"resize_backend must be one of {list(RESIZE_BACKENDS)}, got {resize_backend!r}")
        self.resize_backend = resize_backend

    def __call__(self, record: dict, *, rng: np.random.Generator | None = None) -> dict:
        file_name = record["file_name"]
        image = read_image_rgb(file_name)
        height, width = image.shape[:2]
        if (height, width) != (record["height"], record["width"]):
            raise BadImageError(
                f"{file_name}: decoded image is {height}x{width} (HxW) but the data set says "
                f"{record['height']}x{record['width']}"
            )

        if self.is_train:
            if rng is None:
                rng = np.random.default_rng(np.random.randint(2**31))  # seeded from numpy's global state
            short_side = self.min_sizes[rng.integers(len(self.min_sizes))]
            flip = self.hflip_prob > 0 and rng.random() < self.hflip_prob
        else:
            short_side, flip = self.min_sizes[0], False
        new_height, new_width = resize_shortest_edge_shape(
            height, width, short_side=short_side, max_size=self.max_size
        )

        annotations = record.get("annotations")
        targets = [ann for ann in annotations or () if not ann.get("iscrowd", 0)]
        given_boxes = np.array([ann["bbox"] for ann in targets], dtype=np.float64).reshape(-1, 4)
        boxes = clip_boxes(given_boxes, height=height, width=width)
        classes = np.array([ann["category_id"] for ann in targets], dtype=np.int64)
        valid = nonempty_boxes(boxes)
        if self.resize_backend == "pil":  # detectron2's order: resize, flip; its boxes from the given ones
            resized = _pil_resize(image, new_height, new_width)
            scale = (new_height / height, new_width / width)
            transformed = {
                "image": resized[:, ::-1] if flip else resized,
                "bboxes": _scale_boxes_like_detectron2(
                    given_boxes[valid], scale=scale, size=(new_height, new_width), flip=flip
                ),
                "class_labels": classes[valid],
            }
        else:
            transformed = _geometric_transform(new_height, new_width, flip)(
                image=image, bboxes=boxes[valid], class_labels=classes[valid]
            )

        output = {
            "image": _to_chw_tensor(transformed["image"]),
            "height": height,
            "width": width,
            "image_id": record["image_id"],
            "file_name": file_name,
        }
        if self.test_scales:
            output["pyramid"] = self._pyramid(image, output["image"])
        if annotations is not None:
            out_boxes = np.asarray(transformed["bboxes"], dtype=np.float32).reshape(-1, 4)
            out_classes = np.asarray(transformed["class_labels"], dtype=np.int64).reshape(-1)
            keep = nonempty_boxes(out_boxes, min_side=_MIN_BOX_SIDE)
            output["gt_boxes"] = torch.from_numpy(np.ascontiguousarray(out_boxes[keep]))
            output["gt_classes"] = torch.from_numpy(np.ascontiguousarray(out_classes[keep]))
        return output


    def map_image(self, image: np.ndarray) -> dict:
        """An already decoded (H, W, 3) uint8 RGB image -> the model input at the inference size.

        The same resize as `__call__` with ``is_train=False``; the dict has no annotations, image_id or file name.
        """
        check_image_array(image)
        height, width = image.shape[:2]
        new_height, new_width = resize_shortest_edge_shape(
            height, width, short_side=self.min_sizes[0], max_size=self.max_size
        )
        resized = resize_image(image, height=new_height, width=new_width, backend=self.resize_backend)
        resized = _to_chw_tensor(resized)
        output = {"image": resized, "height": height, "width": width}
        if self.test_scales:
            output["pyramid"] = self._pyramid(image, resized)
        return output

    def _pyramid(self, image: np.ndarray, resized: torch.Tensor) -> list[torch.Tensor]:
        """The decoded (H, W, 3) image at each test scale as (3, h, w) uint8 tensors; `resized` (the input image)
        where a scale gives its size."""
        height, width = image.shape[:2]
        pyramid = []
        for scale in self.test_scales:
            size = resize_shortest_edge_shape(
                height,
                width,
                short_side=scale,
                max_size=pyramid_max_size(scale, min_size=self.min_sizes[0], max_size=self.max_size),
            )
            same = size == tuple(resized.shape[-2:])
            if same:
                pyramid.append(resized)
            else:
                scaled = resize_image(image, height=size[0], width=size[1], backend=self.resize_backend)
                pyramid.append(_to_chw_tensor(scaled))
        return pyramid


def check_image_array(image: object) -> None:
    """Raises ValueError unless ``image`` is an (H, W, 3) uint8 array with H, W > 0; the message says what it got."""
    shape = getattr(image, "shape", None)
    dtype = getattr(image, "dtype", type(image).__name__)
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
        hint = " (a grayscale image? convert it to 3 channels first)" if isinstance(image, np.ndarray) and image.ndim == 2 else ""
        raise ValueError(f"expected an (H, W, 3) uint8 image array, got shape {shape} and dtype {dtype}{hint}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"the image is empty: {image.shape[0]}x{image.shape[1]} (HxW) pixels")


def resize_image(image: np.ndarray, *, height: int, width: int, backend: str) -> np.ndarray:
    """The (H, W, 3) uint8 image resized to (height, width) with `backend`'s bilinear interpolation.

    "opencv": ``cv2.resize(..., INTER_LINEAR)`` (through albumentations, as the data set images), which samples the
    2x2 pixels around each output pixel's centre also when shrinking. "pil": ``Image.resize((width, height),
    Image.BILINEAR)`` on the uint8 image, which is what detectron2's ``ResizeTransform.apply_image`` calls for
    uint8 images (its ``ResizeShortestEdge``; other dtypes go through ``F.interpolate`` there, which the mapper never
    sees): a triangle filter whose support widens with the shrink factor (antialiased), in fixed point.
    """
    if backend == "pil":
        return _pil_resize(image, height, width)
    if backend == "opencv":
        return _geometric_transform(height, width, False)(image=image, bboxes=[], class_labels=[])["image"]
    raise ValueError(f"resize backend must be one of {list(RESIZE_BACKENDS)}, got {backend!r}")


def _pil_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """detectron2's ``ResizeTransform.apply_image`` for an (H, W, 3) uint8 array: PIL bilinear to (height, width)."""
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((width, height), Image.BILINEAR)
    return np.asarray(resized)


def _scale_boxes_like_detectron2(
    boxes: np.ndarray, *, scale: tuple[float, float], size: tuple[int, int], flip: bool
) -> np.ndarray:
    """(N, 4) XYXY boxes through detectron2's ``ResizeTransform`` then ``HFlipTransform`` (``apply_box``: each
    coordinate times new/old size, x -> width - x, corners re-sorted) and its clipping to the resized image
    (``transform_instance_annotations``), in float64 as there; ``scale`` is (new_h / h, new_w / w), ``size`` the
    resized (height, width)."""
    scale_y, scale_x = scale
    height, width = size
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * np.array([scale_x, scale_y, scale_x, scale_y])
    if flip:
        boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
    return np.minimum(boxes.clip(min=0), np.array([width, height, width, height], dtype=np.float64))


def _to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 array -> contiguous (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


@functools.lru_cache(maxsize=_TRANSFORM_CACHE_SIZE)
def _geometric_transform(height: int, width: int, flip: bool) -> A.Compose:
    """Bilinear resize to (height, width), then an optional horizontal flip, moving 'pascal_voc' boxes along."""
    steps: list[A.BasicTransform] = [A.Resize(height=height, width=width, interpolation=cv2.INTER_LINEAR)]
    if flip:
        steps.append(A.HorizontalFlip(p=1.0))
    return A.Compose(steps, bbox_params=A.BboxParams(format="pascal_voc", label_fields=["class_labels"], clip=True))
