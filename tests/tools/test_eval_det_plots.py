"""`tools/eval_det.py --json-out`: the per-class precision-recall curves and AP bars drawn beside the metrics file."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import VOC_SAMPLE, load_tool, read_png

REPO = Path(__file__).resolve().parents[2]


eval_det = load_tool("eval_det")


def test_coco_plots_go_beside_json_out_and_nowhere_without_it(tmp_path):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({
        "images": [{"id": 1, "height": 100, "width": 100}],
        "categories": [{"id": 4, "name": "ball"}, {"id": 5, "name": "cube"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0}],
    }))
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": 1, "category_id": 4, "bbox": [10, 10, 20, 20], "score": 0.5}]))
    assert eval_det.main(["--gt", str(gt), "--dets", str(dets)]) == 0
    assert list(tmp_path.rglob("*.png")) == []
    assert eval_det.main(["--gt", str(gt), "--dets", str(dets), "--json-out", str(tmp_path / "out" / "metrics.json")]) == 0
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "coco_ap_per_class.png", "coco_pr_curves.png", "metrics.json"
    ]
    assert read_png(tmp_path / "out" / "coco_pr_curves.png").shape[:2] == (350, 640)  # ball and cube, 3.2 x 2.9 in
    read_png(tmp_path / "out" / "coco_ap_per_class.png")


def test_voc_plots_of_the_real_sample(voc_sample_devkit_dir, tmp_path):
    out = tmp_path / "metrics.json"
    args = ["--format", "voc", "--voc-root", str(VOC_SAMPLE / "VOC2012"), "--split", "val"]
    assert eval_det.main([*args, "--dets", str(voc_sample_devkit_dir), "--json-out", str(out)]) == 0
    assert json.loads(out.read_text())["voc"]["mAP_area"] > 0
    # 20 classes: 5 rows of 4 axes of 3.2 x 2.9 in, + 0.6 in for the title, at 100 dpi
    assert read_png(tmp_path / "voc_pr_curves.png").shape[:2] == (1510, 1280)
    read_png(tmp_path / "voc_ap_per_class.png")
