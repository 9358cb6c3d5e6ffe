"""The Appendix B tools end to end on a tiny shapes set: `test_det.py --ablation` (Table 9's rows, ablation.json),
`ensemble_det.py` (one model equals test_det; two models, one with global context, with every add-on on the union
of their proposals; the per-RoI average and the NMS merge), and the errors for an empty pyramid, a non-positive scale
and models with other classes."""

import json
import sys
from pathlib import Path

import pytest
import torch

from detectron_res.config import ConfigError
from detectron_res.data.datasets import generate_shapes

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import ensemble_det  # noqa: E402
import test_det  # noqa: E402
import train_det  # noqa: E402
from conftest import package_logger_restored  # noqa: E402

CONFIG = str(REPO / "configs/shapes_r18.yaml")
ALL_ADD_ONS = [
    "TEST.BOX_REFINEMENT.ENABLED=true",
    "TEST.BOX_VOTING.ENABLED=true",
    "TEST.MULTI_SCALE.ENABLED=true",
    "TEST.FLIP=true",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A plain and a global-context model, 4 iterations each on 12 images of 96 px; 4 test images."""
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=12, num_val=4, image_size=96, seed=1)
    common = [
        "MODEL.DEVICE=cpu",
        f"DATASETS.TRAIN=[{root}/annotations/instances_train.json:{root}/train]",
        f"DATASETS.TEST=[{root}/annotations/instances_val.json:{root}/val]",
        "DATALOADER.NUM_WORKERS=0",
        "INPUT.MIN_SIZE_TRAIN=[96]", "INPUT.MAX_SIZE_TRAIN=96", "INPUT.MIN_SIZE_TEST=96", "INPUT.MAX_SIZE_TEST=96",
        "TEST.MULTI_SCALE.SCALES=[48,96,144]", "TEST.MULTI_SCALE.REFERENCE_SIZE=36",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.01",
        "SOLVER.IMS_PER_BATCH=2", "SOLVER.MAX_ITER=4", "SOLVER.STEPS=[]", "SOLVER.WARMUP_ITERS=2",
    ]
    runs = {}
    for name, extra in (("plain", []), ("context", ["MODEL.ROI_HEADS.GLOBAL_CONTEXT=true"])):
        out = root / name
        with package_logger_restored():
            train_det.main(["--cfg", CONFIG, "--output", str(out), *common, *extra, "DATASETS.TEST=[]"])
        runs[name] = out
    return {"runs": runs, "overrides": common}


def member(run: Path) -> list[str]:
    return ["--model", str(run / "config.yaml"), str(run / "model_final.pth")]


def test_ablation_rows_are_cumulative_change_one_thing_each_and_the_first_is_plain_inference(trained, tmp_path, capsys):
    run = trained["runs"]["context"]
    cfg = str(run / "config.yaml")
    ckpt = str(run / "model_final.pth")
    test_overrides = [o for o in trained["overrides"] if o.startswith("DATASETS.TEST")]
    plain = test_det.main(["--cfg", cfg, "--ckpt", ckpt, "--output", str(tmp_path / "plain"), *test_overrides])
    at_03 = test_det.main(["--cfg", cfg, "--ckpt", ckpt, "--output", str(tmp_path / "nms03"), *test_overrides,
                           "MODEL.ROI_HEADS.NMS_THRESH_TEST=0.3"])
    rows = test_det.main(["--cfg", cfg, "--ckpt", ckpt, "--output", str(tmp_path / "abl"), "--ablation", *test_overrides])
    written = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert [row["name"] for row in written] == [
        "baseline (global context)", "NMS at 0.3", "+ box refinement", "+ box voting", "+ multi-scale testing"
    ]
    assert written[0]["bbox"] == json.loads(json.dumps(plain["bbox"]))  # the first row is test_det's plain run
    # the NMS row is test_det at NMS 0.3 (the loaded model's threshold changed), which scores otherwise here
    assert written[1]["bbox"] == json.loads(json.dumps(at_03["bbox"])) and at_03["bbox"] != plain["bbox"]
    assert [row["changes"] for row in written] == [
        {}, {"MODEL.ROI_HEADS.NMS_THRESH_TEST": 0.3}, {"TEST.BOX_REFINEMENT.ENABLED": True},
        {"TEST.BOX_VOTING.ENABLED": True}, {"TEST.MULTI_SCALE.ENABLED": True},
    ]
    assert [row["nms_thresh"] for row in written] == [0.5, 0.3, 0.3, 0.3, 0.3]
    assert written[0]["overrides"][:2] == ["TEST.BOX_REFINEMENT.ENABLED=false", "TEST.BOX_VOTING.ENABLED=false"]
    assert "TEST.BOX_REFINEMENT.ENABLED=true" in written[2]["overrides"]
    assert "TEST.MULTI_SCALE.ENABLED=true" in written[4]["overrides"]
    assert "TEST.BOX_REFINEMENT.ENABLED=true" in written[4]["overrides"]  # cumulative
    for row in written:
        assert set(row["bbox"]) >= {"AP", "AP50"} and row["seconds_per_image"] > 0
    assert len(rows) == 5 and {p.name for p in (tmp_path / "abl" / "ablation").iterdir()} == {"0", "1", "2", "3", "4"}
    table = capsys.readouterr().out.splitlines()
    assert "mAP@.5" in table[-6] and "mAP@[.5:.95]" in table[-6] and "changed from the row above" in table[-6]
    assert table[-5].endswith(" 0.5  -") and table[-4].endswith(" 0.3  MODEL.ROI_HEADS.NMS_THRESH_TEST=0.3")
    assert table[-1].startswith("+ multi-scale testing") and table[-1].endswith("TEST.MULTI_SCALE.ENABLED=true")


def test_an_ensemble_of_one_model_scores_like_test_det_with_voting(trained, tmp_path):
    run = trained["runs"]["plain"]
    test_overrides = [o for o in trained["overrides"] if o.startswith("DATASETS.TEST")]
    alone = test_det.main(["--cfg", str(run / "config.yaml"), "--ckpt", str(run / "model_final.pth"),
                           "--output", str(tmp_path / "alone"), *test_overrides, "TEST.BOX_VOTING.ENABLED=true"])
    ensemble = ensemble_det.main([*member(run), "--output", str(tmp_path / "ens"), *test_overrides])
    assert ensemble["bbox"] == alone["bbox"]  # the ensemble votes unless told otherwise
    assert "ENABLED: true" in (tmp_path / "ens" / "inference" / "config.yaml").read_text().split("BOX_VOTING:")[1]
    without = ensemble_det.main([*member(run), "--output", str(tmp_path / "novote"), *test_overrides,
                                 "TEST.BOX_VOTING.ENABLED=false"])
    plain = test_det.main(["--cfg", str(run / "config.yaml"), "--ckpt", str(run / "model_final.pth"),
                           "--output", str(tmp_path / "plain"), *test_overrides])
    assert without["bbox"] == plain["bbox"]
    members = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert members["proposals"] == "own" and len(members["models"]) == 1


def test_every_add_on_at_once_in_an_ensemble_of_a_plain_and_a_context_model(trained, tmp_path):
    runs = trained["runs"]
    test_overrides = [o for o in trained["overrides"] if o.startswith(("DATASETS.TEST", "TEST."))]
    metrics = ensemble_det.main([*member(runs["plain"]), *member(runs["context"]), "--proposals", "union",
                                 "--output", str(tmp_path / "all"), *test_overrides, *ALL_ADD_ONS])
    assert 0.0 <= metrics["bbox"]["AP"] <= metrics["bbox"]["AP50"] <= 100.0
    config = (tmp_path / "all" / "inference" / "config.yaml").read_text()
    assert "GLOBAL_CONTEXT: false" in config and "FLIP: true" in config  # the first model's config, evaluated
    written = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert written["bbox"]["AP"] == pytest.approx(metrics["bbox"]["AP"])


def test_the_union_averages_per_roi_by_default_and_the_nms_merge_is_named(trained, tmp_path):
    runs = trained["runs"]
    test_overrides = [o for o in trained["overrides"] if o.startswith("DATASETS.TEST")]
    both = [*member(runs["plain"]), *member(runs["context"]), "--proposals", "union"]
    average = ensemble_det.main([*both, "--output", str(tmp_path / "avg"), *test_overrides])
    nms = ensemble_det.main([*both, "--merge", "nms", "--output", str(tmp_path / "nms"), *test_overrides])
    assert json.loads((tmp_path / "avg" / "ensemble.json").read_text())["merge"] == "average"
    assert json.loads((tmp_path / "nms" / "ensemble.json").read_text())["merge"] == "nms"
    assert average["bbox"] != nms["bbox"]  # two merges of the same two models
    # the average merge post-processes as configured (no voting forced); the nms merge votes unless told not to
    assert "ENABLED: false" in (tmp_path / "avg" / "inference" / "config.yaml").read_text().split("BOX_VOTING:")[1]
    assert "ENABLED: true" in (tmp_path / "nms" / "inference" / "config.yaml").read_text().split("BOX_VOTING:")[1]
    with pytest.raises(ValueError, match="--merge average averages every model's .* needs --proposals union"):
        ensemble_det.main([*member(runs["plain"]), *member(runs["context"]), "--merge", "average",
                           "--output", str(tmp_path / "own")])
    assert not (tmp_path / "own").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("TEST.MULTI_SCALE.SCALES=[]", r"TEST\.MULTI_SCALE\.SCALES=\[\] must not be empty"),
        ("TEST.MULTI_SCALE.SCALES=[48,0]", r"TEST\.MULTI_SCALE\.SCALES=\[48, 0\] has element \[1\]=0 that must be > 0"),
    ],
)
def test_a_bad_pyramid_stops_before_any_work_naming_the_key(trained, tmp_path, override, message):
    run = trained["runs"]["plain"]
    with pytest.raises(ConfigError, match=message):
        test_det.main(["--cfg", str(run / "config.yaml"), "--output", str(tmp_path / "x"), "TEST.MULTI_SCALE.ENABLED=true", override])
    assert not (tmp_path / "x").exists()


def test_ensemble_members_with_other_classes_are_named(trained, tmp_path):
    run = trained["runs"]["plain"]
    other = tmp_path / "other.yaml"
    other.write_text((run / "config.yaml").read_text().replace("NUM_CLASSES: 3", "NUM_CLASSES: 4"))
    with pytest.raises(ValueError, match=rf"MODEL\.NUM_CLASSES=3 in {run / 'config.yaml'} but 4 in {other}"):
        ensemble_det.main([*member(run), "--model", str(other), str(run / "model_final.pth"), "--output", str(tmp_path / "a")])
    state = torch.load(run / "model_final.pth", weights_only=True)
    state["metadata"]["class_names"] = ["circle", "square", "star"]
    torch.save(state, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match=rf"class 2 is 'triangle' in {run / 'model_final.pth'} but 'star' in {tmp_path / 'renamed.pth'}"):
        ensemble_det.main([*member(run), "--model", str(run / "config.yaml"), str(tmp_path / "renamed.pth"),
                           "--output", str(tmp_path / "b")])
