"""Submissions of the localization pipeline: continuous boxes to the devkit's inclusive pixels (worked out by hand),
the exact text of a small submission, and round trips through the scorer's own readers (``read_submission``,
``read_loc_solution``) down to a zero error for guesses made from the ground truth, on the real val sample too."""

from pathlib import Path

import numpy as np
import pytest
import torch

from detectron_res.data.datasets.imagenet_loc import load_imagenet_loc_csv
from detectron_res.evaluation.imagenet_loc import (
    evaluate_localization,
    evaluate_submission_file,
    read_loc_solution,
    read_submission,
    read_submission_csv,
    read_synsets,
)
from detectron_res.localization.class_predictions import read_class_predictions
from detectron_res.localization.submission import inclusive_boxes, write_submission, write_submission_csv

ZERO = {"top1_loc_err": 0.0, "top5_loc_err": 0.0, "top5_cls_err": 0.0}


def test_a_whole_image_box_becomes_the_last_pixel_indices():
    out = inclusive_boxes(np.array([[0.0, 0.0, 500.0, 375.0]]), width=500, height=375)
    assert out.dtype == np.int64 and out.tolist() == [[0, 0, 499, 374]]


def test_rounding_is_numpys_half_to_even():
    # x1 = round(10.4) = 10; y1 = round(20.6) = 21; x2 = round(30.5) - 1 = 30 - 1 = 29 (30.5 goes to the even 30);
    # y2 = round(40.49) - 1 = 39
    assert inclusive_boxes(np.array([[10.4, 20.6, 30.5, 40.49]]), width=100, height=100).tolist() == [[10, 21, 29, 39]]
    # 11.5 -> 12, 12.5 -> 12, 13.5 -> 14, 14.5 -> 14: x2 = 13, y2 = 13
    assert inclusive_boxes(np.array([[11.5, 12.5, 13.5, 14.5]]), width=100, height=100).tolist() == [[12, 12, 13, 13]]


def test_boxes_beyond_the_image_are_clipped_to_its_pixels():
    boxes = np.array(
        [
            [-20.0, -5.0, 600.0, 400.0],  # over the whole image and beyond
            [510.0, 380.0, 600.0, 400.0],  # wholly right of and below it: its last pixel
            [-100.0, -50.0, -40.0, -10.0],  # wholly left of and above it: pixel (0, 0)
            [490.0, 300.0, 520.0, 376.0],  # over the right and bottom edges
        ]
    )
    assert inclusive_boxes(boxes, width=500, height=375).tolist() == [
        [0, 0, 499, 374],
        [499, 374, 499, 374],
        [0, 0, 0, 0],
        [490, 300, 499, 374],
    ]


def test_degenerate_boxes_become_one_pixel_at_their_first_corner():
    boxes = np.array(
        [
            [100.2, 50.0, 100.3, 50.0],  # rounds to [100, 50, 100, 50): x2 = 99 < x1, y2 = 49 < y1
            [200.0, 100.0, 150.0, 80.0],  # inverted
            [10.0, 10.0, 11.0, 30.0],  # one pixel wide already: x2 = 10
        ]
    )
    assert inclusive_boxes(boxes, width=500, height=375).tolist() == [
        [100, 50, 100, 50],
        [200, 100, 200, 100],
        [10, 10, 10, 29],
    ]


def test_torch_input_empty_input_and_the_inverse_of_the_data_reader():
    boxes = torch.tensor([[10.4, 20.6, 30.5, 40.49]], dtype=torch.float32)
    assert inclusive_boxes(boxes, width=100, height=100).tolist() == [[10, 21, 29, 39]]
    assert inclusive_boxes(np.zeros((0, 4)), width=5, height=5).shape == (0, 4)
    assert inclusive_boxes(torch.zeros(0, 4), width=5, height=5).shape == (0, 4)
    # the data reader maps inclusive (a, b) to continuous (a, b + 1); this undoes it for boxes inside the image
    rng = np.random.default_rng(0)
    x = np.sort(rng.integers(0, 640, size=(100, 2)), axis=1)
    y = np.sort(rng.integers(0, 480, size=(100, 2)), axis=1)
    inclusive = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)
    continuous = inclusive + np.array([0.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(inclusive_boxes(continuous, width=640, height=480), inclusive)


def test_bad_boxes_and_sizes_are_refused():
    with pytest.raises(ValueError, match=r"shape \(G, 4\)"):
        inclusive_boxes(np.zeros((2, 3)), width=5, height=5)
    with pytest.raises(ValueError, match="box 1 has a coordinate that is not finite"):
        inclusive_boxes(np.array([[0.0, 0, 1, 1], [0, np.nan, 1, 1]]), width=5, height=5)
    with pytest.raises(ValueError, match="image size"):
        inclusive_boxes(np.zeros((1, 4)), width=0, height=5)


def small_submission():
    return [
        (np.array([3, 1]), np.array([[0, 2, 99, 19], [1, 2, 3, 4]])),
        (np.array([], dtype=np.int64), np.zeros((0, 4), dtype=np.int64)),  # no guesses: an empty line
        (torch.tensor([2]), torch.tensor([[10, 10, 49, 49]])),
    ]


def test_the_exact_text_of_a_small_submission_and_its_reading_back(tmp_path):
    path = tmp_path / "out" / "submission.txt"
    write_submission(path, small_submission())
    assert path.read_text() == "3 0 2 99 19 1 1 2 3 4\n\n2 10 10 49 49\n"
    assert [p.name for p in path.parent.iterdir()] == ["submission.txt"]  # no temporary file left
    guesses = read_submission(path, num_images=3, num_classes=3)
    for (labels, boxes), (want_labels, want_boxes) in zip(guesses, small_submission()):
        np.testing.assert_array_equal(labels, np.asarray(want_labels))
        np.testing.assert_array_equal(boxes, np.asarray(want_boxes, dtype=np.float64).reshape(-1, 4))
    assert guesses[1][0].shape == (0,) and guesses[1][1].shape == (0, 4)

    write_submission(tmp_path / "empty.txt", [])
    assert (tmp_path / "empty.txt").read_text() == ""
    assert read_submission(tmp_path / "empty.txt", num_images=0, num_classes=3) == []
    # an empty last line still counts as a line: one image without guesses
    write_submission(tmp_path / "none.txt", [(np.zeros(0, dtype=int), np.zeros((0, 4), dtype=int))])
    assert (tmp_path / "none.txt").read_text() == "\n"
    ((labels, boxes),) = read_submission(tmp_path / "none.txt", num_images=1, num_classes=3)
    assert labels.shape == (0,) and boxes.shape == (0, 4)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ((np.arange(1, 7), np.zeros((6, 4), dtype=int)), r"line 2 \(image index 1\): 6 guesses, at most 5"),
        ((np.array([1]), np.array([[10.4, 0.0, 20.0, 5.0]])), r"line 2 \(image index 1\): a box coordinate is not an"),
        ((np.array([0]), np.array([[0, 0, 1, 1]])), r"line 2 \(image index 1\): label 0 is not a 1-based label"),
        ((np.array([1]), np.array([[5, 0, 4, 1]])), r"line 2 \(image index 1\): box \[5, 0, 4, 1\] is not an"),
        ((np.array([1, 2]), np.array([[0, 0, 1, 1]])), r"line 2 \(image index 1\): expected labels \(G,\) and boxes"),
    ],
)
def test_bad_lines_name_their_index_and_nothing_is_written(tmp_path, bad, message):
    path = tmp_path / "submission.txt"
    with pytest.raises(ValueError, match=message):
        write_submission(path, [small_submission()[0], bad])
    assert list(tmp_path.iterdir()) == []


WNIDS = ["n01440764", "n01443537", "n01484850"]


def test_the_csv_form_text_and_its_reading_back_as_ground_truth_and_as_classes(tmp_path):
    path = tmp_path / "submission.csv"
    lines = [
        (np.array([2]), np.array([[10, 10, 49, 49]])),
        (np.array([1, 3]), np.array([[0, 0, 9, 9], [5, 5, 20, 20]])),
    ]
    write_submission_csv(path, ["img_b", "img_a"], lines, wnids=WNIDS)
    assert path.read_text() == (
        "ImageId,PredictionString\nimg_b,n01443537 10 10 49 49\nimg_a,n01440764 0 0 9 9 n01484850 5 5 20 20\n"
    )
    truth = read_loc_solution(path, WNIDS)
    assert list(truth) == ["img_b", "img_a"]  # rows in the given order
    for image_id, (labels, boxes) in zip(["img_b", "img_a"], lines):
        np.testing.assert_array_equal(truth[image_id].labels, labels)
        np.testing.assert_array_equal(truth[image_id].boxes, boxes)
    assert read_class_predictions(path, wnids=WNIDS) == {"img_b": [1], "img_a": [0, 2]}


def test_the_csv_form_with_an_image_without_guesses_and_its_errors(tmp_path):
    path = tmp_path / "submission.csv"
    lines = [(np.array([2]), np.array([[1, 2, 3, 4]])), (np.zeros(0, dtype=int), np.zeros((0, 4), dtype=int))]
    write_submission_csv(path, ["a", "b"], lines, wnids=WNIDS)
    assert path.read_text() == "ImageId,PredictionString\na,n01443537 1 2 3 4\nb,\n"
    # the ground-truth reader wants a box on every row, and so does the class reader (an image without classes
    # would get an empty submission line); the submission reader takes the empty row as no guesses
    with pytest.raises(ValueError, match="line 3: expected groups of 'wnid x1 y1 x2 y2'"):
        read_loc_solution(path, WNIDS)
    with pytest.raises(ValueError, match="line 3: image 'b' has no classes"):
        read_class_predictions(path, wnids=WNIDS)
    guesses = read_submission_csv(path, wnids=WNIDS)
    assert list(guesses) == ["a", "b"]
    assert guesses["a"][0].tolist() == [2] and guesses["a"][1].tolist() == [[1, 2, 3, 4]]
    assert guesses["b"][0].shape == (0,) and guesses["b"][1].shape == (0, 4)

    with pytest.raises(ValueError, match="2 image ids but 1 lines"):
        write_submission_csv(tmp_path / "x.csv", ["a", "b"], lines[:1], wnids=WNIDS)
    with pytest.raises(ValueError, match="image index 1: image id 'a' already at index 0"):
        write_submission_csv(tmp_path / "x.csv", ["a", "a"], lines, wnids=WNIDS)
    with pytest.raises(ValueError, match=r"line 1 \(image index 0\): label 4 is not a 1\.\.3 label"):
        write_submission_csv(tmp_path / "x.csv", ["a"], [(np.array([4]), np.array([[0, 0, 1, 1]]))], wnids=WNIDS)
    assert not (tmp_path / "x.csv").exists()


def test_guesses_made_from_the_ground_truth_score_zero(tmp_path):
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("".join(f"{w} name\n" for w in WNIDS))
    gt = tmp_path / "gt.csv"
    gt.write_text(
        "ImageId,PredictionString\n"
        "img_a,n01440764 0 0 499 374 \n"  # the whole of a 500 x 375 image
        "img_b,n01484850 10 20 30 40 n01484850 5 5 5 5 \n"  # two boxes of one class, one of them a single pixel
        "img_c,n01443537 100 100 199 149 n01440764 0 0 0 0 \n"  # two classes: one guess finds one of them only
    )
    sizes = {"img_a": (500, 375), "img_b": (200, 150), "img_c": (200, 150)}  # width, height
    truth = read_loc_solution(gt, read_synsets(synsets))
    ids = ["img_b", "img_c", "img_a"]
    lines = []
    for image_id in ids:
        t = truth[image_id]
        continuous = t.boxes + np.array([0.0, 0.0, 1.0, 1.0])  # as the data reader holds them
        width, height = sizes[image_id]
        inclusive = inclusive_boxes(continuous, width=width, height=height)
        np.testing.assert_array_equal(inclusive, t.boxes)
        lines.append((t.labels, inclusive))  # every box a guess
    submission = tmp_path / "submission.txt"
    write_submission(submission, lines)
    assert submission.read_text() == "3 10 20 30 40 3 5 5 5 5\n2 100 100 199 149 1 0 0 0 0\n1 0 0 499 374\n"
    image_list = tmp_path / "images.txt"
    image_list.write_text("img_b.JPEG\nimg_c.JPEG\nimg_a.JPEG\n")
    metrics = evaluate_submission_file(submission, ground_truth=gt, synsets=synsets, image_list=image_list)
    # top-1 misses one of img_c's two classes: 0.5 for that image, 0.5 / 3 over the three
    assert metrics == {"loc": {**ZERO, "top1_loc_err": 0.5 / 3, "num_images": 3}}
    guesses = read_submission(submission, num_images=3, num_classes=3)
    single = [truth[i] for i in ids[::2]]  # the images of one class: zero on all three
    assert evaluate_localization(guesses[::2], single) == {"loc": {**ZERO, "num_images": 2}}


def test_the_real_val_samples_records_back_to_a_zero_error_submission(shared_data, tmp_path):
    root = shared_data("ilsvrc2012_val_sample")
    dataset = load_imagenet_loc_csv(root / "LOC_val_solution.csv", root / "images", root / "LOC_synset_mapping.txt")
    truth = read_loc_solution(root / "LOC_val_solution.csv", read_synsets(root / "LOC_synset_mapping.txt"))
    assert len(dataset.records) == 200
    lines, csv_lines, exact = [], [], 0
    for record in dataset.records:
        boxes = np.array([a["bbox"] for a in record["annotations"]], dtype=np.float64).reshape(-1, 4)
        labels = np.array([a["category_id"] + 1 for a in record["annotations"]], dtype=np.int64)
        inclusive = inclusive_boxes(boxes, width=record["width"], height=record["height"])
        t = truth[record["image_id"]]
        if len(t.boxes) == len(inclusive):  # no box dropped by the loader: the file's boxes within the image
            limit = np.array([record["width"], record["height"]] * 2) - 1
            np.testing.assert_array_equal(inclusive, np.clip(t.boxes, 0, limit))
            exact += 1
        first = {}  # each class's first box
        for label, box in zip(labels.tolist(), inclusive):
            first.setdefault(label, box)
        lines.append((np.array(list(first)[:5]), np.array(list(first.values())[:5])))
        csv_lines.append((labels[:5], inclusive[:5]))
    assert exact == 200
    submission = tmp_path / "submission.txt"
    write_submission(submission, lines)
    image_list = tmp_path / "images.txt"
    image_list.write_text("".join(Path(r["file_name"]).name + "\n" for r in dataset.records))
    metrics = evaluate_submission_file(
        submission, ground_truth=root / "LOC_val_solution.csv", synsets=root / "LOC_synset_mapping.txt",
        image_list=image_list,
    )
    assert metrics == {"loc": {**ZERO, "num_images": 200}}
    # the CSV form of the same boxes reads back as the ground truth's (first five) boxes
    csv_path = tmp_path / "submission.csv"
    wnids = dataset.extra["wnids"]
    write_submission_csv(csv_path, [r["image_id"] for r in dataset.records], csv_lines, wnids=wnids)
    back = read_loc_solution(csv_path, wnids)
    for record in dataset.records:
        t = truth[record["image_id"]]
        np.testing.assert_array_equal(back[record["image_id"]].labels, t.labels[:5])
