"""Tests of ``tools/eval_det.py``: evaluating existing COCO results files and VOC devkit result files."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
from conftest import load_tool

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
