"""End to end through the tools: train a few iterations on a tiny shapes set, evaluate, resume, test."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from detectron_res.data.datasets import generate_shapes

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import test_det  # noqa: E402
import train_det  # noqa: E402

BBOX_KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl"}


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=12, num_val=4, image_size=96, seed=1)
    return {
        split: f"{root}/annotations/instances_{split}.json:{root}/{split}" for split in ("train", "val")
    }


def overrides(tiny_shapes, **extra):
    values = {
        "MODEL.DEVICE": "cpu",
        "DATASETS.TRAIN": f"[{tiny_shapes['train']}]",
        "DATASETS.TEST": f"[{tiny_shapes['val']}]",
        "DATALOADER.NUM_WORKERS": "0",
        "INPUT.MIN_SIZE_TRAIN": "[96]",
        "INPUT.MAX_SIZE_TRAIN": "96",
        "INPUT.MIN_SIZE_TEST": "96",
        "INPUT.MAX_SIZE_TEST": "96",
        "SOLVER.IMS_PER_BATCH": "2",
        "SOLVER.MAX_ITER": "4",
        "SOLVER.STEPS": "[3]",
        "SOLVER.WARMUP_ITERS": "2",
        "SOLVER.CHECKPOINT_PERIOD": "2",
        "LOG_PERIOD": "1",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_train_evaluate_resume_and_test(tiny_shapes, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = train_det.main(["--cfg", str(REPO / "configs/shapes_r18.yaml"), "--output", str(out), *overrides(tiny_shapes)])
    assert set(metrics["bbox"]) >= BBOX_KEYS | {"AP-circle", "AP-square", "AP-triangle"}
    written = json.loads((out / "metrics.json").read_text())
    assert set(written["bbox"]) >= BBOX_KEYS
    assert 0.0 <= written["bbox"]["AP"] <= written["bbox"]["AP50"] <= 100.0
    # an area range with no ground truth (no large shapes at 96 px) is null, not pycocotools' -1
    assert all(written["bbox"][k] is None or 0.0 <= written["bbox"][k] <= 100.0 for k in BBOX_KEYS)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines[:4]] == [1, 2, 3, 4]
    assert {"total_loss", "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "lr", "time", "memory_mb"} <= set(lines[0])
    assert "bbox/AP50" in lines[-1]
    assert (out / "config.yaml").is_file() and (out / "log.txt").is_file()
    assert (out / "inference" / "instances_val" / "coco_instances_results.json").is_file()
    assert {p.name for p in out.glob("model_*.pth")} == {"model_0000002.pth", "model_final.pth"}
    assert "COCO" not in capsys.readouterr().err  # nothing alarming on stderr
    log = (out / "log.txt").read_text()
    checked = f"Test set {tiny_shapes['val']} checked before training: 4 images, 11 annotations"  # 11 shapes in val
    assert log.index(checked) < log.index("Starting training from iteration 0")

    # --resume continues at iteration 4 towards the new MAX_ITER
    train_det.main(
        ["--cfg", str(REPO / "configs/shapes_r18.yaml"), "--output", str(out), "--resume", *overrides(tiny_shapes, **{"SOLVER.MAX_ITER": "6", "SOLVER.STEPS": "[5]"})]
    )
    log = (out / "log.txt").read_text()
    assert "Resuming from" in log and "at iteration 4" in log and "Starting training from iteration 4 to 6" in log

    result = test_det.main(
        ["--cfg", str(REPO / "configs/shapes_r18.yaml"), "--output", str(tmp_path / "test"), "--ckpt", str(out / "model_final.pth"), *overrides(tiny_shapes)]
    )
    assert set(result["bbox"]) >= BBOX_KEYS
    assert (tmp_path / "test" / "metrics.json").is_file()


def test_unknown_key_on_the_command_line_fails_before_any_work(tiny_shapes, tmp_path):
    with pytest.raises(ValueError, match=r"SOLVER\.BASE_RL.*did you mean 'SOLVER\.BASE_LR'"):
        train_det.main(["--cfg", str(REPO / "configs/shapes_r18.yaml"), "--output", str(tmp_path / "x"), "SOLVER.BASE_RL=0.1"])
    assert not (tmp_path / "x").exists()


def _broken_test_set(tiny_shapes, folder: Path, problem: str) -> tuple[str, str]:
    """tiny_shapes' val split with `problem` written into a copy of its json: the DATASETS.TEST entry and the
    message of the loader that refuses it."""
    json_file, images = tiny_shapes["val"].split(":")
    coco = json.loads(Path(json_file).read_text())
    broken = folder / f"{problem}.json"
    if problem == "repeated_image_id":  # refused by the data set loader (load_coco_json)
        coco["images"][1]["id"] = coco["images"][0]["id"]
        message = f"{broken}: image id 1 appears twice"
    else:  # int and str image ids: the data set loads, its COCO ground truth (dataset_ground_truth) refuses them
        coco["images"][1]["id"] = "2"
        for ann in coco["annotations"]:
            if ann["image_id"] == 2:
                ann["image_id"] = "2"
        message = (f"{broken}: image #0 has the int id 1 but image #1 the str id '2'; image ids must be all ints or "
                   "all strs (pycocotools sorts them)")
    folder.mkdir(parents=True, exist_ok=True)
    broken.write_text(json.dumps(coco))
    return f"{broken}:{images}", message


@pytest.mark.parametrize("problem", ["repeated_image_id", "int_and_str_image_ids"])
def test_a_test_set_that_cannot_be_evaluated_stops_training_before_its_first_iteration(
    problem, tiny_shapes, tmp_path, capsys
):
    """The test sets' data and COCO ground truth are loaded before training, so that a problem the evaluation would
    stop on after hours of training stops the run at once, in one line naming the DATASETS.TEST entry."""
    from detectron_res.engine.runner import run_tool

    entry, message = _broken_test_set(tiny_shapes, tmp_path / "data", problem)
    out = tmp_path / "run"
    sets = f"[{tiny_shapes['train']},{entry}]"  # the first, valid, test set does not hide the second
    status = run_tool(train_det.main, ["--cfg", str(REPO / "configs/shapes_r18.yaml"), "--output", str(out),
                                       *overrides(tiny_shapes, **{"DATASETS.TEST": sets})])
    assert status == 1
    stderr = capsys.readouterr().err
    assert stderr.endswith(
        f": error: {message} (DATASETS.TEST entry {entry!r}, checked before training: nothing was trained)\n"
    )
    assert stderr.count("\n") == 1
    assert not list(out.glob("*.pth")) and not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()
    log = (out / "log.txt").read_text()
    assert f"Test set {tiny_shapes['train']} checked before training: 12 images, " in log
    assert "Starting training" not in log


VOC_SAMPLE = REPO.parent / "shared" / "data" / "voc2012_sample"


def test_voc_config_trains_and_writes_coco_and_devkit_results(tmp_path, shared_data):
    shared_data("voc2012_sample")
    out = tmp_path / "voc"
    metrics = train_det.main(
        [
            "--cfg", str(REPO / "configs/voc_r50.yaml"), "--output", str(out),
            "MODEL.DEVICE=cpu", f"DATASETS.ROOT={VOC_SAMPLE}",
            "DATASETS.TRAIN=[voc_2012_val]", "DATASETS.TEST=[voc_2012_val]",
            # a narrow trunk and small images: the run checks the plumbing, not the accuracy
            "MODEL.BACKBONE.DEPTH=18", "MODEL.BACKBONE.WIDTH=8", "MODEL.BACKBONE.NORM=BN", "MODEL.BACKBONE.FREEZE_AT=0",
            "MODEL.RPN.POST_NMS_TOPK_TEST=20", "MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.0",
            "INPUT.MIN_SIZE_TRAIN=[96]", "INPUT.MAX_SIZE_TRAIN=160", "INPUT.MIN_SIZE_TEST=96", "INPUT.MAX_SIZE_TEST=160",
            "DATALOADER.NUM_WORKERS=0", "SOLVER.IMS_PER_BATCH=2", "SOLVER.MAX_ITER=2", "SOLVER.STEPS=[1]",
        ]
    )  # fmt: skip
    assert {"bbox", "voc"} <= set(metrics)
    written = json.loads((out / "metrics.json").read_text())
    assert set(written["voc"]) == {"mAP_07", "mAP_area", "per_class"}
    assert 0.0 <= written["voc"]["mAP_area"] <= 1.0 and len(written["voc"]["per_class"]) == 20
    results = out / "inference" / "voc_2012_val"
    coco_results = json.loads((results / "coco_instances_results.json").read_text())
    assert coco_results and {"image_id", "category_id", "bbox", "score"} <= set(coco_results[0])
    devkit = sorted(p.name for p in (results / "voc_results").glob("comp4_det_test_*.txt"))
    assert len(devkit) == 20 and "comp4_det_test_aeroplane.txt" in devkit
    image_id, score, *box = (results / "voc_results" / "comp4_det_test_person.txt").read_text().split("\n")[0].split()
    assert image_id.startswith("20") and len(box) == 4  # "2008_000123 0.31 x1 y1 x2 y2", devkit 1-based pixels


# shapes classes stand in for three of the 20 VOC classes in the generated devkit below
SHAPE_TO_VOC = {"circle": "cat", "square": "tvmonitor", "triangle": "sheep"}


def write_voc_devkit_from_shapes(root: Path, *, year: str, splits: dict[str, int], seed: int) -> None:
    """``root/VOCdevkit/VOC<year>`` with JPEG images, XML annotations (devkit 1-based boxes, one object marked
    difficult) and ``ImageSets/Main/<split>.txt``, drawn from a generated shapes set."""
    from PIL import Image

    shapes = root / f"shapes_{year}"
    generate_shapes(shapes, num_train=sum(splits.values()), num_val=1, image_size=96, seed=seed)
    coco = json.loads((shapes / "annotations" / "instances_train.json").read_text())
    names = {c["id"]: SHAPE_TO_VOC[c["name"]] for c in coco["categories"]}
    voc = root / "VOCdevkit" / f"VOC{year}"
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / folder).mkdir(parents=True)
    ids = []
    for image in coco["images"]:
        image_id = f"{year}_{image['id']:06d}"
        ids.append(image_id)
        Image.open(shapes / "train" / image["file_name"]).convert("RGB").save(voc / "JPEGImages" / f"{image_id}.jpg")
        objects = ""
        for index, ann in enumerate(a for a in coco["annotations"] if a["image_id"] == image["id"]):
            x, y, w, h = ann["bbox"]
            objects += (
                f"<object><name>{names[ann['category_id']]}</name><difficult>{int(index == 1)}</difficult>"
                f"<bndbox><xmin>{x + 1}</xmin><ymin>{y + 1}</ymin><xmax>{x + w}</xmax><ymax>{y + h}</ymax></bndbox>"
                "</object>"
            )
        size = f"<size><width>{image['width']}</width><height>{image['height']}</height><depth>3</depth></size>"
        (voc / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{size}{objects}</annotation>")
    start = 0
    for split, count in splits.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids[start : start + count]))
        start += count


def test_voc_07_plus_12_trains_and_its_devkit_files_score_the_same_with_eval_det(tmp_path, capsys):
    """The paper's 07+12 -> 07 test setup by data set names, on a generated devkit (no shared data needed)."""
    import eval_det

    write_voc_devkit_from_shapes(tmp_path, year="2007", splits={"trainval": 4, "test": 3}, seed=3)
    write_voc_devkit_from_shapes(tmp_path, year="2012", splits={"trainval": 3}, seed=4)
    out = tmp_path / "voc"
    metrics = train_det.main(
        [
            "--cfg", str(REPO / "configs/voc_r50.yaml"), "--output", str(out), "MODEL.DEVICE=cpu",
            f"DATASETS.ROOT={tmp_path}", "DATASETS.TRAIN=[voc_2007_trainval,voc_2012_trainval]",
            # a narrow trunk and small images: the run checks the plumbing, not the accuracy
            "MODEL.BACKBONE.DEPTH=18", "MODEL.BACKBONE.WIDTH=8", "MODEL.BACKBONE.NORM=BN", "MODEL.BACKBONE.FREEZE_AT=0",
            "MODEL.RPN.ANCHOR_SIZES=[32,64]", "MODEL.RPN.POST_NMS_TOPK_TEST=20", "MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.0",
            "INPUT.MIN_SIZE_TRAIN=[96]", "INPUT.MAX_SIZE_TRAIN=96", "INPUT.MIN_SIZE_TEST=96", "INPUT.MAX_SIZE_TEST=96",
            "DATALOADER.NUM_WORKERS=0", "SOLVER.IMS_PER_BATCH=2", "SOLVER.MAX_ITER=2", "SOLVER.STEPS=[1]",
        ]
    )  # fmt: skip
    log = (out / "log.txt").read_text()
    assert "voc_2007_trainval: 4 images" in log and "voc_2012_trainval: 3 images" in log
    assert "'voc_2007_trainval+voc_2012_trainval': left out 0 of 7 images" in log
    written = json.loads((out / "metrics.json").read_text())
    assert written["voc"]["mAP_area"] == pytest.approx(metrics["voc"]["mAP_area"])
    per_class = written["voc"]["per_class"]
    # only the three classes present in VOC 2007 test have an AP; the other 17 have none (null in json)
    assert {name for name, ap in per_class.items() if ap["AP_area"] is not None} <= set(SHAPE_TO_VOC.values())
    assert sum(ap["AP_area"] is None for ap in per_class.values()) >= 17

    devkit = out / "inference" / "voc_2007_test" / "voc_results"
    assert len(list(devkit.glob("comp4_det_test_*.txt"))) == 20
    lines = [line.split() for path in sorted(devkit.glob("*.txt")) for line in path.read_text().splitlines()]
    assert lines and all(len(fields) == 6 and fields[0].startswith("2007_") for fields in lines)
    capsys.readouterr()
    rescored = tmp_path / "rescored.json"
    voc_root = tmp_path / "VOCdevkit" / "VOC2007"
    args = ["--format", "voc", "--voc-root", str(voc_root), "--split", "test", "--dets", str(devkit)]
    assert eval_det.main([*args, "--json-out", str(rescored)]) == 0
    assert "mAP" in capsys.readouterr().out
    assert json.loads(rescored.read_text())["voc"] == written["voc"]  # the same numbers from the files alone


def test_tool_errors_are_one_line_on_stderr_with_the_traceback_in_log_txt(tmp_path):
    def tool(*args):
        return subprocess.run(
            [sys.executable, str(REPO / "tools" / "train_det.py"), "--cfg", str(REPO / "configs/shapes_r18.yaml"), *args],
            capture_output=True, text=True, cwd=tmp_path, timeout=300,
        )

    typo = tool("--output", str(tmp_path / "a"), "SOLVER.BASE_RL=0.1")
    assert typo.returncode == 1
    assert typo.stderr == (
        "train_det.py: error: Unknown config key 'SOLVER.BASE_RL' on the command line; did you mean 'SOLVER.BASE_LR'?\n"
    )
    # an error once the output folder is set up: one line, and the whole story in log.txt
    missing = tool("MODEL.DEVICE=cpu", f"DATASETS.TRAIN=[{tmp_path}/absent.json:{tmp_path}]", "--output", str(tmp_path / "b"))
    assert missing.returncode == 1
    assert missing.stderr == f"train_det.py: error: COCO annotation file not found: {tmp_path}/absent.json\n"
    log = (tmp_path / "b" / "log.txt").read_text()
    assert "Stopped: COCO annotation file not found" in log and "Traceback (most recent call last)" in log


def test_evaluation_keeps_the_training_config_and_logs_every_test_set(tiny_shapes, tmp_path):
    out = tmp_path / "run"
    orphan = out / f".model_0000002.pth.{2**22 + 12345}.0123abcd.tmp"  # left by a writer killed long ago
    out.mkdir()
    orphan.write_bytes(b"half")
    sets = f"[{tiny_shapes['val']},{tiny_shapes['train']}]"
    train_det.main(["--cfg", str(REPO / "configs/shapes_r18.yaml"), "--output", str(out),
                    *overrides(tiny_shapes, **{"DATASETS.TEST": sets, "SOLVER.MAX_ITER": "2", "SOLVER.STEPS": "[]"})])
    assert not orphan.exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {f"{tiny_shapes['val']}/bbox/AP", f"{tiny_shapes['train']}/bbox/AP"} <= set(records[-1])
    written = json.loads((out / "metrics.json").read_text())
    assert set(written) == {tiny_shapes["val"], tiny_shapes["train"]}  # one entry per test set
    assert {p.name for p in (out / "inference").iterdir()} == {"instances_val", "instances_train"}

    config = (out / "config.yaml").read_text()
    test_det.main(["--cfg", str(out / "config.yaml"), "--ckpt", str(out / "model_final.pth"), "MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.5"])
    train_det.main(["--cfg", str(out / "config.yaml"), "MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.5", "--eval-only"])
    assert (out / "config.yaml").read_text() == config  # the training record stays as it was
    assert "SCORE_THRESH_TEST: 0.5" in (out / "inference" / "config.yaml").read_text()


def test_fine_tuning_from_a_detector_with_another_class_count(tiny_shapes, tmp_path):
    from detectron_res.config import load_config
    from detectron_res.engine.checkpoint import Checkpointer
    from detectron_res.modeling import build_model

    five_classes = load_config(REPO / "configs/shapes_r18.yaml", ["MODEL.DEVICE=cpu", "MODEL.NUM_CLASSES=5"])
    Checkpointer(model=build_model(five_classes), save_dir=tmp_path / "other").save("model_final")
    out = tmp_path / "finetuned"
    train_det.main(["--cfg", str(REPO / "configs/shapes_r18.yaml"), "--output", str(out),
                    *overrides(tiny_shapes, **{"MODEL.WEIGHTS": str(tmp_path / "other" / "model_final.pth"),
                                               "DATASETS.TEST": "[]", "SOLVER.MAX_ITER": "1", "SOLVER.STEPS": "[]"})])
    log = (out / "log.txt").read_text()
    assert "because the shapes differ" in log
    assert "roi_heads.predictor.cls_score.weight: checkpoint (6, 128) vs model (4, 128)" in log
    assert "roi_heads.predictor.bbox_pred.bias: checkpoint (20,) vs model (12,)" in log
