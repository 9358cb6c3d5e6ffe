"""The evaluation report from the tools: `eval_det.py --report` (with the gallery drawn from `--images`),
`test_det.py --report` right after testing, `report.py OUTPUT_DIR` for that run afterwards (the same files), several
test data sets (a folder each and an index), and each refusal in one line before any work."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import load_tool, package_logger_restored
from pycocotools.coco import COCO

from detectron_res.data.datasets import generate_shapes
from detectron_res.evaluation.errors import tide_errors

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/shapes_r18.yaml")

eval_det = load_tool("eval_det")
test_det = load_tool("test_det")
report_tool = load_tool("report")
train_det = load_tool("train_det")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=6, num_val=4, image_size=96, seed=3)
    return root


def shifted_detections(gt_path: Path) -> list[dict]:
    """One detection per box: the first box of each image shifted by half its width (a loc error: IoU 1/3), the rest
    exact, scores falling."""
    gt = json.loads(gt_path.read_text())
    detections, seen = [], set()
    for number, ann in enumerate(gt["annotations"]):
        x, y, w, h = ann["bbox"]
        if ann["image_id"] not in seen:
            seen.add(ann["image_id"])
            x += w / 2
        detections.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": [x, y, w, h],
                           "score": round(0.99 - 0.01 * number, 2)})
    return detections


def gallery_images(index_html: Path) -> list[np.ndarray]:
    sources = re.findall(r'<img src="data:image/jpeg;base64,([^"]+)"', index_html.read_text())
    return [cv2.imdecode(np.frombuffer(base64.b64decode(src), np.uint8), cv2.IMREAD_COLOR) for src in sources]


def test_eval_det_report_draws_the_images_and_errors_json_is_tides(shapes, tmp_path, capsys):
    gt = shapes / "annotations/instances_val.json"
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps(shifted_detections(gt)))
    images = tmp_path / "images"  # the val images, each a flat color of its own
    images.mkdir()
    for k, image in enumerate(json.loads(gt.read_text())["images"]):
        cv2.imwrite(str(images / image["file_name"]), np.full((96, 96, 3), (40 * k, 100, 250 - 40 * k), np.uint8))
    out = tmp_path / "report"
    assert eval_det.main(["--gt", str(gt), "--dets", str(dets), "--report", str(out), "--images", str(images)]) == 0
    assert f"report written to {out / 'index.html'}" in capsys.readouterr().out
    expected = tide_errors(COCO(str(gt)), json.loads(dets.read_text()))
    assert json.loads((out / "errors.json").read_text())["bbox"] == {**expected, "iou_fg": 0.5, "iou_bg": 0.1}
    assert expected["counts"]["loc"] == 4 and expected["counts"]["miss"] == 0  # one shifted box per image
    pictures = gallery_images(out / "index.html")
    assert len(pictures) == 4  # every image has its loc error
    colors = sorted(np.median(picture.reshape(-1, 3), axis=0).tolist() for picture in pictures)
    expected = [(40 * k, 100, 250 - 40 * k) for k in range(4)]  # drawn on the images of --images (JPEG's error)
    assert np.abs(np.array(colors) - np.array(expected)).max() <= 8


def test_eval_det_report_refusals(shapes, tmp_path, capsys):
    gt = shapes / "annotations/instances_val.json"
    dets = tmp_path / "errors.json"
    dets.write_text(json.dumps(shifted_detections(gt)))
    assert eval_det.main(["--gt", str(gt), "--dets", str(dets), "--report", str(tmp_path)]) == 1
    assert f"--report {tmp_path / 'errors.json'}" in capsys.readouterr().err  # would overwrite --dets
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert eval_det.main(["--gt", str(gt), "--dets", str(dets), "--report", str(a_file)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a_file" in err
    for argv, message in ((["--format", "voc", "--voc-root", str(tmp_path)], "--report is for --format coco"),
                          ([], "--images is for --report")):
        with pytest.raises(SystemExit) as stop:
            eval_det.main([*argv, "--dets", str(dets), *(["--report", str(tmp_path / "r")] if argv else
                                                        ["--gt", str(gt), "--images", str(tmp_path)])])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    common = ["MODEL.DEVICE=cpu", "DATALOADER.NUM_WORKERS=0", "INPUT.MIN_SIZE_TRAIN=[96]", "INPUT.MAX_SIZE_TRAIN=96",
              "INPUT.MIN_SIZE_TEST=96", "INPUT.MAX_SIZE_TEST=96", "MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.01",
              f"DATASETS.TEST=[{shapes}/annotations/instances_val.json:{shapes}/val]"]
    with package_logger_restored():
        train_det.main(["--cfg", CONFIG, "--output", str(run), *common, "DATASETS.TEST=[]",
                        f"DATASETS.TRAIN=[{shapes}/annotations/instances_train.json:{shapes}/train]",
                        "SOLVER.IMS_PER_BATCH=2", "SOLVER.MAX_ITER=2", "SOLVER.STEPS=[]", "SOLVER.WARMUP_ITERS=1"])
    return run, common


def test_test_det_report_and_report_py_write_the_same_files(trained, tmp_path):
    run, common = trained
    ckpt = str(run / "model_final.pth")
    with package_logger_restored():
        metrics = test_det.main(["--cfg", CONFIG, "--ckpt", ckpt, "--output", str(tmp_path / "test"), *common,
                                 "--report", str(tmp_path / "report")])
        again = report_tool.main([str(tmp_path / "test")])  # default: OUTPUT_DIR/report
    written = json.loads((tmp_path / "report" / "errors.json").read_text())
    assert written == json.loads(json.dumps(again))
    assert written["bbox"]["AP"] == pytest.approx(metrics["bbox"]["AP50"], abs=1e-9)  # TIDE's AP is COCO's AP50
    assert written["bbox"]["counts"]["detections"] > 0
    page = (tmp_path / "report" / "index.html").read_bytes()
    assert page == (tmp_path / "test" / "report" / "index.html").read_bytes()


def test_several_data_sets_get_a_folder_each_and_an_index(trained, shapes, tmp_path):
    run, common = trained
    test_sets = (f"DATASETS.TEST=[{shapes}/annotations/instances_val.json:{shapes}/val,"
                 f"{shapes}/annotations/instances_train.json:{shapes}/train]")
    with package_logger_restored():
        metrics = test_det.main(["--cfg", CONFIG, "--ckpt", str(run / "model_final.pth"), "--output",
                                 str(tmp_path / "test"), *common, test_sets, "--report", str(tmp_path / "report")])
    written = json.loads((tmp_path / "report" / "errors.json").read_text())
    assert sorted(written) == ["instances_train", "instances_val"]
    for folder, name in (("instances_val", f"{shapes}/annotations/instances_val.json:{shapes}/val"),
                         ("instances_train", f"{shapes}/annotations/instances_train.json:{shapes}/train")):
        assert json.loads((tmp_path / "report" / folder / "errors.json").read_text()) == written[folder]
        assert written[folder]["bbox"]["AP"] == pytest.approx(metrics[name]["bbox"]["AP50"], abs=1e-9)
        assert f'href="{folder}/index.html"' in (tmp_path / "report" / "index.html").read_text()


def test_refusals_before_any_work(trained, tmp_path, capsys):
    run, common = trained
    with pytest.raises(SystemExit) as stop:
        test_det.main(["--cfg", CONFIG, "--output", str(tmp_path / "t"), "--report", str(tmp_path / "r"), "--ablation"])
    assert stop.value.code == 2 and "--report is for one evaluation, not --ablation" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotADirectoryError, match="--report .*a_file is a file"):
        test_det.main(["--cfg", CONFIG, "--ckpt", str(run / "model_final.pth"), "--output", str(tmp_path / "t"),
                       *common, "--report", str(tmp_path / "a_file")])
    assert not (tmp_path / "t").exists()  # stopped before the run folder was made
    with pytest.raises(FileNotFoundError, match="has neither inference/config.yaml nor config.yaml"):
        report_tool.main([str(tmp_path)])
    (tmp_path / "untested").mkdir()
    with pytest.raises(FileNotFoundError, match=r"coco_instances_results.json: no detections of data set"):
        report_tool.main([str(tmp_path / "untested"), "--cfg", str(run / "config.yaml"), *common])
    assert not (tmp_path / "untested" / "report").exists()
    with pytest.raises(ValueError, match="DATASETS.TEST is empty: there is no evaluation to report"):
        report_tool.main([str(run), "DATASETS.TEST=[]"])  # the training run's config.yaml, trained without a test set
