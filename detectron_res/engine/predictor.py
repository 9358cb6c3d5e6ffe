"""Detections for one image: a file path or an array in, boxes in the image's own pixels out.

    predictor = Predictor.from_config(load_config("output/shapes/config.yaml"), "output/shapes/model_final.pth")
    result = predictor("photo.jpg")  # or predictor(array, input_format="BGR") for cv2.imread's arrays
    for box, score, name in zip(result["boxes"], result["scores"], result["class_names"]):
        ...
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch

from ..data.build import build_test_mapper
from ..data.mapper import DatasetMapper, check_image_array, read_image_rgb
from .runner import load_for_inference

logger = logging.getLogger(__name__)

INPUT_FORMATS = ("RGB", "BGR")


class Predictor:
    """Runs a detector in eval mode on single images (detectron2's `DefaultPredictor`)."""

    def __init__(self, model: torch.nn.Module, *, mapper: DatasetMapper, class_names: Sequence[str]):
        """
        Args:
            model: a detector taking mapper dicts and returning {"boxes", "scores", "labels"} in original pixels.
            mapper: the inference mapper (the test-time resize of the config).
            class_names: name of each contiguous class index the model predicts.
        """
        self.model = model.eval()
        self.mapper = mapper
        self.class_names = list(class_names)

    @classmethod
    def from_config(cls, cfg, checkpoint: str | None = None, *, class_names: Sequence[str] | None = None) -> Predictor:
        """The config's model with `checkpoint`'s weights (see `load_for_inference`). Class names come from the
        checkpoint (training stores them) unless given."""
        model, metadata = load_for_inference(cfg, checkpoint)
        if class_names is None:
            class_names = metadata.get("class_names")
        if class_names is None:
            logger.warning("The checkpoint holds no class names; calling the classes class_0..class_%d",
                           cfg.MODEL.NUM_CLASSES - 1)
            class_names = [f"class_{i}" for i in range(cfg.MODEL.NUM_CLASSES)]
        if len(class_names) != cfg.MODEL.NUM_CLASSES:
            raise ValueError(
                f"{len(class_names)} class names for a model with MODEL.NUM_CLASSES={cfg.MODEL.NUM_CLASSES}"
            )
        return cls(model, mapper=build_test_mapper(cfg), class_names=class_names)

    @torch.no_grad()
    def __call__(self, image: str | os.PathLike | np.ndarray, *, input_format: str = "RGB") -> dict:
        """
        Args:
            image: an image file (decoded with OpenCV) or an (H, W, 3) uint8 array; resized by the mapper's
                backend (INPUT.RESIZE_BACKEND: "pil" in the d2 configs gives the pixels of detectron2's
                `DefaultPredictor` given the same image as a BGR array).
            input_format: channel order of an array: "RGB" (PIL, matplotlib) or "BGR" (cv2.imread).
        Returns:
            {"boxes": float32 (D, 4) XYXY in the image's pixels, "scores": float32 (D,), "labels": int64 (D,),
            "class_names": D names}, sorted by descending score.
        Raises:
            FileNotFoundError, IsADirectoryError, BadImageError: a path that is missing, a folder, or not a readable
                image; ValueError: an array that is not (H, W, 3) uint8 with H, W > 0, or an unknown input_format.
        """
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
        if isinstance(image, (str, os.PathLike)):
            image = read_image_rgb(image)
        else:
            check_image_array(image)
            if input_format == "BGR":
                image = np.ascontiguousarray(image[:, :, ::-1])
        inputs = self.mapper.map_image(image)
        (detections,) = self.model([inputs])
        labels = detections["labels"].cpu().numpy().astype(np.int64)
        return {
            "boxes": detections["boxes"].cpu().numpy().astype(np.float32),
            "scores": detections["scores"].cpu().numpy().astype(np.float32),
            "labels": labels,
            "class_names": [self.class_names[i] for i in labels],
        }
