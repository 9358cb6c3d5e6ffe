"""The localization tools end to end on a tiny loc_shapes set (the CSV:IMAGE_DIR form of the config): train_loc.py
trains the RPN and R-CNN stages; localize.py writes the submission (text and CSV) for a folder of images with each
class source (the system's own ranking, the ground truth, a predictions file, a torchvision classifier), and its
score equals the evaluator's on the same guesses."""

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision
from conftest import package_logger_restored

from detectron_res.data.datasets import generate_loc_shapes
from detectron_res.data.datasets.imagenet_loc import read_loc_solution, read_synsets
from detectron_res.evaluation.imagenet_loc import read_submission
from detectron_res.localization.class_predictions import TorchvisionClassifier

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import localize  # noqa: E402
import train_loc  # noqa: E402

CONFIG = str(REPO / "configs/loc_shapes_r18.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both stages, 3 iterations each, on 10 training images; 4 val images; 4 boxes per class for the R-CNN."""
    root = tmp_path_factory.mktemp("loc_shapes")
    generate_loc_shapes(root, num_train=10, num_val=4, seed=3)
    output = tmp_path_factory.mktemp("out")
    common = [
        "MODEL.DEVICE=cpu",
        "DATALOADER.NUM_WORKERS=0",
        "MODEL.RPN.POST_NMS_TOPK_TEST=4",
        f"OUTPUT_DIR={output}",
    ]
    training = [
        f"DATASETS.TRAIN=[{root}/LOC_train_solution.csv:{root}/train]",
        f"DATASETS.TEST=[{root}/LOC_val_solution.csv:{root}/val]",
        "SOLVER.IMS_PER_BATCH=4", "SOLVER.MAX_ITER=3", "SOLVER.STEPS=[]", "SOLVER.CHECKPOINT_PERIOD=2",
        "LOC.RCNN.IMS_PER_BATCH=4", "LOC.RCNN.MAX_ITER=3", "LOC.RCNN.STEPS=[]",
    ]
    with package_logger_restored():
        results = train_loc.main(["--cfg", CONFIG, *common, *training])
    return root, output, common, results


def test_train_loc_trains_and_evaluates_every_stage(trained):
    root, output, _, results = trained
    assert set(results) == {"rpn", "rcnn"}
    assert set(results["rpn"]) == {"loc_oracle", "loc"} and set(results["rcnn"]) == {"loc_oracle", "loc"}
    assert results["rcnn"]["loc_oracle"]["num_images"] == 4
    assert results["rcnn"]["loc_oracle"]["top5_cls_err"] == 0.0  # the oracle's classes are the right ones
    for stage in ("rpn", "rcnn"):
        assert (output / stage / "model_final.pth").is_file()
    assert (output / "rcnn" / "rcnn_rois.pth").is_file()
    saved = json.loads((output / "rcnn" / "metrics.json").read_text())
    assert saved["loc_oracle"] == results["rcnn"]["loc_oracle"]


def test_localize_writes_a_submission_whose_score_is_the_evaluators(trained, tmp_path, capsys):
    root, output, common, results = trained
    out = tmp_path / "sub.txt"
    code = localize.main([
        "--cfg", CONFIG, "--images", str(root / "val"), "--out", str(out), "--csv-out", str(tmp_path / "sub.csv"),
        "--gt", str(root / "LOC_val_solution.csv"), "--json-out", str(tmp_path / "m.json"), *common,
    ])
    assert code == 0, capsys.readouterr().err
    ids = sorted(p.stem for p in (root / "val").iterdir())
    assert (tmp_path / "sub.images.txt").read_text().split() == ids
    guesses = read_submission(out, num_images=4, num_classes=5)
    for labels, boxes in guesses:
        assert len(labels) == 5 and sorted(labels.tolist()) == [1, 2, 3, 4, 5]  # 5 classes: every one guessed once
        assert (boxes == np.round(boxes)).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
    csv_rows = read_loc_solution(tmp_path / "sub.csv", read_synsets(root / "LOC_synset_mapping.txt"))
    assert sorted(csv_rows) == ids
    assert csv_rows[ids[0]].labels.tolist() == guesses[0][0].tolist()
    assert csv_rows[ids[0]].boxes.tolist() == guesses[0][1].tolist()
    # the file scores exactly as the evaluator scored the same localizer (the system's own classes, RPN + R-CNN)
    assert json.loads((tmp_path / "m.json").read_text())["loc"] == results["rcnn"]["loc"]
    assert "top-5 localization error" in capsys.readouterr().out


def test_class_sources_oracle_file_and_rpn_only(trained, tmp_path, capsys):
    root, output, common, results = trained
    out = tmp_path / "oracle.txt"
    args = ["--cfg", CONFIG, "--images", str(root / "val"), *common]
    assert localize.main([*args, "--out", str(out), "--oracle-gt", str(root / "LOC_val_solution.csv"),
                          "--gt", str(root / "LOC_val_solution.csv"), "--json-out", str(tmp_path / "o.json")]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["loc"] == results["rcnn"]["loc_oracle"]
    assert all(len(labels) == 1 for labels, _ in read_submission(out, num_images=4, num_classes=5))
    predictions = tmp_path / "preds.txt"
    ids = sorted(p.stem for p in (root / "val").iterdir())
    predictions.write_text("".join(f"{i}.JPEG n90000003 2\n" for i in ids))
    out = tmp_path / "file.txt"
    assert localize.main([*args, "--out", str(out), "--cls-preds", str(predictions), "--no-rcnn"]) == 0
    assert [labels.tolist() for labels, _ in read_submission(out, num_images=4, num_classes=5)] == [[3, 2]] * 4
    capsys.readouterr()
    assert localize.main([*args, "--out", str(out), "--cls-preds", str(tmp_path / "absent.txt")]) == 1
    assert capsys.readouterr().err.startswith("localize.py: error:")


def test_train_loc_refuses_a_detector_config(tmp_path, capsys):
    code = train_loc.run_tool(train_loc.main, ["--cfg", str(REPO / "configs/shapes_r18.yaml"), "--output", str(tmp_path)])
    assert code == 1
    assert "tools/train_loc.py trains the localization system" in capsys.readouterr().err


def test_classes_from_a_torchvision_classifier_keep_its_order(trained, tmp_path):
    root, output, common, _ = trained
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), weights)
    out = tmp_path / "cls.txt"
    args = ["--cfg", CONFIG, "--images", str(root / "val"), "--out", str(out), *common]
    assert localize.main([*args, "--classifier", str(weights), "--cls-crop", "10crop"]) == 0
    classifier = TorchvisionClassifier(state_dict_path=weights, crop="10crop", resize=112, crop_size=96)
    ids = sorted(p.stem for p in (root / "val").iterdir())
    for image_id, (labels, _) in zip(ids, read_submission(out, num_images=4, num_classes=5)):
        image = cv2.cvtColor(cv2.imread(str(root / "val" / f"{image_id}.JPEG")), cv2.COLOR_BGR2RGB)
        assert labels.tolist() == [c + 1 for c in classifier.top5(image)]
