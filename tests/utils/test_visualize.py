"""utils.visualize: detections are drawn where they are, in their class's colour, and nowhere else."""

import numpy as np
import pytest

from detectron_res.utils.visualize import class_color, draw_detections, label_size

NAMES = ["circle", "square", "triangle"]


def result(boxes, scores, labels):
    return {"boxes": np.array(boxes, dtype=np.float32), "scores": np.array(scores, dtype=np.float32),
            "labels": np.array(labels, dtype=np.int64)}  # fmt: skip


def changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return (before != after).any(axis=2)


def test_changes_only_around_the_boxes_and_their_labels():
    image = np.full((120, 160, 3), 128, dtype=np.uint8)
    detections = result([[30, 40, 90, 100], [100, 10, 150, 60]], [0.9, 0.6], [0, 2])
    drawn = draw_detections(image, detections, NAMES, score_thr=0.5, thickness=2)
    assert drawn is not image and (image == 128).all()  # the input is untouched
    allowed = np.zeros((120, 160), dtype=bool)
    for (x1, y1, x2, y2), text in zip([(30, 40, 90, 100), (100, 10, 150, 60)], ["circle 0.90", "triangle 0.60"]):
        width, height = label_size(text)
        allowed[y1 - 1 : y2 + 2, x1 - 1 : x2 + 2] = True  # the outline (2 px wide, centred on the edges)
        top = y1 - height if y1 - height >= 0 else y1
        allowed[top : top + height, x1 : x1 + width] = True  # the label's background
    diff = changed(image, drawn)
    assert diff.any() and not (diff & ~allowed).any()
    interior = drawn[60:90, 40:80]  # inside the first box, below its label: untouched
    assert (interior == 128).all()
    # the outline is the class's colour: the left edge of box 0 (x = 30) half-way down
    assert tuple(drawn[80, 30]) == class_color(0)
    assert tuple(drawn[60, 120]) == class_color(2)  # the bottom edge of box 1

def test_low_scores_are_not_drawn_and_the_label_goes_inside_at_the_top():
    image = np.zeros((50, 160, 3), dtype=np.uint8)
    drawn = draw_detections(image, result([[5, 5, 40, 40]], [0.3], [1]), NAMES, score_thr=0.5)
    assert (drawn == image).all()
    drawn = draw_detections(image, result([[5, 2, 155, 45]], [0.3], [1]), NAMES, score_thr=0.0)
    width, height = label_size("square 0.30")
    assert tuple(drawn[2 + height - 2, 5 + width - 2]) == class_color(1)  # the label's background, inside the box
    assert not changed(image, drawn)[:1].any()  # nothing above the box's top (y = 2) but the outline's width


def test_class_colours_are_fixed_and_distinct():
    assert class_color(3) == class_color(3)
    assert len({class_color(k) for k in range(80)}) == 80


def test_rejects_a_grey_or_float_image():
    with pytest.raises(ValueError, match="uint8 image"):
        draw_detections(np.zeros((4, 4), dtype=np.uint8), result([], [], []), NAMES)
    with pytest.raises(ValueError, match="uint8 image"):
        draw_detections(np.zeros((4, 4, 3), dtype=np.float32), result([], [], []), NAMES)
