"""The evaluation report (index.html, errors.json) on a hand-made case whose every box's type is worked out by hand:
the per-image error mass and the gallery's order, the per-class table, what is drawn where and in which color, the
placeholder of a missing image, and errors.json against TIDE."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

import cv2
import numpy as np
import pytest

from detectron_res.evaluation import report
from detectron_res.evaluation.coco import run_coco_evaluation
from detectron_res.evaluation.errors import tide_errors

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
IMAGES = [{"id": i, "file_name": name, "width": 200, "height": 160} for i, name in ((1, "a.png"), (2, "b.png"),
                                                                                      (3, "c.png"))]
ANNOTATIONS = [  # id, image, category, box
    (10, 1, 1, [10, 10, 30, 30]), (11, 1, 2, [60, 20, 30, 40]),
    (20, 2, 1, [20, 20, 40, 40]), (21, 2, 2, [5, 100, 20, 20]), (22, 2, 2, [140, 100, 40, 40]),
    (30, 3, 1, [10, 10, 20, 20]),
]
DETECTIONS = [  # and what each is, by hand (TIDE at IoU 0.5 / 0.1)
    (1, 1, [10, 10, 30, 30], 0.9),  # tp of 10
    (1, 1, [60, 20, 30, 40], 0.8),  # cls: IoU 1 with dog 11 (then "fn": unmatched, pointed at)
    (1, 2, [150, 120, 20, 20], 0.6),  # bkg: touches no box
    (2, 1, [22, 22, 40, 40], 0.7),  # tp of 20 (IoU 1444 / 1756 = 0.82)
    (2, 1, [20, 20, 40, 40], 0.5),  # dupe: 20 already matched by the 0.7
    (3, 1, [10, 10, 20, 20], 0.95),  # tp of 30
    (2, 2, [5, 100, 20, 50], 0.2),  # loc: IoU 400 / 1000 = 0.4 with dog 21 ("fn"); 22 is missed outright
]
TYPES = ["tp", "cls", "bkg", "tp", "dupe", "tp", "loc"]
RED, ORANGE, BLUE = np.array([40, 40, 230]), np.array([0, 140, 255]), np.array([215, 120, 30])  # BGR


@pytest.fixture()
def case(tmp_path):
    gt = {"images": IMAGES, "categories": CATEGORIES, "annotations": [
        {"id": i, "image_id": image, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
        for i, image, cat, box in ANNOTATIONS]}
    detections = [{"image_id": image, "category_id": cat, "bbox": box, "score": score}
                  for image, cat, box, score in DETECTIONS]
    files = {}
    for image in IMAGES:
        files[image["id"]] = tmp_path / image["file_name"]
        cv2.imwrite(str(files[image["id"]]), np.zeros((160, 200, 3), np.uint8))
    return run_coco_evaluation(gt, detections), files


class Tables(HTMLParser):
    """The cell texts of each table with an id, and every <img> src and <figure> in the gallery."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.sections: list[str] = []
        self._table = self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":  # the details' tables have no id: "#<n>"
            self._table = self.tables.setdefault(attrs.get("id", f"#{len(self.tables)}"), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = ""
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "section":
            self.sections.append(attrs["id"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._table is not None:
            self._table[-1].append(self._cell.strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def rows_of_details(self) -> list[list[str]]:
        return [row for name, rows in self.tables.items() if name.startswith("#") for row in rows]


def decode(src: str) -> np.ndarray:
    assert src.startswith("data:image/jpeg;base64,")
    return cv2.imdecode(np.frombuffer(base64.b64decode(src.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)


def near(pixel: np.ndarray, color: np.ndarray, tolerance: int = 60) -> bool:
    return int(np.abs(pixel.astype(int) - color).max()) <= tolerance


def test_types_and_masses_by_hand(case):
    evaluation, _ = case
    from detectron_res.evaluation.errors import tide_assignment

    assignment = tide_assignment(evaluation.coco_gt, evaluation.detections)
    assert assignment.detection_types == TYPES
    assert assignment.gt_types == {10: "tp", 11: "fn", 20: "tp", 21: "fn", 22: "miss", 30: "tp"}
    images = report.per_image_errors(evaluation, assignment)
    assert [image.image_id for image in images] == [2, 1, 3]  # 0.5 + 0.2 + 2 missed, 0.8 + 0.6 + 1, nothing
    assert [image.error_mass for image in images] == pytest.approx([2.7, 2.4, 0.0])
    assert [index for index, _ in images[0].detections] == [3, 4, 6]  # by score


def test_report_files_tables_and_errors_json(case, tmp_path):
    evaluation, files = case
    errors = report.write_report(tmp_path / "out", evaluation, image_files=files, title="hand-made")
    written = json.loads((tmp_path / "out" / "errors.json").read_text())
    expected = tide_errors(evaluation.coco_gt, evaluation.detections)
    assert written == errors == {"bbox": {**expected, "iou_fg": 0.5, "iou_bg": 0.1}}
    assert written["bbox"]["counts"] == {"cls": 1, "loc": 1, "both": 0, "dupe": 1, "bkg": 1, "miss": 1, "tp": 3,
                                         "gt": 6, "detections": 7}
    page = Tables((tmp_path / "out" / "index.html").read_text())
    header, cat, dog = page.tables["class-table"]
    assert header == ["class", "ground truth", "detections", "AP", "AP50", "tp", "cls", "loc", "both", "dupe", "bkg",
                      "miss"]
    # cat: by score tp tp fp tp fp of 3 boxes: precision interpolated 1 up to recall 2/3, then 0.75: 67 and 34 of
    # COCO's 101 recall thresholds
    assert cat[4] == f"{(67 + 34 * 0.75) / 101 * 100:.1f}" == "91.6"
    assert cat[3] == f"{evaluation.metrics['bbox']['AP-cat']:.1f}"
    assert [cat[0], *cat[1:3], *cat[5:]] == ["cat", "3", "5", "3", "1", "0", "0", "1", "0", "0"]
    assert [dog[0], *dog[1:], ] == ["dog", "3", "2", "0.0", "0.0", "0", "0", "1", "0", "0", "1", "1"]
    bbox = evaluation.metrics["bbox"]  # no box is large (area > 96^2): APl is undefined
    assert page.tables["summary-table"][1] == [f"{bbox[k]:.1f}" for k in ("AP", "AP50", "AP75", "APs", "APm")] + ["n/a"]
    rows = {row[0]: row[2:] for row in page.tables["errors-table"][1:]}
    assert rows == {kind: [str(expected["counts"][kind]), f"{expected['dAP'][kind]:.2f}"] for kind in
                    report.ERROR_TYPES}
    assert len(page.images) == 2 and page.sections == ["image-0", "image-1"]  # the two images with errors
    text = (tmp_path / "out" / "index.html").read_text()
    assert text.index('href="#image-0"') < text.index('id=image-0') and "b.png (image id 2)" in text
    assert "http://" not in text and "https://" not in text.replace('href="https://arxiv.org/abs/2008.08115"', "")


def test_gallery_draws_misses_red_and_only_detections_above_show_score(case, tmp_path, monkeypatch):
    evaluation, files = case
    for show_score, loc_drawn in ((0.3, False), (0.1, True)):
        report.write_report(tmp_path / str(show_score), evaluation, image_files=files, show_score=show_score,
                            gallery_size=1)
        page = Tables((tmp_path / str(show_score) / "index.html").read_text())
        assert len(page.images) == 1  # image 2 only
        picture = decode(page.images[0])
        assert picture.shape == (512, 640, 3)  # enlarged 3.2x to the thumbnail's side
        assert near(picture[384, 576], RED)  # the right edge of the missed dog 22, [140, 100, 40, 40] x 3.2
        assert near(picture[480, 48], ORANGE) == loc_drawn  # the loc detection's bottom edge (150, 15), score 0.2
        assert near(picture[134, 198], BLUE)  # the right edge of the true positive [22, 22, 40, 40]
        assert near(picture[256, 320], np.zeros(3), 10)  # inside no box: the image itself
        assert page.rows_of_details() == [  # every box of image 2, the detections by score whatever show_score
            ["class", "box x y w h", "found"], ["cat", "20.0 20.0 40.0 40.0", "matched"],
            ["dog", "5.0 100.0 20.0 20.0", "missed (a cls or loc error points at it)"],
            ["dog", "140.0 100.0 40.0 40.0", "missed"],
            ["class", "score", "box x y w h", "type"], ["cat", "0.700", "22.0 22.0 40.0 40.0", "tp"],
            ["cat", "0.500", "20.0 20.0 40.0 40.0", "dupe"], ["dog", "0.200", "5.0 100.0 20.0 50.0", "loc"],
        ]


@pytest.mark.parametrize(("side", "shape", "edge"), [(100, (80, 100), (60, 90)), (640, (512, 640), (384, 576))])
def test_thumbnails_are_scaled_with_their_boxes(case, tmp_path, monkeypatch, side, shape, edge):
    """Down to the thumbnail's side, and up to it (at most 4x) so that the labels stay small on a small image."""
    evaluation, files = case
    monkeypatch.setattr(report, "THUMBNAIL_SIDE", side)
    monkeypatch.setattr(report, "_FONT_SCALE", 0.2)  # labels small enough for a 100-pixel thumbnail
    report.write_report(tmp_path / "out", evaluation, image_files=files, gallery_size=1)
    picture = decode(Tables((tmp_path / "out" / "index.html").read_text()).images[0])
    assert picture.shape == (*shape, 3)
    assert near(picture[edge], RED)  # the missed box's right edge at the scale (0.5, 3.2)
    assert near(picture[edge[0], edge[1] - 8], np.zeros(3), 25)  # inside it: the image (JPEG ringing)


def test_a_missing_image_is_drawn_on_grey_with_the_reason(case, tmp_path):
    evaluation, files = case
    files = {**files, 2: tmp_path / "gone.png"}
    report.write_report(tmp_path / "out", evaluation, image_files=files, gallery_size=1)
    picture = decode(Tables((tmp_path / "out" / "index.html").read_text()).images[0])
    assert picture.shape == (512, 640, 3)  # the ground truth's size, x3.2 to the thumbnail's side
    assert near(picture[256, 320], np.full(3, 200), 10)
    assert near(picture[384, 576], RED)


def test_no_errors_no_gallery_and_bad_arguments(case, tmp_path):
    evaluation, files = case
    perfect = run_coco_evaluation(evaluation.coco_gt, [d for d, kind in zip(evaluation.detections, TYPES)
                                                       if kind == "tp"], img_ids=[3])
    report.write_report(tmp_path / "out", perfect, image_files=files)
    text = (tmp_path / "out" / "index.html").read_text()
    assert "No image has an error." in text and "<img" not in text
    with pytest.raises(ValueError, match="gallery_size must be >= 0, got -1"):
        report.write_report(tmp_path / "bad", evaluation, gallery_size=-1)
    with pytest.raises(ValueError, match=r"show_score must be in \[0, 1\], got 1.5"):
        report.write_report(tmp_path / "bad", evaluation, show_score=1.5)
    assert not (tmp_path / "bad").exists()
