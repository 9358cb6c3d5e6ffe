"""Tests of ``tools/eval_det.py``: evaluating existing COCO results files and VOC devkit result files."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
from conftest import load_tool, write_voc_annotations

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
COCO_FIRST100 = SHARED_DATA / "coco_val2014_first100"
SUMMARY = ("AP", "AP50", "AP75", "APs", "APm", "APl")


eval_det = load_tool("eval_det")


@pytest.fixture
def tiny_gt(tmp_path) -> Path:
    path = tmp_path / "gt.json"
    path.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "height": 100, "width": 100}],
                "categories": [{"id": 4, "name": "ball"}],
                "annotations": [
                    {"id": 1, "image_id": 1, "category_id": 4, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0}
                ],
            }
        )
    )
    return path


def test_coco_perfect_results_and_json_out(tiny_gt, tmp_path, capsys):
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": 1, "category_id": 4, "bbox": [10, 10, 20, 20], "score": 0.5}]))
    out = tmp_path / "metrics.json"
    out.write_text(json.dumps({"voc": {"mAP": 1.0}}))
    assert eval_det.main(["--format", "coco", "--gt", str(tiny_gt), "--dets", str(dets), "--json-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in printed
    assert "ball     100.000" in printed
    written = json.loads(out.read_text())
    assert written["voc"] == {"mAP": 1.0}  # merged, not overwritten
    assert list(written["bbox"]) == [*SUMMARY, "AP-ball"]
    assert written["bbox"]["APm"] is None and written["bbox"]["APl"] is None  # only a small box
    for key in ("AP", "AP50", "AP75", "APs", "AP-ball"):
        assert written["bbox"][key] == pytest.approx(100.0, abs=1e-9), key


@pytest.mark.parametrize(
    ("dets_content", "message"),
    [
        ('{"image_id": 1}', "dets.json: COCO results must be a JSON list"),
        ('[{"image_id": 1, "category_id": 4, "bbox": [1, 2, 3, 4], "score": 0.5}, {"image_id": 1}]',
         "dets.json: entry #1 lacks 'category_id', 'bbox', 'score'"),
        ('[{"image_id": 2, "category_id": 4, "bbox": [1, 2, 3, 4], "score": 0.5}]',
         "dets.json: entry #0 has image_id 2, which is not an image of .*gt.json"),
        ('[{"image_id": 1, "category_id": 5, "bbox": [1, 2, 3, 4], "score": 0.5}]',
         "dets.json: entry #0 has category_id 5, which is not a category of .*gt.json"),
    ],
)
def test_bad_results_file_exits_with_clear_error(tiny_gt, tmp_path, capsys, dets_content, message):
    dets = tmp_path / "dets.json"
    dets.write_text(dets_content)
    assert eval_det.main(["--gt", str(tiny_gt), "--dets", str(dets)]) == 1
    err = capsys.readouterr().err
    assert "error:" in err
    assert re.search(message, err), err


def test_missing_file_exits_with_clear_error(tiny_gt, tmp_path, capsys):
    assert eval_det.main(["--gt", str(tiny_gt), "--dets", str(tmp_path / "absent.json")]) == 1
    assert "COCO results file not found: " in capsys.readouterr().err


def test_ground_truth_with_a_repeated_annotation_id_is_one_line_and_exit_1(tiny_gt, tmp_path, capsys):
    """pycocotools keeps one annotation per id, so this ground truth used to score perfect detections AP 25.2."""
    gt = json.loads(tiny_gt.read_text())
    gt["annotations"].append({**gt["annotations"][0], "bbox": [50, 50, 20, 20]})
    tiny_gt.write_text(json.dumps(gt))
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": 1, "category_id": 4, "bbox": box, "score": 0.5}
                                for box in ([10, 10, 20, 20], [50, 50, 20, 20])]))
    status, err = run_eval_det([
        "--gt", str(tiny_gt), "--dets", str(dets), "--json-out", str(tmp_path / "metrics.json")
    ], capsys)
    assert status == 1
    assert err == [f"eval_det.py: error: {tiny_gt}: annotations #0 and #1 have the same id 1; "
                   "annotation ids must be unique"]
    assert not (tmp_path / "metrics.json").exists()


def test_ground_truth_with_a_repeated_image_id_is_one_line_and_exit_1(tiny_gt, tmp_path, capsys):
    """pycocotools keeps the last of two images with one id: here the box of the first (200 px) lay outside the second
    (100 px), was dropped, and perfect detections scored AP 50."""
    gt = json.loads(tiny_gt.read_text())
    gt["images"] = [{"id": 1, "height": 200, "width": 200}, {"id": 1, "height": 100, "width": 100}]
    gt["annotations"].append({**gt["annotations"][0], "id": 2, "bbox": [150, 150, 30, 30]})
    tiny_gt.write_text(json.dumps(gt))
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": 1, "category_id": 4, "bbox": box, "score": score}
                                for box, score in (([10, 10, 20, 20], 0.5), ([150, 150, 30, 30], 0.9))]))
    status, err = run_eval_det([
        "--gt", str(tiny_gt), "--dets", str(dets), "--json-out", str(tmp_path / "metrics.json")
    ], capsys)
    assert status == 1
    assert err == [f"eval_det.py: error: {tiny_gt}: images #0 and #1 have the same id 1; image ids must be unique"]
    assert not (tmp_path / "metrics.json").exists()


def test_ground_truth_with_a_str_category_id_is_one_line_and_exit_1(tiny_gt, tmp_path, capsys):
    """Without detections, faster-coco-eval (the auto backend where installed) failed in C++ on a str category id with
    a many-line TypeError, and pycocotools scored it 0."""
    gt = json.loads(tiny_gt.read_text())
    gt["categories"] = [{"id": "4", "name": "ball"}]
    gt["annotations"][0]["category_id"] = "4"
    tiny_gt.write_text(json.dumps(gt))
    dets = tmp_path / "dets.json"
    dets.write_text("[]")
    status, err = run_eval_det([
        "--gt", str(tiny_gt), "--dets", str(dets), "--json-out", str(tmp_path / "metrics.json")
    ], capsys)
    assert status == 1
    assert err == [f"eval_det.py: error: {tiny_gt}: category #0 has id '4'; expected an int"]
    assert not (tmp_path / "metrics.json").exists()


def test_coco_api_fake_results_on_first100(tmp_path, shared_data):
    shared_data("coco_val2014_first100")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO_FIRST100 / "instances_val2014_first100_nocrowd_bboxarea.json"
    dets = COCO_FIRST100 / "instances_val2014_fakebbox100_results.json"
    out = tmp_path / "metrics.json"
    assert eval_det.main(["--format", "coco", "--gt", str(gt), "--dets", str(dets), "--json-out", str(out)]) == 0
    bbox = json.loads(out.read_text())["bbox"]

    expected = {
        "AP": 50.3647, "AP50": 69.6973, "AP75": 57.1667, "APs": 59.3252, "APm": 55.7991, "APl": 48.9363,
    }
    for key, value in expected.items():
        assert bbox[key] == pytest.approx(value, abs=1e-3), key
    assert bbox["AP-person"] == pytest.approx(52.4348, abs=1e-3)
    assert bbox["AP-fire hydrant"] is None  # no ground truth of that class in these 100 images
    assert sum(key.startswith("AP-") for key in bbox) == 80

    with contextlib.redirect_stdout(io.StringIO()):  # the same numbers from pycocotools directly
        coco_gt = COCO(str(gt))
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(str(dets)), iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    for key, stat in zip(SUMMARY, coco_eval.stats[:6]):
        assert bbox[key] == pytest.approx(stat * 100, abs=1e-9), key


VOC_SAMPLE = SHARED_DATA / "voc2012_sample"


def test_voc_devkit_results_on_the_real_sample(voc_sample_devkit_dir, tmp_path, capsys):
    class_names = (VOC_SAMPLE / "voc.names").read_text().split()
    dets = voc_sample_devkit_dir  # the sample's 452 detections as devkit files (tests/conftest.py)
    out = tmp_path / "metrics.json"
    args = ["--format", "voc", "--voc-root", str(VOC_SAMPLE / "VOC2012"), "--split", "val", "--dets", str(dets)]
    assert eval_det.main([*args, "--json-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^mAP\s+60\.11\s+60\.76$", printed, re.MULTILINE), printed
    assert re.search(r"^cat\s+100\.00\s+100\.00$", printed, re.MULTILINE)
    voc = json.loads(out.read_text())["voc"]
    assert voc["mAP_07"] == pytest.approx(0.6011089995807699, abs=1e-9)  # fractions, as in the evaluator's test
    assert voc["mAP_area"] == pytest.approx(0.6075503875223763, abs=1e-9)
    assert set(voc["per_class"]) == set(class_names)
    assert voc["per_class"]["car"]["AP_area"] == pytest.approx(0.245, abs=1e-4)


def test_voc_needs_its_arguments(tmp_path, capsys):
    assert eval_det.main(["--format", "voc", "--dets", str(tmp_path)]) == 1
    assert "--voc-root" in capsys.readouterr().err
    assert eval_det.main(["--format", "voc", "--voc-root", str(tmp_path), "--split", "val", "--dets", str(tmp_path / "none")]) == 1
    assert "not found" in capsys.readouterr().err
    assert eval_det.main(["--format", "coco", "--dets", str(tmp_path / "d.json")]) == 1
    assert "--gt" in capsys.readouterr().err


# -- --json-out: checked before anything is evaluated or written, one line per refusal (issue 21 item 14) ----------
def run_eval_det(argv, capsys) -> tuple[int, list[str]]:
    """eval_det's exit status and its stderr lines."""
    capsys.readouterr()
    status = eval_det.main(argv)
    return status, capsys.readouterr().err.splitlines()


def test_json_out_on_the_detections_file_is_refused(tiny_gt, tmp_path, capsys):
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": 1, "category_id": 4, "bbox": [10, 10, 20, 20], "score": 0.5}]))
    before = dets.read_bytes()
    status, err = run_eval_det(["--gt", str(tiny_gt), "--dets", str(dets), "--json-out", str(dets)], capsys)
    assert status == 1 and err == [
        f"eval_det.py: error: --json-out {dets} is the same path as the input --dets {dets}: refusing to overwrite it"
    ]
    assert dets.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dets.json", "gt.json"]  # no plot beside it either


def test_json_out_holding_broken_json_is_refused_before_anything_is_written(tiny_gt, tmp_path, capsys):
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": 1, "category_id": 4, "bbox": [10, 10, 20, 20], "score": 0.5}]))
    out = tmp_path / "out" / "metrics.json"
    out.parent.mkdir()
    for content, message in [
        (b'{"bbox": ', f"{out}: existing metrics file is not valid JSON (Expecting value: line 1 column 10 (char 9))"),
        (b"[1, 2]", f"{out}: existing metrics file must hold a JSON object, got list"),
        (b"\x89PNG\r\n",
         f"{out}: existing metrics file is not UTF-8 text (byte 0x89 at offset 0), so not a metrics json"),
    ]:
        out.write_bytes(content)
        status, err = run_eval_det(["--gt", str(tiny_gt), "--dets", str(dets), "--json-out", str(out)], capsys)
        assert status == 1 and err == [f"eval_det.py: error: {message}"]
        assert out.read_bytes() == content
        assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # the plots are not drawn first


def test_json_out_that_cannot_be_written_is_one_line(tiny_gt, tmp_path, capsys):
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": 1, "category_id": 4, "bbox": [10, 10, 20, 20], "score": 0.5}]))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    argv = ["--gt", str(tiny_gt), "--dets", str(dets), "--json-out"]
    status, err = run_eval_det([*argv, str(blocker / "sub" / "metrics.json")], capsys)
    assert status == 1 and err == [
        f"eval_det.py: error: --json-out {blocker / 'sub' / 'metrics.json'} cannot be written: {blocker} is a file, "
        "not a folder"
    ]
    (tmp_path / "folder.json").mkdir()
    status, err = run_eval_det([*argv, str(tmp_path / "folder.json")], capsys)
    assert status == 1 and err == [
        f"eval_det.py: error: --json-out {tmp_path / 'folder.json'} is a folder: give the json file to write (e.g. "
        f"{tmp_path / 'folder.json' / 'metrics.json'})"
    ]
    assert blocker.read_text() == "x" and list((tmp_path / "folder.json").iterdir()) == []


def test_json_out_write_failure_names_the_flag(tiny_gt, tmp_path, capsys, monkeypatch):
    """A failure of the write itself (after the checks passed: say the disk went read-only) is one line too."""
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": 1, "category_id": 4, "bbox": [10, 10, 20, 20], "score": 0.5}]))

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(eval_det, "write_metrics_json", read_only)
    out = tmp_path / "metrics.json"
    status, err = run_eval_det(["--gt", str(tiny_gt), "--dets", str(dets), "--json-out", str(out)], capsys)
    assert status == 1
    assert err == [f"eval_det.py: error: could not write --json-out {out}: Read-only file system"]


# -- --as-devkit: a devkit file with 0-based lines scored as the devkit scores it (issue 21 item 12) -----------------
def write_tiny_voc(voc_root: Path) -> None:
    """Images a and b (100 x 100), each with one cat at the XML box (1, 1, 10, 10); a also a difficult cat, b a
    bird."""
    objects = {"a": [("cat", (1, 1, 10, 10), 0), ("cat", (21, 21, 30, 30), 1)],
               "b": [("cat", (1, 1, 10, 10), 0), ("bird", (50, 50, 60, 60), 0)]}
    write_voc_annotations(voc_root, objects)


def test_as_devkit_scores_zero_based_lines_unshifted(tmp_path, capsys):
    """Hand-computed with the devkit's +1 areas against the cat (1, 1, 10, 10) of area 100:
    a 0.9 (0, 0, 10, 10): area 121, overlap 100, IoU 100/121 = 0.83 -> TP (0-based looking);
    b 0.8 (0, 0, 7.5, 7.5): area 8.5^2 = 72.25, overlap 7.5^2 = 56.25, IoU 56.25/116 = 0.485 -> FP (0-based looking;
    shifted by one, (1, 1, 7.5, 7.5), it would be IoU 0.5625, a TP, and the AP 1);
    b 0.7 (1, 1, 10, 10): IoU 1 -> TP.
    Recall 1/2, 1/2, 1; precision 1, 1/2, 2/3: area AP 1/2 * 1 + 1/2 * 2/3 = 5/6; 11-point (6 * 1 + 5 * 2/3) / 11 =
    28/33. The bird has ground truth and no file: AP 0; every other VOC class has none: left out of the mAP."""
    voc_root = tmp_path / "VOC2007"
    write_tiny_voc(voc_root)
    dets = tmp_path / "results"
    dets.mkdir()
    cat = dets / "comp4_det_test_cat.txt"
    cat.write_text("a 0.9 0 0 10 10\nb 0.8 0 0 7.5 7.5\nb 0.7 1 1 10 10\n")
    out = tmp_path / "metrics.json"
    argv = ["--format", "voc", "--voc-root", str(voc_root), "--dets", str(dets), "--json-out", str(out)]

    status, err = run_eval_det(argv, capsys)  # the default still refuses the file, naming the first such line
    assert status == 1 and len(err) == 1
    assert err[0].startswith(f"eval_det.py: error: {cat}, line 1: xmin or ymin below 1 in 'a 0.9 0 0 10 10'; ")
    assert err[0].endswith("(or score the file as the devkit does, unshifted: tools/eval_det.py --as-devkit)")
    assert not out.exists()

    status, err = run_eval_det([*argv, "--as-devkit"], capsys)
    assert status == 0 and err == []
    voc = json.loads(out.read_text())["voc"]
    assert voc["per_class"]["cat"]["AP_area"] == pytest.approx(5 / 6, abs=1e-12)
    assert voc["per_class"]["cat"]["AP_07"] == pytest.approx(28 / 33, abs=1e-12)
    assert voc["per_class"]["bird"] == {"AP_07": 0.0, "AP_area": 0.0}
    assert voc["mAP_area"] == pytest.approx(5 / 12, abs=1e-12) and voc["mAP_07"] == pytest.approx(14 / 33, abs=1e-12)
    assert cat.read_text() == "a 0.9 0 0 10 10\nb 0.8 0 0 7.5 7.5\nb 0.7 1 1 10 10\n"


def test_as_devkit_says_how_many_lines_looked_zero_based(tmp_path, capsys):
    voc_root = tmp_path / "VOC2007"
    write_tiny_voc(voc_root)
    dets = tmp_path / "results"
    dets.mkdir()
    cat = dets / "comp4_det_test_cat.txt"
    cat.write_text("a 0.9 0 0 10 10\nb 0.8 0 0 7.5 7.5\nb 0.7 1 1 10 10\n")
    (dets / "comp4_det_test_bird.txt").write_text("b 0.5 50 0.5 60 60\n")
    capsys.readouterr()
    assert eval_det.main(["--format", "voc", "--voc-root", str(voc_root), "--dets", str(dets), "--as-devkit"]) == 0
    printed = capsys.readouterr().out
    assert (f"3 lines looked 0-based (xmin or ymin below 1), scored unshifted as the devkit scores them; the first: "
            f"{dets / 'comp4_det_test_bird.txt'}, line 1: 'b 0.5 50 0.5 60 60'") in printed  # bird comes before cat
    assert re.search(r"^cat\s+84\.85\s+83\.33$", printed, re.MULTILINE), printed
    # bird (50, 0.5, 60, 60) against (50, 50, 60, 60): area 11 * 60.5 = 665.5, overlap 121, IoU 0.18 -> FP: AP 0
    assert re.search(r"^bird\s+0\.00\s+0\.00$", printed, re.MULTILINE)

    cat.write_text("b 0.7 1 1 10 10\n")
    (dets / "comp4_det_test_bird.txt").unlink()
    assert eval_det.main(["--format", "voc", "--voc-root", str(voc_root), "--dets", str(dets), "--as-devkit"]) == 0
    assert "No line looked 0-based (xmin or ymin below 1)" in capsys.readouterr().out
