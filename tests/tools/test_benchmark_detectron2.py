"""tools/benchmark.py --compare detectron2: the one-line error without detectron2 (CI has none), which configs
detectron2 can express, and -- where detectron2 is importable (e.g. PYTHONPATH=path/to/detectron2 source and its
pure-Python dependencies, as tests/d2_reference/README.md lists them) -- that its GeneralizedRCNN built by
`detectron2_equivalent` has our weights and computes our res4 features and detections on a small input, and that the
tool times both."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_tool

from detectron_res.config import load_config
from detectron_res.engine.benchmark import (
    detectron2_config_problem,
    detectron2_equivalent,
    detectron2_inputs,
    import_detectron2,
    synthetic_inputs,
    zero_init_residuals,
)
from detectron_res.modeling import build_model

REPO = Path(__file__).resolve().parents[2]
NOT_IMPORTABLE = ("benchmark.py: error: --compare detectron2: detectron2 is not importable (No module named "
                  "'detectron2'): install it, or put its source folder (the clone of "
                  "github.com/facebookresearch/detectron2) and its Python dependencies on PYTHONPATH")  # fmt: skip


def without_detectron2_on_the_path() -> dict:
    """The environment with PYTHONPATH emptied; skips the test when detectron2 is installed anyway."""
    env = {**os.environ, "PYTHONPATH": ""}
    probe = "import importlib.util; print(importlib.util.find_spec('detectron2'))"
    found = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    if found.stdout.strip() != "None":
        pytest.skip("detectron2 is installed in this environment")
    return env


def test_without_detectron2_the_tool_says_so_in_one_line_before_building_a_model(tmp_path):
    env = without_detectron2_on_the_path()
    out = tmp_path / "compare.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools/benchmark.py"), "--cfg", str(REPO / "configs/d2_r50_c4.yaml"),
         "--compare", "detectron2", "--json-out", str(out)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines() == [NOT_IMPORTABLE]
    assert result.stdout == "" and not out.exists()


def test_import_detectron2_turns_an_import_error_into_a_value_error(monkeypatch):
    for name in [name for name in sys.modules if name == "detectron2" or name.startswith("detectron2.")]:
        monkeypatch.delitem(sys.modules, name)
    for name in ("detectron2", "detectron2.config"):  # importing them then raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ValueError) as error:
        import_detectron2()
    assert str(error.value) == (
        "detectron2 is not importable (import of detectron2.config halted; None in sys.modules): install it, or put "
        "its "
        "source folder (the clone of github.com/facebookresearch/detectron2) and its Python dependencies on PYTHONPATH"
    )


def test_which_configs_detectron2_can_express():
    assert detectron2_config_problem(load_config(REPO / "configs/d2_r50_c4.yaml", [])) is None
    assert detectron2_config_problem(load_config(REPO / "configs/d2_r101_c4.yaml", [])) is None
    suffix = " has no equivalent in detectron2's R-CNN C4 (a config that it can express: configs/d2_r50_c4.yaml, " \
             "d2_r101_c4.yaml)"  # fmt: skip
    assert detectron2_config_problem(load_config(REPO / "configs/coco_r50.yaml", [])) == (
        "INPUT.SIZE_DIVISIBILITY=16" + suffix
    )
    assert detectron2_config_problem(load_config(REPO / "configs/d2_r50_c4.yaml", ["TEST.FLIP=true"])) == (
        "TEST.FLIP=True" + suffix
    )
    assert detectron2_config_problem(load_config(REPO / "configs/d2_r50_c4.yaml", ["MODEL.RPN.MIN_SIZE=1.0"])) == (
        "MODEL.RPN.MIN_SIZE=1.0" + suffix
    )


# -- with detectron2 --------------------------------------------------------------------------------------------------
SMALL = ["MODEL.DEVICE=cpu", "MODEL.RPN.POST_NMS_TOPK_TEST=100", "INPUT.MIN_SIZE_TEST=128", "INPUT.MAX_SIZE_TEST=160"]


@pytest.fixture(scope="module")
def both():
    """Our d2_r50_c4 model with random weights and detectron2's, built by detectron2 with the same weights. Each
    residual block starts at its shortcut; the RPN's objectness and the classifier are re-drawn with a larger spread
    (scores of 0.26-0.87 in 4 classes, not all equal) and the box regressor with a small one (no box is empty after
    clipping: detectron2 drops those, ours keeps them outside the d2 configs' empty-box rule)."""
    pytest.importorskip("detectron2", reason="detectron2 is not importable (its source on PYTHONPATH runs these)")
    cfg = load_config(REPO / "configs/d2_r50_c4.yaml", SMALL)
    torch.manual_seed(0)
    ours = build_model(cfg)
    zero_init_residuals(ours)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ours.rpn.head.objectness_logits.weight.normal_(0, 0.1, generator=generator)
        ours.roi_heads.predictor.cls_score.weight.normal_(0, 0.02, generator=generator)
        ours.roi_heads.predictor.bbox_pred.weight.normal_(0, 0.002, generator=generator)
    theirs = detectron2_equivalent(ours, cfg)
    return cfg, ours.eval(), theirs.eval()


def test_detectron2_gets_every_weight_of_ours(both):
    _, ours, theirs = both
    mine, its = ours.state_dict(), theirs.state_dict()
    pairs = {
        "backbone.stem.conv1.weight": "backbone.conv1.weight",
        "backbone.stem.conv1.norm.bias": "backbone.bn1.bias",
        "backbone.res4.5.conv3.norm.weight": "backbone.layer3.5.bn3.weight",
        "backbone.res2.0.shortcut.weight": "backbone.layer1.0.downsample.0.weight",
        "roi_heads.res5.2.conv2.weight": "roi_heads.res5.2.conv2.weight",
        "proposal_generator.rpn_head.anchor_deltas.weight": "rpn.head.anchor_deltas.weight",
        "roi_heads.box_predictor.cls_score.weight": "roi_heads.predictor.cls_score.weight",
    }
    for theirs_name, our_name in pairs.items():
        assert torch.equal(its[theirs_name], mine[our_name]), theirs_name
    assert its["roi_heads.box_predictor.cls_score.weight"].shape == (81, 2048)  # background last in both
    assert sum(t.numel() for t in its.values()) == sum(mine[k].numel() for k in mine if "num_batches" not in k)


def matched_detections(a: dict, b: dict, *, iou: float, score_tol: float) -> int:
    """How many of `a`'s detections have one of `b`'s, each used once, of the same class, with IoU above `iou` and a
    score within `score_tol`."""
    from torchvision.ops import box_iou

    overlaps = box_iou(a["boxes"], b["boxes"])
    used, matched = set(), 0
    for i in range(len(a["boxes"])):
        for j in overlaps[i].argsort(descending=True).tolist():
            if j in used or overlaps[i, j] <= iou:
                continue
            if a["labels"][i] == b["labels"][j] and abs(a["scores"][i] - b["scores"][j]) <= score_tol:
                used.add(j)
                matched += 1
                break
    return matched


def test_detectron2_computes_our_features_and_detections(both):
    cfg, ours, theirs = both
    inputs = synthetic_inputs(num_images=1, height=128, width=160)
    converted = detectron2_inputs(inputs, input_format=cfg.INPUT.FORMAT)
    assert torch.equal(converted[0]["image"], inputs[0]["image"].flip(0))  # RGB -> the config's BGR
    with torch.inference_mode():
        our_features = ours.prepare(inputs).features
        their_features = theirs.backbone(theirs.preprocess_image(converted).tensor)["res4"]
        assert our_features.shape == their_features.shape == (1, 1024, 8, 10)
        assert (our_features - their_features).abs().max() <= 1e-4 * their_features.abs().max()
        mine = ours(inputs)[0]
        instances = theirs(converted)[0]["instances"]
    its = {"boxes": instances.pred_boxes.tensor, "scores": instances.scores, "labels": instances.pred_classes}
    assert len(mine["boxes"]) == len(its["boxes"]) == 100  # DETECTIONS_PER_IMAGE, many above 0.05
    assert (mine["boxes"][:, 2:] - mine["boxes"][:, :2]).min() > 0.3 and mine["labels"].unique().numel() == 4
    assert matched_detections(mine, its, iou=0.999, score_tol=1e-4) == 100


def test_the_tool_times_detectron2_in_train_mode(tmp_path, capsys):
    pytest.importorskip("detectron2", reason="detectron2 is not importable (its source on PYTHONPATH runs these)")
    benchmark = load_tool("benchmark")
    out = tmp_path / "compare.json"
    results = benchmark.main(["--cfg", str(REPO / "configs/d2_r50_c4.yaml"), "--compare", "detectron2", "--mode",
                              "train", "--runs", "1", "--warmup", "0", "--no-flops", "--json-out", str(out),
                              "MODEL.DEVICE=cpu", "INPUT.MIN_SIZE_TRAIN=[64]", "INPUT.MAX_SIZE_TRAIN=96",
                              "SOLVER.IMS_PER_BATCH=1", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE=8",
                              "MODEL.RPN.POST_NMS_TOPK_TRAIN=16"])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    ours, theirs = results["ours"], results["detectron2"]
    assert len(ours["seconds"]) == len(theirs["seconds"]) == 1
    assert results["speedup"] == ours["images_per_s"] / theirs["images_per_s"]
    assert ours["peak_memory_mb"] > 0 and theirs["peak_memory_mb"] is None  # not separable in one process
    printed = capsys.readouterr().out
    assert "detectron2: median" in printed and "speedup (our images/s over detectron2's)" in printed
