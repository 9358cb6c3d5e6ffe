"""Detections drawn on an image with OpenCV: each box in its class's fixed colour, with a label ("name 0.93") on a
filled background above it (inside the box's top when there is no room above)."""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.5
FONT_THICKNESS = 1
LABEL_PADDING = 2  # pixels around the label's text


def class_color(label: int) -> tuple[int, int, int]:
    """A fixed, saturated RGB colour for class `label`: hues a golden-ratio step apart, so that neighbouring class
    indices get distinct colours."""
    hue = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(255 * r), int(255 * g), int(255 * b)


def label_size(text: str) -> tuple[int, int]:
    """(width, height) in pixels of a label's filled background."""
    (width, height), baseline = cv2.getTextSize(text, FONT, FONT_SCALE, FONT_THICKNESS)
    return width + 2 * LABEL_PADDING, height + baseline + 2 * LABEL_PADDING


def draw_detections(
    image: np.ndarray,
    result: Mapping[str, np.ndarray],
    class_names: Sequence[str],
    score_thr: float = 0.5,
    *,
    thickness: int = 2,
) -> np.ndarray:
    """
    Args:
        image: (H, W, 3) uint8 RGB image (not modified).
        result: {"boxes" (D, 4) XYXY in the image's pixels, "scores" (D,), "labels" (D,)}, e.g. a `Predictor`'s.
        class_names: the name of each class index.
        score_thr: detections scoring below this are not drawn.
        thickness: box line width in pixels.
    Returns:
        a copy of the image with the detections drawn, lowest score first (the best on top).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"draw_detections needs an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    canvas = np.ascontiguousarray(image).copy()
    boxes, scores, labels = (np.asarray(result[key]) for key in ("boxes", "scores", "labels"))
    for index in np.argsort(scores, kind="stable"):
        if scores[index] < score_thr:
            continue
        label = int(labels[index])
        color = class_color(label)
        x1, y1, x2, y2 = (int(round(float(v))) for v in boxes[index])
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness)
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        text = f"{name} {float(scores[index]):.2f}"
        width, height = label_size(text)
        top = y1 - height if y1 - height >= 0 else y1  # above the box, or inside its top edge
        cv2.rectangle(canvas, (x1, top), (x1 + width - 1, top + height - 1), color, cv2.FILLED)
        text_color = (0, 0, 0) if sum(color) > 3 * 150 else (255, 255, 255)  # dark text on a light background
        baseline_y = top + height - 1 - LABEL_PADDING - cv2.getTextSize(text, FONT, FONT_SCALE, FONT_THICKNESS)[1]
        cv2.putText(canvas, text, (x1 + LABEL_PADDING, baseline_y), FONT, FONT_SCALE, text_color, FONT_THICKNESS,
                    cv2.LINE_AA)  # fmt: skip
    return canvas
