"""The localization tools end to end on a tiny loc_shapes set (the CSV:IMAGE_DIR form of the config): train_loc.py
trains the RPN and R-CNN stages; localize.py writes the submission (text and CSV) for a folder of images with each
class source (the system's own ranking, the ground truth, a predictions file, a torchvision classifier), and its
score equals the evaluator's on the same guesses. Issue 21: outputs that land on inputs or on each other are refused
before anything is written (the real program too, one line on stderr), class files without classes are refused,
images of extreme aspect ratio are localised and unloadable ones skipped or named, and the CSV form is scored."""

import json
import subprocess
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
    log = (output / "log.txt").read_text()  # the R-CNN stage's batch is RoIs, set by LOC.RCNN.IMS_PER_BATCH
    assert "Training on 1 process: global batch 4 images (SOLVER.IMS_PER_BATCH), 4 per process" in log
    assert "Training on 1 process: global batch 4 RoIs (LOC.RCNN.IMS_PER_BATCH), 4 per process" in log


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


# --- issue 21: nothing the tool is given is overwritten; bad inputs stop it naming the file ------------------------


def snapshot(*paths: Path) -> dict[Path, bytes]:
    """The bytes of every file under `paths` (files or folders), to check later that none changed."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    return {f: f.read_bytes() for f in files if f.is_file()}


def small_inputs(tmp_path: Path) -> dict[str, Path]:
    """A loc_shapes-like synset mapping and ground truth, two images, a class-predictions file and a submission:
    enough for the path checks, which come before any model is loaded (the --ckpt file is never read)."""
    root = tmp_path.resolve() / "in"
    (root / "images").mkdir(parents=True)
    for name, (h, w) in {"img_a.png": (20, 30), "img_b.png": (24, 16)}.items():
        cv2.imwrite(str(root / "images" / name), np.full((h, w, 3), 90, np.uint8))
    (root / "elsewhere").mkdir()  # an image of the folder that is a symlink to a file outside it
    cv2.imwrite(str(root / "elsewhere" / "c.png"), np.full((8, 8, 3), 40, np.uint8))
    (root / "images" / "img_c.png").symlink_to(root / "elsewhere" / "c.png")
    files = {
        "synsets": "n90000001 circle\nn90000002 square\nn90000003 triangle\nn90000004 cross\nn90000005 ring\n",
        "gt.csv": "ImageId,PredictionString\nimg_a,n90000001 1 1 10 10\nimg_b,n90000002 2 2 9 9\n",
        "preds.txt": "img_a 1 2\nimg_b 2\n",
        "sub.txt": "1 1 1 10 10\n2 2 2 9 9\n",
        "ckpt.pth": "never read",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    return {"root": root, "images": root / "images", **{name.split(".")[0]: root / name for name in files}}


def write_args(paths: dict[str, Path]) -> list[str]:
    return ["--cfg", CONFIG, "--ckpt", str(paths["ckpt"]), "--no-rcnn", "--images", str(paths["images"]),
            "--synsets", str(paths["synsets"]), "MODEL.DEVICE=cpu", "DATALOADER.NUM_WORKERS=0"]


def evaluate_args(paths: dict[str, Path]) -> list[str]:
    return ["--evaluate", "--submission", str(paths["sub"]), "--gt", str(paths["gt"]),
            "--synsets", str(paths["synsets"])]


@pytest.mark.parametrize("mode", ["write", "evaluate"])
def test_an_output_equal_to_an_input_or_aliasing_it_through_a_symlink_is_refused_by_the_real_tool(tmp_path, mode):
    """Acceptance of issue 21: the tool, run as a program, exits 1 with one line on stderr and every input keeps its
    bytes, for an output path equal to an input and for one that is a symlink to it."""
    paths = small_inputs(tmp_path)
    alias = tmp_path.resolve() / "alias.csv"
    alias.symlink_to(paths["gt"])
    before = snapshot(paths["root"])
    base = write_args(paths) if mode == "write" else evaluate_args(paths)
    flag = "--csv-out" if mode == "write" else "--json-out"
    extra = ["--out", str(tmp_path.resolve() / "out" / "sub.txt"), "--gt", str(paths["gt"])] if mode == "write" else []
    for output, shown in ((paths["gt"], str(paths["gt"])), (alias, f"{alias} (= {paths['gt']})")):
        result = subprocess.run([sys.executable, str(REPO / "tools/localize.py"), *base, *extra, flag, str(output)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        assert result.stderr == (
            f"localize.py: error: {flag} {shown} is the same path as the input --gt {paths['gt']}: refusing to "
            "overwrite it\n"
        )
        assert snapshot(paths["root"]) == before and alias.is_symlink()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        # item 2: --out over an input image wrote the submission into it
        ("out_is_an_image", "--out {images}/img_a.png is the same path as the input an image of --images "
                            "{images}/img_a.png: refusing to overwrite it"),
        ("out_in_the_image_folder", "--out {images}/sub.txt lies inside the input --images {images}: refusing to "
                                    "write there"),
        # item 3: --csv-out over --gt destroyed the ground truth, then scored the submission against itself
        ("csv_out_is_gt", "--csv-out {gt} is the same path as the input --gt {gt}: refusing to overwrite it"),
        # item 4: --out over --cls-preds replaced the user's class predictions
        ("out_is_cls_preds", "--out {preds} is the same path as the input --cls-preds {preds}: refusing to "
                             "overwrite it"),
        # item 6: --out and --csv-out on one file: the CSV over the devkit submission
        ("out_is_csv_out", "--out {tmp}/same.txt and --csv-out {tmp}/same.txt are the same path: one output would "
                           "overwrite the other"),
        ("csv_out_is_image_list", "--csv-out {tmp}/sub.images.txt and --out's image list {tmp}/sub.images.txt are the "
                                  "same path: one output would overwrite the other"),
        ("json_out_is_synsets_file", "--out's synsets file {tmp}/sub.synsets.txt and --json-out {tmp}/sub.synsets.txt "
                                     "are the same path: one output would overwrite the other"),
        ("out_is_a_symlinked_image", "--out {root}/elsewhere/c.png is the same path as the input an image of --images "
                                     "{images}/img_c.png (= {root}/elsewhere/c.png): refusing to overwrite it"),
        ("out_is_cfg", "--out {cfg} is the same path as the input --cfg {cfg}: refusing to overwrite it"),
        ("out_is_ckpt", "--out {ckpt} is the same path as the input --ckpt {ckpt}: refusing to overwrite it"),
        ("out_holds_the_inputs", "the input --synsets {synsets} lies inside the output --out {root}: the tool's "
                                 "files could overwrite it"),
        ("evaluate_json_out_is_submission", "--json-out {sub} is the same path as the input --submission {sub}: "
                                            "refusing to overwrite it"),
        ("evaluate_json_out_is_image_list", "--json-out {images}/../list.txt (= {root}/list.txt) is the same path as "
                                            "the input --image-list {root}/list.txt: refusing to overwrite it"),
    ],
)
def test_each_output_landing_on_an_input_or_another_output_is_refused_before_anything_is_written(
    tmp_path, capsys, case, message
):
    """Issue 21, items 2, 3, 4 and 6 and the general rule: every output of localize.py (with the files it writes
    beside --out) against every input and every other output, in both modes; nothing is written, nothing changes."""
    paths = small_inputs(tmp_path)
    tmp = tmp_path.resolve()
    (paths["root"] / "list.txt").write_text("img_a\nimg_b\n")
    names = {**{k: str(v) for k, v in paths.items()}, "tmp": str(tmp), "cfg": CONFIG}
    sub = str(tmp / "sub.txt")
    argv = {
        "out_is_an_image": [*write_args(paths), "--out", f"{paths['images']}/img_a.png"],
        "out_in_the_image_folder": [*write_args(paths), "--out", f"{paths['images']}/sub.txt"],
        "csv_out_is_gt": [*write_args(paths), "--out", sub, "--csv-out", str(paths["gt"]), "--gt", str(paths["gt"])],
        "out_is_cls_preds": [*write_args(paths), "--out", str(paths["preds"]), "--cls-preds", str(paths["preds"])],
        "out_is_csv_out": [*write_args(paths), "--out", f"{tmp}/same.txt", "--csv-out", f"{tmp}/same.txt"],
        "csv_out_is_image_list": [*write_args(paths), "--out", sub, "--csv-out", f"{tmp}/sub.images.txt"],
        "json_out_is_synsets_file": [*[a for a in write_args(paths) if a not in ("--synsets", str(paths["synsets"]))],
                                     "--out", sub, "--gt", str(paths["gt"]), "--json-out", f"{tmp}/sub.synsets.txt"],
        "out_is_a_symlinked_image": [*write_args(paths), "--out", f"{paths['root']}/elsewhere/c.png"],
        "out_is_cfg": [*write_args(paths), "--out", CONFIG],
        "out_is_ckpt": [*write_args(paths), "--out", str(paths["ckpt"])],
        "out_holds_the_inputs": [*write_args(paths), "--out", str(paths["root"])],
        "evaluate_json_out_is_submission": [*evaluate_args(paths), "--json-out", str(paths["sub"])],
        "evaluate_json_out_is_image_list": [*evaluate_args(paths), "--image-list", str(paths["root"] / "list.txt"),
                                            "--json-out", f"{paths['images']}/../list.txt"],
    }[case]
    before = snapshot(paths["root"], Path(CONFIG))
    assert localize.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err == f"localize.py: error: {message.format(**names)}\n"
    assert captured.out == ""
    assert snapshot(paths["root"], Path(CONFIG)) == before
    assert sorted(p.name for p in tmp.iterdir()) == ["in"]  # no submission, image list or CSV written


def test_the_checkpoints_the_config_falls_back_to_are_inputs_too(trained, tmp_path, capsys):
    root, output, common, _ = trained
    for stage, what in (("rpn", "RPN checkpoint"), ("rcnn", "R-CNN checkpoint")):
        checkpoint = output / stage / "model_final.pth"
        before = checkpoint.read_bytes()
        assert localize.main(["--cfg", CONFIG, "--images", str(root / "val"), "--out", str(checkpoint), *common]) == 1
        assert capsys.readouterr().err == (
            f"localize.py: error: --out {checkpoint} is the same path as the input {what} {checkpoint}: refusing to "
            "overwrite it\n"
        )
        assert checkpoint.read_bytes() == before and not checkpoint.with_suffix(".images.txt").exists()
        if stage == "rpn":  # the R-CNN checkpoint is an input only when the R-CNN stage runs
            common = [*common, "--ckpt", str(checkpoint)]


def test_class_predictions_with_ids_but_no_classes_are_refused(trained, tmp_path, capsys):
    """Issue 21, item 11: ids without classes wrote empty submission lines and exited 0 (100 % error with --gt)."""
    root, _, common, _ = trained
    predictions = tmp_path / "preds.txt"
    ids = sorted(p.stem for p in (root / "val").iterdir())
    predictions.write_text(f"{ids[0]} n90000003 2\n" + "".join(f"{i}\n" for i in ids[1:]))
    out = tmp_path / "sub.txt"
    code = localize.main(["--cfg", CONFIG, "--images", str(root / "val"), "--out", str(out), "--cls-preds",
                          str(predictions), "--gt", str(root / "LOC_val_solution.csv"), *common])
    assert code == 1
    assert capsys.readouterr().err == (
        f"localize.py: error: {predictions}, line 2: image {ids[1]!r} has no classes (a line is 'IMAGE_ID c1 ... c5')\n"
    )
    assert not out.exists()


def write_hard_images(folder: Path) -> None:
    """Two images of extreme aspect ratio, a good one, and four that cannot be loaded: an empty file, a PNG and a
    JPEG whose headers stop early, a JPEG whose data stops before its end (its header reads)."""
    folder.mkdir()
    cv2.imwrite(str(folder / "a_tall.png"), np.full((6000, 4, 3), 128, np.uint8))
    cv2.imwrite(str(folder / "b_wide.png"), np.full((3, 6000, 3), 128, np.uint8))
    cv2.imwrite(str(folder / "c_good.png"), np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    (folder / "d_empty.png").write_bytes(b"")
    (folder / "e_header.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 20)
    (folder / "f_header.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
    good_jpeg = cv2.imencode(".jpg", np.full((30, 30, 3), 200, np.uint8))[1].tobytes()
    (folder / "g_truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])


@pytest.mark.parametrize("sizes", [[], ["INPUT.MIN_SIZE_TEST=256", "INPUT.MAX_SIZE_TEST=800"]])
def test_extreme_aspect_ratios_are_localised_and_unloadable_images_skipped_or_named(trained, tmp_path, capsys, sizes):
    """Issue 21, item 13: 4x6000 and 6000x3 images at loc_shapes' and ilsvrc_loc's test sizes get boxes inside them;
    with DATALOADER.ON_BAD_IMAGE=skip an empty, header-corrupt or truncated image gets an empty line (the run used
    to stop at the first header it could not read); without, the run stops naming it."""
    _, _, common, _ = trained
    folder = tmp_path / "images"
    write_hard_images(folder)
    out = tmp_path / "sub.txt"
    args = ["--cfg", CONFIG, "--images", str(folder), "--out", str(out), *common, *sizes]
    assert localize.main([*args, "DATALOADER.ON_BAD_IMAGE=skip"]) == 0, capsys.readouterr().err
    ids = ["a_tall", "b_wide", "c_good", "d_empty", "e_header", "f_header", "g_truncated"]
    assert (tmp_path / "sub.images.txt").read_text().split() == ids
    guesses = read_submission(out, num_images=7, num_classes=5)
    assert [len(labels) for labels, _ in guesses] == [5, 5, 5, 0, 0, 0, 0]
    for (_, boxes), (height, width) in zip(guesses[:3], [(6000, 4), (3, 6000), (40, 50)]):
        assert (boxes >= 0).all() and (boxes[:, 2] <= width - 1).all() and (boxes[:, 3] <= height - 1).all()
    capsys.readouterr()
    out.unlink()
    assert localize.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"localize.py: error: cannot read the image header of {folder / 'd_empty.png'}: ")
    assert err.endswith(" (DATALOADER.ON_BAD_IMAGE=skip leaves its line empty)\n") and err.count("\n") == 1
    assert not out.exists()


def test_the_tools_own_csv_form_scores_as_its_text_form(trained, tmp_path, capsys):
    """Issue 21, item 18: --csv-out's file given to --evaluate was read as a text submission and refused."""
    root, _, common, _ = trained
    out, csv_out = tmp_path / "sub.txt", tmp_path / "sub.csv"
    gt, synsets = root / "LOC_val_solution.csv", root / "LOC_synset_mapping.txt"
    assert localize.main(["--cfg", CONFIG, "--images", str(root / "val"), "--out", str(out), "--csv-out",
                          str(csv_out), *common]) == 0
    scores = []
    for submission, image_list in ((out, ["--image-list", str(tmp_path / "sub.images.txt")]), (csv_out, [])):
        json_out = tmp_path / f"{submission.suffix[1:]}.json"
        assert localize.main(["--evaluate", "--submission", str(submission), "--gt", str(gt), "--synsets",
                              str(synsets), *image_list, "--json-out", str(json_out)]) == 0, capsys.readouterr().err
        scores.append(json.loads(json_out.read_text())["loc"])
    assert scores[0] == scores[1] and scores[0]["num_images"] == 4
