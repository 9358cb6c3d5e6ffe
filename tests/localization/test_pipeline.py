"""The pieces that join the stages: one box per class, the evaluator (scores like the submission file), the image
folder, the oracle table, the R-CNN training pool and the CSV:IMAGE_DIR data set names."""

import cv2
import numpy as np
import pytest
import torch

from detectron_res.data.datasets import get_dataset
from detectron_res.data.datasets.base import DetectionDataset
from detectron_res.localization.pipeline import (
    LocalizationEvaluator,
    Localizer,
    best_per_class,
    ground_truth_of,
    image_folder_dataset,
    oracle_class_table,
    rcnn_training_records,
)


def test_best_per_class_keeps_the_order_asked_and_gives_a_class_without_boxes_the_whole_image():
    result = {
        "classes": torch.tensor([4, 1, 2]),
        "labels": torch.tensor([4, 4, 1]),
        "scores": torch.tensor([0.3, 0.6, 0.2]),
        "boxes": torch.tensor([[0.0, 0, 5, 5], [1.0, 1, 6, 6], [2.0, 2, 9, 9]]),
    }
    classes, boxes, scores = best_per_class(result, image_size=(20, 30))
    assert classes.tolist() == [4, 1, 2]
    assert boxes.tolist() == [[1, 1, 6, 6], [2, 2, 9, 9], [0, 0, 30, 20]]
    assert scores.tolist() == pytest.approx([0.6, 0.2, 0.0])


def dataset_of(records, num_classes=3):
    return DetectionDataset(
        name="tiny", records=records, class_names=[f"c{i}" for i in range(num_classes)],
        category_ids=list(range(1, num_classes + 1)),
    )


def test_evaluator_scores_the_inclusive_integer_boxes_a_submission_would_hold():
    records = [
        {"image_id": "a", "height": 50, "width": 60,
         "annotations": [{"bbox": [10.0, 10.0, 30.0, 30.0], "category_id": 1}]},
        {"image_id": "b", "height": 50, "width": 60,
         "annotations": [{"bbox": [0.0, 0.0, 20.0, 20.0], "category_id": 0},
                         {"bbox": [30.0, 30.0, 60.0, 50.0], "category_id": 2}]},
    ]
    truth = ground_truth_of(records[1])
    assert truth.labels.tolist() == [1, 3] and truth.boxes.tolist() == [[0, 0, 19, 19], [30, 30, 59, 49]]
    evaluator = LocalizationEvaluator(dataset_of(records))
    inputs = [{"image_id": r["image_id"], "height": 50, "width": 60} for r in records]
    outputs = [
        # image a: class 1 first with a box at IoU (16 x 20) / (20 x 20) = 0.8 after rounding; correct at top-1
        {"classes": torch.tensor([1, 0]), "boxes": torch.tensor([[14.4, 10.0, 30.4, 30.0], [0.0, 0, 5, 5]])},
        # image b: class 0 right (top-1), class 2 only second and its box off: the image's error is the mean
        {"classes": torch.tensor([0, 2]), "boxes": torch.tensor([[0.0, 0, 20, 20], [0.0, 30, 10, 50]])},
    ]
    evaluator.process(inputs, outputs)
    assert evaluator.guesses[0][0].tolist() == [2, 1] and evaluator.guesses[0][1][0].tolist() == [14, 10, 29, 29]
    metrics = evaluator.evaluate()["loc"]
    # top-1: a right; b: class 0 right, class 2 not guessed first -> 0.5. top-5: b's class 2 guessed, box wrong -> 0.5
    assert metrics == {"top1_loc_err": 0.25, "top5_loc_err": 0.25, "top5_cls_err": 0.0, "num_images": 2}


def test_oracle_table_lists_each_images_classes_once_in_order():
    records = [{"image_id": 3, "annotations": [{"category_id": 2}, {"category_id": 0}, {"category_id": 2}]},
               {"image_id": 4, "annotations": []}]
    assert oracle_class_table(dataset_of(records)) == {"3": [2, 0], "4": []}


def test_localizer_takes_the_table_else_the_classifier_else_none():
    table = Localizer(rpn=None, classes={"7": [3, 1, 4, 0, 2, 5]})
    assert table.image_classes({"image_id": 7}) == [3, 1, 4, 0, 2]
    with pytest.raises(ValueError, match="no class predictions for image '8'"):
        table.image_classes({"image_id": 8, "file_name": "x.jpg"})
    assert Localizer(rpn=None, classify=lambda x: [9, 8]).image_classes({"image_id": 1}) == [9, 8]
    assert Localizer(rpn=None).image_classes({"image_id": 1}) is None


def test_image_folder_lists_images_sorted_with_sizes_and_rejects_an_empty_folder(tmp_path):
    for name, (h, w) in {"b.JPEG": (10, 20), "a.png": (7, 5)}.items():
        cv2.imwrite(str(tmp_path / name), np.zeros((h, w, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = image_folder_dataset(tmp_path, class_names=["x"])
    assert [(r["image_id"], r["height"], r["width"]) for r in dataset.records] == [("a", 7, 5), ("b", 10, 20)]
    (tmp_path / "a.jpg").write_bytes((tmp_path / "b.JPEG").read_bytes())
    with pytest.raises(ValueError, match="two images .* have the id 'a'"):
        image_folder_dataset(tmp_path, class_names=["x"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        image_folder_dataset(tmp_path / "empty", class_names=["x"])
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        image_folder_dataset(tmp_path / "absent", class_names=["x"])


class StubRPN:
    """Returns fixed boxes for the classes asked for."""

    def eval(self):
        return self

    def __call__(self, inputs):
        return [
            {"boxes": torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 30, 30]]), "labels": torch.tensor([x["classes"][0]] * 2),
             "scores": torch.tensor([0.9, 0.8])}
            for x in inputs
        ]


def test_rcnn_pool_holds_the_rpn_boxes_and_ground_truth_with_foreground_flags():
    records = [{"image_id": "p", "file_name": "p.jpg", "height": 40, "width": 40,
                "annotations": [{"bbox": [0.0, 0.0, 12.0, 10.0], "category_id": 1}]}]
    loader = [[{"image_id": "p", "height": 40, "width": 40}]]
    pool = rcnn_training_records(StubRPN(), dataset_of(records), loader, fg_iou_thresh=0.5, progress=False)
    (record,) = pool.records
    assert record["rois"].tolist() == [[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 12, 10]]
    assert record["roi_foreground"].tolist() == [True, False, True]  # IoU 100/120, 0, 1
    assert record["annotations"] == records[0]["annotations"]


def test_a_cls_loc_csv_is_named_as_csv_colon_image_dir(tmp_path):
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01 one\nn02 two\n")
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nim1,n02 1 2 10 12 \n")
    (tmp_path / "imgs").mkdir()
    cv2.imwrite(str(tmp_path / "imgs" / "im1.JPEG"), np.zeros((20, 30, 3), np.uint8))
    dataset = get_dataset(f"{tmp_path}/LOC_val_solution.csv:{tmp_path}/imgs", root="unused")
    (record,) = dataset.records
    assert record["annotations"][0]["bbox"] == [1, 2, 11, 13] and record["annotations"][0]["category_id"] == 1
    assert dataset.extra["wnids"] == ["n01", "n02"]
    with pytest.raises(ValueError, match="LOC_\\*_solution.csv:IMAGE_DIR"):
        get_dataset(f"{tmp_path}/LOC_val_solution.csv:", root="unused")


class RankedStubRPN:
    """Finds one box per class with fixed scores: class 0 0.2, class 1 0.9, class 2 0.5."""

    def __call__(self, inputs):
        outputs = []
        for x in inputs:
            classes = torch.tensor(x.get("classes", [0, 1, 2]))
            scores = torch.tensor([0.2, 0.9, 0.5])[classes]
            boxes = torch.tensor([[0.0, 0, 4, 4], [1.0, 1, 5, 5], [2.0, 2, 6, 6]])[classes]
            outputs.append({"classes": classes, "labels": classes, "scores": scores, "boxes": boxes})
        return outputs


def test_without_class_predictions_the_classes_are_ranked_by_their_best_box_else_kept_in_order():
    x = {"image_id": "i", "height": 10, "width": 10}
    (own,) = Localizer(rpn=RankedStubRPN(), classes_per_image=2)([x])
    assert own["classes"].tolist() == [1, 2] and own["scores"].tolist() == pytest.approx([0.9, 0.5])
    assert own["boxes"].tolist() == [[1, 1, 5, 5], [2, 2, 6, 6]]
    (given,) = Localizer(rpn=RankedStubRPN(), classes={"i": [0, 2, 1]}, classes_per_image=2)([x])
    assert given["classes"].tolist() == [0, 2]  # a classifier's order is kept


def test_image_folder_with_unreadable_headers_stops_naming_the_file_or_keeps_their_place_when_skipping(tmp_path):
    """Issue 21, item 13: an empty or header-corrupt image stopped localize.py even with DATALOADER.ON_BAD_IMAGE=skip;
    skipping keeps its record (and so its submission line, left empty) with the reason."""
    cv2.imwrite(str(tmp_path / "b.png"), np.zeros((6, 9, 3), np.uint8))
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "c.JPEG").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")  # a JPEG cut inside its header
    (tmp_path / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 20)  # a PNG signature, then no IHDR
    with pytest.raises(ValueError) as info:
        image_folder_dataset(tmp_path, class_names=["x"])
    message = str(info.value)
    assert message.startswith(f"cannot read the image header of {tmp_path / 'a.png'}: ")
    assert message.endswith(" (DATALOADER.ON_BAD_IMAGE=skip leaves its line empty)") and "\n" not in message
    dataset = image_folder_dataset(tmp_path, class_names=["x"], on_bad_image="skip")
    assert [(r["image_id"], r["height"], r["width"]) for r in dataset.records] == [
        ("a", 0, 0), ("b", 6, 9), ("c", 0, 0), ("d", 0, 0)
    ]
    assert [bool(r.get("unreadable")) for r in dataset.records] == [True, False, True, True]
    for record in dataset.records:
        if record.get("unreadable"):
            assert record["unreadable"].startswith(f"cannot read the image header of {record['file_name']}: ")
