"""The ILSVRC CLS-LOC metric: the devkit's inclusive IoU, top-1 / top-5 with hand-counted errors on the real
validation sample (its ground truth turned into submissions: exact, shifted, relabelled, pushed to rank 6), images
with several classes, and submission files that stop with an error naming the line."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from detectron_res.evaluation.imagenet_loc import (
    LocGroundTruth,
    evaluate_localization,
    evaluate_submission_file,
    format_submission_line,
    image_errors,
    inclusive_iou,
    read_loc_solution,
    read_submission,
    read_synsets,
)

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO.parent / "shared" / "data" / "ilsvrc2012_val_sample"


def test_inclusive_iou_adds_one_pixel_to_widths_and_heights():
    box = np.array([0.0, 0.0, 9.0, 9.0])  # 10 x 10 pixels
    others = np.array([[5.0, 0.0, 14.0, 9.0], [0.0, 0.0, 9.0, 19.0], [10.0, 0.0, 19.0, 9.0]])
    # 5 x 10 shared of 100 + 100: 1/3; 100 shared of 100 + 200: exactly 1/2; touching at x = 9 | 10: nothing
    np.testing.assert_allclose(inclusive_iou(box, others), [1 / 3, 0.5, 0.0])


def test_a_guess_at_iou_one_half_counts_and_several_classes_average():
    truth = LocGroundTruth(labels=np.array([3, 3, 7]), boxes=np.array([[0.0, 0, 9, 9], [50, 50, 59, 59], [0, 0, 9, 19]]))
    # class 3 hit on its second box; class 7's box found at IoU exactly 0.5 but ranked second
    labels = np.array([3, 7])
    boxes = np.array([[50.0, 50, 59, 59], [0.0, 0, 9, 9]])
    assert image_errors(labels, boxes, truth, top=5) == (0.0, 0.0)
    assert image_errors(labels, boxes, truth, top=1) == (0.5, 0.5)  # class 7 missed: the mean of 0 and 1
    # class 7 alone, found at IoU 1/2: class 3 missed, half the image wrong for both errors
    assert image_errors(np.array([7]), np.array([[0.0, 0, 9, 9]]), truth, top=5) == (0.5, 0.5)
    # the right class with a box of IoU 1/3 only: a localization error but not a classification error for class 7
    assert image_errors(np.array([7]), np.array([[5.0, 0, 14, 19]]), truth, top=5) == (1.0, 0.5)


@pytest.fixture
def sample(shared_data):
    root = shared_data("ilsvrc2012_val_sample")
    wnids = read_synsets(root / "LOC_synset_mapping.txt")
    truth = read_loc_solution(root / "LOC_val_solution.csv", wnids)
    ids = sorted(p.stem for p in (root / "images").glob("*.JPEG"))
    return wnids, truth, ids


def truthful_guesses(truth: LocGroundTruth):
    """One guess per ground-truth class: the class and its first box."""
    labels, boxes = [], []
    for label in dict.fromkeys(truth.labels.tolist()):
        labels.append(label)
        boxes.append(truth.boxes[truth.labels == label][0])
    return np.array(labels), np.array(boxes)


def test_the_real_sample_loads_and_its_own_ground_truth_scores_zero(sample):
    wnids, truth, ids = sample
    assert len(wnids) == 1000 and wnids[0] == "n01440764" and len(truth) == 50000 and len(ids) == 200
    first = truth["ILSVRC2012_val_00000001"]
    assert first.labels.tolist() == [wnids.index("n01751748") + 1]  # the sea snake of val image 1
    assert sum(len(truth[i].labels) > 1 for i in ids) > 0  # some images hold several boxes of their class
    metrics = evaluate_localization([truthful_guesses(truth[i]) for i in ids], [truth[i] for i in ids])
    assert metrics == {"loc": {"top1_loc_err": 0.0, "top5_loc_err": 0.0, "top5_cls_err": 0.0, "num_images": 200}}


def test_known_shares_of_shifted_relabelled_and_demoted_guesses(sample, tmp_path):
    wnids, truth, ids = sample
    lines = []
    for n, image_id in enumerate(ids):
        labels, boxes = truthful_guesses(truth[image_id])
        wrong = (labels % 1000) + 1  # another class
        if n < 40:  # the box moved off the image: IoU 0 with every box
            boxes = boxes + 10000.0
        elif n < 70:  # relabelled
            labels = wrong
        elif n < 90:  # five wrong classes first, the right guess sixth: never read
            labels = np.concatenate([[(labels[0] + k) % 1000 + 1 for k in range(1, 6)], labels])
            boxes = np.concatenate([np.repeat(boxes[:1], 5, axis=0), boxes])
        elif n < 100:  # one wrong class first, the right guess second: top-1 misses, top-5 finds it
            labels = np.concatenate([wrong[:1], labels])
            boxes = np.concatenate([boxes[:1], boxes])
        lines.append(format_submission_line(labels, boxes))
    submission = tmp_path / "submission.txt"
    submission.write_text("\n".join(lines) + "\n")
    image_list = tmp_path / "images.txt"
    image_list.write_text("\n".join(f"{i}.JPEG" for i in ids) + "\n")
    metrics = evaluate_submission_file(
        submission, ground_truth=SAMPLE / "LOC_val_solution.csv", synsets=SAMPLE / "LOC_synset_mapping.txt",
        image_list=image_list,
    )
    # top-5 loc: 40 shifted + 30 relabelled + 20 demoted = 90 of 200; classes: 30 + 20; top-1 also the last 10
    assert metrics["loc"] == {"top1_loc_err": 100 / 200, "top5_loc_err": 90 / 200, "top5_cls_err": 50 / 200,
                              "num_images": 200}

    sys.path.insert(0, str(REPO / "tools"))
    import localize

    out = tmp_path / "metrics.json"
    code = localize.main(["--evaluate", "--submission", str(submission), "--gt", str(SAMPLE / "LOC_val_solution.csv"),
                          "--synsets", str(SAMPLE / "LOC_synset_mapping.txt"), "--image-list", str(image_list),
                          "--json-out", str(out)])
    assert code == 0 and json.loads(out.read_text())["loc"]["top5_loc_err"] == 0.45


def write_small_files(tmp_path: Path) -> tuple[Path, Path]:
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("n001 cat\nn002 dog\nn003 fish\n")
    gt = tmp_path / "gt.csv"
    gt.write_text("ImageId,PredictionString\nimg_b,n002 10 10 49 49 \nimg_a,n001 0 0 9 9 n003 5 5 20 20 \n")
    return synsets, gt


def test_without_an_image_list_lines_follow_the_sorted_ids(tmp_path, capsys):
    synsets, gt = write_small_files(tmp_path)
    submission = tmp_path / "sub.txt"
    submission.write_text("1 0 0 9 9 3 5 5 20 20\n2 10 10 49 49\n")  # img_a, then img_b
    metrics = evaluate_submission_file(submission, ground_truth=gt, synsets=synsets)
    assert metrics["loc"] == {"top1_loc_err": 0.25, "top5_loc_err": 0.0, "top5_cls_err": 0.0, "num_images": 2}

    sys.path.insert(0, str(REPO / "tools"))
    import localize

    assert localize.main(["--evaluate", "--submission", str(submission), "--gt", str(gt), "--synsets", str(synsets)]) == 0
    printed = capsys.readouterr().out
    assert "top-1 localization error      25.00 %" in printed and "top-5 localization error       0.00 %" in printed


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("1 0 0 9 9\n", r"1 lines, but there are 2 images"),
        ("1 0 0 9 9\n0 10 10 49 49\n", r"line 2: group 1 has label '0'; labels are the integers 1\.\.3"),
        ("1 0 0 9 9\n4 10 10 49 49\n", r"line 2: group 1 has label '4'"),
        ("1 0 0 9 9 2.5 1 1 2 2\n2 10 10 49 49\n", r"line 1: group 2 has label '2\.5'"),
        ("1 0 0 9 9 2\n2 10 10 49 49\n", r"line 1: 6 numbers, not groups of 5"),
        ("1 0 0 9 x\n2 10 10 49 49\n", r"line 1: not a number"),
    ],
)
def test_malformed_submissions_name_the_line(tmp_path, content, message):
    synsets, gt = write_small_files(tmp_path)
    submission = tmp_path / "sub.txt"
    submission.write_text(content)
    with pytest.raises(ValueError, match=message):
        evaluate_submission_file(submission, ground_truth=gt, synsets=synsets)


def test_only_the_first_five_guesses_are_read(tmp_path):
    path = tmp_path / "sub.txt"
    path.write_text(" ".join(f"{k} 0 0 1 1" for k in (1, 2, 3, 1, 2, 3, 1)) + "\n")
    ((labels, boxes),) = read_submission(path, num_images=1, num_classes=3)
    assert labels.tolist() == [1, 2, 3, 1, 2] and boxes.shape == (5, 4)


def test_malformed_ground_truth_names_the_line(tmp_path):
    synsets, _ = write_small_files(tmp_path)
    bad = tmp_path / "gt.csv"
    bad.write_text("ImageId,PredictionString\nimg_a,n001 0 0 9\n")
    with pytest.raises(ValueError, match=r"gt\.csv, line 2: expected groups of 'wnid x1 y1 x2 y2'"):
        read_loc_solution(bad, read_synsets(synsets))
    bad.write_text("ImageId,PredictionString\nimg_a,n009 0 0 9 9\n")
    with pytest.raises(ValueError, match=r"line 2: wnid 'n009' is not in the synset mapping"):
        read_loc_solution(bad, read_synsets(synsets))


def test_the_submission_line_format():
    line = format_submission_line(np.array([3, 1]), np.array([[0.4, 1.6, 99.5, 20.0], [1.0, 2.0, 3.0, 4.0]]))
    assert line == "3 0 2 100 20 1 1 2 3 4"


def test_localize_tool_errors_are_one_line_and_missing_flags_are_named(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import localize

    synsets, gt = write_small_files(tmp_path)
    submission = tmp_path / "sub.txt"
    submission.write_text("1 0 0 9 9\n0 10 10 49 49\n")
    code = localize.main(["--evaluate", "--submission", str(submission), "--gt", str(gt), "--synsets", str(synsets)])
    assert code == 1
    assert capsys.readouterr().err == (
        f"localize.py: error: {submission}, line 2: group 1 has label '0'; labels are the integers 1..3 of the synset "
        "mapping\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        localize.main(["--submission", str(submission)])
    assert exit_info.value.code == 2 and "writing a submission needs --cfg, --images, --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        localize.main(["--evaluate", "--submission", str(submission)])
    assert "--evaluate needs --gt, --synsets" in capsys.readouterr().err


def test_a_ground_truth_with_an_image_on_several_rows_is_refused_naming_the_ids(tmp_path):
    """Issue 21, item 8: the last row of an image used to win without a word (the image lost its other boxes)."""
    synsets, gt = write_small_files(tmp_path)
    gt.write_text(
        "ImageId,PredictionString\nimg_a,n001 0 0 9 9 \nimg_b,n002 10 10 49 49 \nimg_a,n003 5 5 20 20 \n"
        "img_b,n002 1 1 2 2 \nimg_a,n001 3 3 4 4 \n"
    )
    with pytest.raises(ValueError) as info:
        read_loc_solution(gt, read_synsets(synsets))
    assert str(info.value) == (
        f"{gt}: 2 image ids on several rows: 'img_a' (lines 2, 4, 6), 'img_b' (lines 3, 5); one row per image, with "
        "all its boxes in one PredictionString"
    )


def test_an_image_list_naming_an_image_twice_is_refused(tmp_path):
    """Issue 21, item 9: a repeated id was scored twice, the other image never, its line judged against the wrong
    truth."""
    synsets, gt = write_small_files(tmp_path)
    submission = tmp_path / "sub.txt"
    submission.write_text("1 0 0 9 9\n1 0 0 9 9\n")
    image_list = tmp_path / "images.txt"
    image_list.write_text("img_a\n\nimg_a.JPEG\n")
    with pytest.raises(ValueError) as info:
        evaluate_submission_file(submission, ground_truth=gt, synsets=synsets, image_list=image_list)
    assert str(info.value) == f"{image_list}, line 3: image 'img_a' is already on line 1"


def test_nothing_to_score_is_an_error_not_nan(tmp_path, capsys):
    """Issue 21, item 10: an empty image list with an empty submission printed "nan %" and exited 0."""
    synsets, gt = write_small_files(tmp_path)
    submission = tmp_path / "sub.txt"
    submission.write_text("")
    image_list = tmp_path / "images.txt"
    for text in ("", "\n  \n"):
        image_list.write_text(text)
        with pytest.raises(ValueError) as info:
            evaluate_submission_file(submission, ground_truth=gt, synsets=synsets, image_list=image_list)
        assert str(info.value) == f"{image_list}: no image ids: there is nothing to score"
    header_only = tmp_path / "header_only.csv"
    header_only.write_text("ImageId,PredictionString\n")
    with pytest.raises(ValueError) as info:
        evaluate_submission_file(submission, ground_truth=header_only, synsets=synsets)
    assert str(info.value) == f"{header_only}: no images: there is nothing to score"

    sys.path.insert(0, str(REPO / "tools"))
    import localize

    code = localize.main(["--evaluate", "--submission", str(submission), "--gt", str(gt), "--synsets", str(synsets),
                          "--image-list", str(image_list)])
    captured = capsys.readouterr()
    assert code == 1 and "nan" not in captured.out
    assert captured.err == f"localize.py: error: {image_list}: no image ids: there is nothing to score\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("1 nan 0 9 9\n2 10 10 49 49\n", "line 1: group 1 has the box coordinate 'nan'; box coordinates are finite"),
        ("1 0 0 9 9 3 5 5 inf 20\n2 10 10 49 49\n", "line 1: group 2 has the box coordinate 'inf'; box coordinates"),
        ("1 0 0 9 9\n2 10 10 49 -Infinity\n", "line 2: group 1 has the box coordinate '-Infinity'; box coordinates"),
        ("nan 0 0 9 9\n2 10 10 49 49\n", "line 1: group 1 has label 'nan'; labels are the integers 1..3"),
    ],
)
def test_a_non_finite_box_is_blamed_on_its_coordinate_not_its_label(tmp_path, content, message):
    """Issue 21, item 18: a NaN or infinite coordinate was reported as "group 1 has label '1'"."""
    synsets, gt = write_small_files(tmp_path)
    submission = tmp_path / "sub.txt"
    submission.write_text(content)
    with pytest.raises(ValueError) as info:
        evaluate_submission_file(submission, ground_truth=gt, synsets=synsets)
    assert str(info.value).startswith(f"{submission}, {message}")


BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"  # the start of a PNG file: 0x89 is not UTF-8


@pytest.mark.parametrize(
    ("which", "expected"),
    [
        ("submission", "a submission file (lines of 'label x1 y1 x2 y2' groups)"),
        ("gt", "a CSV 'ImageId,PredictionString' ground truth (LOC_*_solution.csv)"),
        ("synsets", "a synset mapping"),
        ("image_list", "an image list (one image id a line)"),
    ],
)
def test_a_binary_file_is_named_with_what_it_should_be(tmp_path, which, expected):
    """Issue 21, item 18: "'utf-8' codec can't decode byte 0x89 in position 0" named no file."""
    synsets, gt = write_small_files(tmp_path)
    paths = {"synsets": synsets, "gt": gt, "submission": tmp_path / "sub.txt", "image_list": tmp_path / "images.txt"}
    paths["submission"].write_text("1 0 0 9 9 3 5 5 20 20\n2 10 10 49 49\n")
    paths["image_list"].write_text("img_a\nimg_b\n")
    paths[which] = tmp_path / "binary.png"
    paths[which].write_bytes(BINARY)
    with pytest.raises(ValueError) as info:
        evaluate_submission_file(paths["submission"], ground_truth=paths["gt"], synsets=paths["synsets"],
                                 image_list=paths["image_list"])
    assert str(info.value) == f"{paths[which]}: not a UTF-8 text file (byte 0x89 at offset 0); expected {expected}"


def test_files_with_a_utf8_byte_order_mark_read_as_without(tmp_path):
    """Issue 21, item 18: a ground truth saved with a BOM (as spreadsheet programs do) was refused for its header."""
    synsets, gt = write_small_files(tmp_path)
    submission = tmp_path / "sub.txt"
    submission.write_text("1 0 0 9 9 3 5 5 20 20\n2 10 10 49 49\n")
    image_list = tmp_path / "images.txt"
    image_list.write_text("img_a\nimg_b\n")
    expected = {"top1_loc_err": 0.25, "top5_loc_err": 0.0, "top5_cls_err": 0.0, "num_images": 2}
    for path in (gt, synsets, submission, image_list):
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert read_synsets(synsets) == ["n001", "n002", "n003"]
    assert sorted(read_loc_solution(gt, ["n001", "n002", "n003"])) == ["img_a", "img_b"]
    metrics = evaluate_submission_file(submission, ground_truth=gt, synsets=synsets, image_list=image_list)
    assert metrics["loc"] == expected


def test_the_csv_form_of_a_submission_is_scored_like_the_text_form(tmp_path, capsys):
    """Issue 21, item 18: localize.py's own --csv-out given to --evaluate was read as a text submission ("3 lines,
    but there are 2 images")."""
    from detectron_res.localization.submission import write_submission_csv

    synsets, gt = write_small_files(tmp_path)
    wnids = read_synsets(synsets)
    csv_submission = tmp_path / "sub.csv"
    guesses = [
        (np.array([2]), np.array([[10, 10, 49, 49]])),
        (np.array([1, 3]), np.array([[0, 0, 9, 9], [5, 5, 20, 20]])),
    ]
    write_submission_csv(csv_submission, ["img_b", "img_a"], guesses, wnids=wnids)
    expected = {"top1_loc_err": 0.25, "top5_loc_err": 0.0, "top5_cls_err": 0.0, "num_images": 2}
    assert evaluate_submission_file(csv_submission, ground_truth=gt, synsets=synsets)["loc"] == expected

    sys.path.insert(0, str(REPO / "tools"))
    import localize

    assert localize.main(["--evaluate", "--submission", str(csv_submission), "--gt", str(gt), "--synsets",
                          str(synsets)]) == 0
    assert "top-1 localization error      25.00 %" in capsys.readouterr().out
    # a subset: the rows of the image list's images, each exactly once
    image_list = tmp_path / "images.txt"
    image_list.write_text("img_b\n")
    write_submission_csv(csv_submission, ["img_b"], guesses[:1], wnids=wnids)
    assert evaluate_submission_file(csv_submission, ground_truth=gt, synsets=synsets, image_list=image_list)["loc"] == {
        "top1_loc_err": 0.0, "top5_loc_err": 0.0, "top5_cls_err": 0.0, "num_images": 1}
    with pytest.raises(ValueError) as info:
        evaluate_submission_file(csv_submission, ground_truth=gt, synsets=synsets)
    assert str(info.value) == (
        f"{csv_submission}: no row for image 'img_a' (1 of the 2 images of the ground truth {gt} lack one); to score "
        "a subset, pass its ids with --image-list"
    )
    image_list.write_text("img_a\n")
    with pytest.raises(ValueError) as info:
        evaluate_submission_file(csv_submission, ground_truth=gt, synsets=synsets, image_list=image_list)
    assert str(info.value) == f"{csv_submission}: no row for image 'img_a' (1 of the 1 images of {image_list} lack one)"
    csv_submission.write_text("ImageId,PredictionString\nimg_a,n001 0 0 9 9\nimg_b,\nimg_a,n002 1 1 2 2\n")
    with pytest.raises(ValueError) as info:
        evaluate_submission_file(csv_submission, ground_truth=gt, synsets=synsets)
    assert str(info.value) == f"{csv_submission}, line 4: image 'img_a' already on line 2"
    csv_submission.write_text("ImageId,PredictionString\nimg_a,n001 0 0 nan 9\nimg_b,\n")
    with pytest.raises(ValueError) as info:
        evaluate_submission_file(csv_submission, ground_truth=gt, synsets=synsets)
    assert str(info.value) == (
        f"{csv_submission}, line 2: group 1 has the box coordinate 'nan'; box coordinates are finite numbers"
    )
    csv_submission.write_text("ImageId,PredictionString\nimg_a,n001 0 0 9 9\nimg_b,\nimg_c,n002 1 1 2 2\n")
    with pytest.raises(ValueError) as info:
        evaluate_submission_file(csv_submission, ground_truth=gt, synsets=synsets)
    assert str(info.value) == f"{csv_submission}: image 'img_c' is not in the ground truth {gt} (1 such row)"
