"""Table 9's ablation rows change one thing each: on the COCO configs an explicit NMS row (0.5 -> 0.3) comes before
box refinement, which no longer moves the threshold; on VOC (already 0.3) that row is left out. Each row names its
changes and the NMS threshold in effect, and its overrides reproduce its config; the table prints the changes."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from detectron_res.config import load_config
from detectron_res.engine.ablation import ablation_configs, apply_row, format_ablation_table
from detectron_res.modeling import TestTimeAugmentation

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_coco_rows_change_one_key_each_and_name_the_nms_in_effect():
    rows = ablation_configs(load_config(str(CONFIGS / "coco_r101.yaml"), []))
    assert [row["name"] for row in rows] == [
        "baseline", "NMS at 0.3", "+ box refinement", "+ box voting", "+ multi-scale testing"
    ]
    assert [row["changes"] for row in rows] == [
        {},  # the config has every add-on off already
        {"MODEL.ROI_HEADS.NMS_THRESH_TEST": 0.3},
        {"TEST.BOX_REFINEMENT.ENABLED": True},
        {"TEST.BOX_VOTING.ENABLED": True},
        {"TEST.MULTI_SCALE.ENABLED": True},
    ]
    # the refinement's NMS (TEST.BOX_REFINEMENT.NMS_THRESH) takes over from row 2 at the same 0.3
    assert [row["nms_thresh"] for row in rows] == [0.5, 0.3, 0.3, 0.3, 0.3]
    assert [Path(row["config"].OUTPUT_DIR).parts[-2:] for row in rows] == [("ablation", str(i)) for i in range(5)]


@pytest.mark.parametrize("config", ["coco_r50.yaml", "voc_r50.yaml", "shapes_r18.yaml"])
def test_each_row_differs_from_the_row_above_in_exactly_its_changes_and_its_overrides_reproduce_it(config):
    cfg = load_config(str(CONFIGS / config), [])
    rows = ablation_configs(cfg)
    previous = cfg
    for row in rows:
        differ = {key for key, value in flatten(row["config"]).items() if flatten(previous)[key] != value}
        assert differ - {"OUTPUT_DIR"} == set(row["changes"]), row["name"]
        reproduced = load_config(str(CONFIGS / config), row["overrides"])
        assert flatten(reproduced, skip="OUTPUT_DIR") == flatten(row["config"], skip="OUTPUT_DIR"), row["name"]
        previous = row["config"]


def test_voc_has_no_nms_row_since_its_test_nms_is_the_refinements_already():
    rows = ablation_configs(load_config(str(CONFIGS / "voc_r101.yaml"), []))
    assert [row["name"] for row in rows] == ["baseline", "+ box refinement", "+ box voting", "+ multi-scale testing"]
    assert [row["nms_thresh"] for row in rows] == [0.3] * 4


def test_the_baseline_names_what_it_switched_off_in_the_given_config():
    cfg = load_config(str(CONFIGS / "coco_r50.yaml"), ["TEST.FLIP=true", "TEST.BOX_REFINEMENT.NMS_THRESH=0.4"])
    rows = ablation_configs(cfg)
    assert rows[0]["changes"] == {"TEST.FLIP": False}
    assert rows[1]["name"] == "NMS at 0.4" and rows[1]["changes"] == {"MODEL.ROI_HEADS.NMS_THRESH_TEST": 0.4}
    assert [row["nms_thresh"] for row in rows] == [0.5, 0.4, 0.4, 0.4, 0.4]


def test_a_row_sets_the_models_add_ons_and_its_detection_nms():
    rows = ablation_configs(load_config(str(CONFIGS / "coco_r50.yaml"), []))
    model = SimpleNamespace(test_time=None, roi_heads=SimpleNamespace(predictor=SimpleNamespace(nms_thresh=0.5)))
    apply_row(model, rows[1]["config"])
    assert model.roi_heads.predictor.nms_thresh == 0.3 and model.test_time == TestTimeAugmentation()
    apply_row(model, rows[2]["config"])
    assert model.test_time == TestTimeAugmentation(refine_nms_thresh=0.3)
    apply_row(model, rows[0]["config"])
    assert model.roi_heads.predictor.nms_thresh == 0.5


def test_the_table_prints_each_rows_changes_and_nms():
    rows = [
        {"name": "baseline", "bbox": {"AP": 30.0, "AP50": 50.0}, "seconds_per_image": 0.1, "nms_thresh": 0.5,
         "changes": {}},
        {"name": "NMS at 0.3", "bbox": {"AP": 29.5, "AP50": 49.0}, "seconds_per_image": 0.1, "nms_thresh": 0.3,
         "changes": {"MODEL.ROI_HEADS.NMS_THRESH_TEST": 0.3}},
        {"name": "+ box refinement", "bbox": {"AP": 31.25, "AP50": 50.0}, "seconds_per_image": 0.2, "nms_thresh": 0.3,
         "changes": {"TEST.BOX_REFINEMENT.ENABLED": True}},
    ]
    lines = format_ablation_table(rows).splitlines()
    assert lines[1].split() == ["baseline", "50.0", "30.0", "0.100", "0.5", "-"]
    assert lines[2].endswith("0.3  MODEL.ROI_HEADS.NMS_THRESH_TEST=0.3")
    assert lines[3].endswith("0.3  TEST.BOX_REFINEMENT.ENABLED=true") and " 31.2 " in lines[3]


def flatten(node, prefix="", skip=None):
    """{full key: value} of a config, without the key `skip`."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        elif f"{prefix}{key}" != skip:
            out[f"{prefix}{key}"] = value
    return out
