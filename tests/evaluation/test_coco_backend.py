"""TEST.COCO_BACKEND: faster-coco-eval's COCOeval_faster gives pycocotools' numbers, and the choice reaches the
evaluation (config, runner, tools/eval_det.py, tools/benchmark.py --mode coco-eval)."""

from __future__ import annotations

import builtins
import importlib
import importlib.util
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GroundTruthModel

from detectron_res.config import ConfigError, load_config
from detectron_res.data.datasets import generate_shapes
from detectron_res.data.datasets.base import DetectionDataset
from detectron_res.engine.benchmark import coco_eval_times, synthetic_coco_evaluation
from detectron_res.engine.runner import evaluate
from detectron_res.evaluation import coco as coco_module
from detectron_res.evaluation.coco import (
    COCOEvaluator,
    check_coco_backend,
    coco_pr_curves,
    evaluate_coco_results,
    load_coco_ground_truth,
    resolve_coco_backend,
    run_coco_evaluation,
)

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
FIRST100 = DATA / "coco_val2014_first100"
COCO128 = DATA / "coco128" / "annotations" / "instances_train2017.json"
TOOLS = REPO / "tools"

pytest.importorskip("faster_coco_eval", reason="the faster_coco_eval backend needs pip install faster-coco-eval")


def run_both(gt, results: list[dict], img_ids=None) -> dict:
    """Each backend's COCOeval (evaluated, accumulated, summarized) and evaluate_coco_results' metrics."""
    coco_gt = load_coco_ground_truth(gt)
    out = {}
    for backend, run in (("pycocotools", coco_module._pycocotools_cocoeval),
                         ("faster_coco_eval", coco_module._faster_cocoeval)):  # fmt: skip
        coco_eval = run(coco_gt, results, img_ids)
        coco_eval.print_function = lambda *args: None
        with open("/dev/null", "w") as sink:
            stdout, sys.stdout = sys.stdout, sink
            try:
                coco_eval.summarize()
            finally:
                sys.stdout = stdout
        metrics = evaluate_coco_results(coco_gt, results, img_ids=img_ids, backend=backend)["bbox"]
        out[backend] = (coco_eval, metrics)
    return out


def assert_same(both: dict) -> dict:
    """Every summary number, per-class AP, the precision array and the PR curves agree to 1e-6; returns the metrics."""
    (reference, metrics), (faster, faster_metrics) = both["pycocotools"], both["faster_coco_eval"]
    np.testing.assert_allclose(np.asarray(faster.stats)[:12], reference.stats, atol=1e-6, rtol=0)
    assert reference.eval["precision"].shape == faster.eval["precision"].shape
    np.testing.assert_allclose(faster.eval["precision"], reference.eval["precision"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(faster.eval["recall"], reference.eval["recall"], atol=1e-6, rtol=0)
    assert metrics.keys() == faster_metrics.keys()
    for key, value in metrics.items():
        assert (value is None) == (faster_metrics[key] is None), key
        if value is not None:
            assert faster_metrics[key] == pytest.approx(value, abs=1e-6), key
    for ours, theirs in zip(coco_pr_curves(reference), coco_pr_curves(faster), strict=True):
        assert (ours.name, ours.ap.keys(), ours.curves.keys()) == (theirs.name, theirs.ap.keys(), theirs.curves.keys())
        for name, (recall, precision) in ours.curves.items():
            np.testing.assert_allclose(theirs.curves[name][1], precision, atol=1e-6, rtol=0)
    return metrics


@pytest.mark.skipif(not FIRST100.is_dir(), reason="../shared/data/coco_val2014_first100 is not present")
def test_backends_agree_on_coco_val2014_first100_with_cocoapis_fake_results():
    results = json.loads((FIRST100 / "instances_val2014_fakebbox100_results.json").read_text())
    metrics = assert_same(run_both(FIRST100 / "instances_val2014_first100_nocrowd_bboxarea.json", results))
    # cocoapi's own expected output for these files (pycocoEvalDemo): AP 0.505, AP50 0.697, AP75 0.573
    assert metrics["AP"] == pytest.approx(50.4, abs=0.1) and metrics["AP50"] == pytest.approx(69.7, abs=0.1)


def jittered_detections(gt: dict, *, seed: int, per_image: int = 20) -> list[dict]:
    """Each ground-truth box found with jittered corners (a tenth with the wrong class), plus random boxes; random
    scores rounded to 2 decimals so that ties across images occur (both backends must break them alike)."""
    rng = np.random.default_rng(seed)
    category_ids = [category["id"] for category in gt["categories"]]
    by_image: dict = {image["id"]: [] for image in gt["images"]}
    for annotation in gt["annotations"]:
        by_image[annotation["image_id"]].append(annotation)
    results = []
    for image in gt["images"]:
        for annotation in by_image[image["id"]]:
            x, y, w, h = annotation["bbox"]
            dx, dy, dw, dh = rng.uniform(-0.2, 0.2, size=4) * [w, h, w, h]
            label = int(rng.choice(category_ids)) if rng.uniform() < 0.1 else annotation["category_id"]
            results.append({"image_id": image["id"], "category_id": label,
                            "bbox": [x + dx, y + dy, max(w + dw, 1.0), max(h + dh, 1.0)], "score": 0.0})
        for _ in range(per_image):
            w, h = rng.uniform(5, image["width"] / 2), rng.uniform(5, image["height"] / 2)
            results.append({"image_id": image["id"], "category_id": int(rng.choice(category_ids)),
                            "bbox": [rng.uniform(0, image["width"] - w), rng.uniform(0, image["height"] - h), w, h],
                            "score": 0.0})
    for entry in results:
        entry["score"] = float(rng.integers(1, 100) / 100)
    return results


@pytest.mark.skipif(not COCO128.is_file(), reason="../shared/data/coco128 is not present")
def test_backends_agree_on_coco128_with_synthetic_detections():
    gt = json.loads(COCO128.read_text())
    metrics = assert_same(run_both(gt, jittered_detections(gt, seed=0)))
    assert 5 < metrics["AP"] < 95  # neither trivial nor empty: the matching was exercised


def crowd_case() -> tuple[dict, list[dict]]:
    """Three images with str ids (faster-coco-eval wants ints: the backend maps them), a crowd region, a class with
    ground truth and no detections, one with detections and no ground truth, and one with neither."""
    gt = {
        "images": [{"id": name, "width": 100, "height": 100} for name in ("c", "a", "b")],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "owl"},
                       {"id": 4, "name": "emu"}],
        "annotations": [
            {"id": 1, "image_id": "a", "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
            {"id": 2, "image_id": "a", "category_id": 1, "bbox": [50, 50, 40, 40], "area": 1600, "iscrowd": 1},
            {"id": 3, "image_id": "b", "category_id": 1, "bbox": [0, 0, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 4, "image_id": "c", "category_id": 2, "bbox": [5, 5, 60, 60], "area": 3600, "iscrowd": 0},
        ],
    }
    results = [
        {"image_id": "a", "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.9},  # TP
        {"image_id": "a", "category_id": 1, "bbox": [55, 55, 20, 20], "score": 0.8},  # in the crowd: ignored
        {"image_id": "b", "category_id": 1, "bbox": [60, 60, 20, 20], "score": 0.8},  # FP, tied with the ignored one
        {"image_id": "c", "category_id": 1, "bbox": [0, 0, 20, 20], "score": 0.8},  # FP, tied too
        {"image_id": "b", "category_id": 1, "bbox": [2, 2, 20, 20], "score": 0.7},  # TP at IoU 0.68
        {"image_id": "b", "category_id": 3, "bbox": [2, 2, 20, 20], "score": 0.6},  # owl: no ground truth
    ]
    return gt, results


def test_backends_agree_with_crowd_boxes_empty_classes_and_str_image_ids():
    gt, results = crowd_case()
    metrics = assert_same(run_both(gt, results))
    # cat, ranked: TP .9, then three at .8 (the crowd one ignored, two FPs), TP .7 at IoU 400-36-36 / ... = 0.68.
    # At IoU <= 0.65 (4 of 10 thresholds): recall .5 .5 .5 1, precision 1 .5 1/3 .5 -> envelope 1 up to .5, .5 beyond
    #   -> (51 + 50 * .5) / 101; at IoU >= 0.7: 1 up to .5, 0 beyond -> 51 / 101.
    expected_cat = (4 * (51 + 25) / 101 + 6 * 51 / 101) / 10 * 100
    assert metrics["AP-cat"] == pytest.approx(expected_cat, abs=1e-9)
    assert metrics["AP-dog"] == 0.0  # ground truth, no detections
    assert metrics["AP-owl"] is None and metrics["AP-emu"] is None  # no ground truth
    subset = run_both(gt, results, img_ids=["b", "a"])  # evaluating some images only
    assert_same(subset)
    assert subset["faster_coco_eval"][1]["AP-dog"] is None  # its image left out


def test_backends_agree_with_str_annotation_ids():
    """faster-coco-eval indexes annotations by int id only; pycocotools takes str ids too (1 and "1" differ; it
    stores the matched id in a float array, so only numeric strings)."""
    gt, results = crowd_case()
    for annotation, new_id in zip(gt["annotations"], ["1", 1, "30", 9]):
        annotation["id"] = new_id
    metrics = assert_same(run_both(gt, results))
    assert metrics["AP-cat"] == pytest.approx((4 * (51 + 25) / 101 + 6 * 51 / 101) / 10 * 100, abs=1e-9)
    assert metrics["AP-dog"] == 0.0


def test_tied_scores_across_str_image_ids_break_in_pycocotools_order():
    # pycocotools walks images in sorted id order ("a" before "b", whatever the file's order) and ranks equal scores
    # in that order: the TP in "a" comes before the FP in "b": recall .5 at precision 1, then 1/2 -> AP 51 / 101.
    # (In the file's order, FP then TP, it would be 25.5 / 101.)
    gt = {"images": [{"id": name, "width": 50, "height": 50} for name in ("b", "a")],
          "categories": [{"id": 1, "name": "cat"}],
          "annotations": [{"id": index, "image_id": image, "category_id": 1, "bbox": [0, 0, 20, 20], "area": 400}
                          for index, image in enumerate(("a", "b"), start=1)]}
    results = [{"image_id": "b", "category_id": 1, "bbox": [25, 25, 20, 20], "score": 0.5},
               {"image_id": "a", "category_id": 1, "bbox": [0, 0, 20, 20], "score": 0.5}]
    assert assert_same(run_both(gt, results))["AP"] == pytest.approx(51 / 101 * 100, abs=1e-9)


def test_backends_agree_without_any_detection():
    gt, _ = crowd_case()
    metrics = assert_same(run_both(gt, []))
    assert metrics["AP"] == 0.0 and metrics["AP-cat"] == 0.0


def test_an_unknown_or_missing_backend_is_refused_in_one_line(monkeypatch):
    with pytest.raises(ValueError, match=r"backend 'fast' is unknown; choose one of auto, pycocotools, "
                                         r"faster_coco_eval$"):
        check_coco_backend("fast")
    with pytest.raises(ValueError, match=r"backend 'fast' is unknown"):
        resolve_coco_backend("fast")
    hide_faster_coco_eval(monkeypatch)
    with pytest.raises(ValueError, match=r"needs the faster-coco-eval package: pip install faster-coco-eval"):
        evaluate_coco_results(crowd_case()[0], [], backend="faster_coco_eval")  # explicit: no fallback
    check_coco_backend("pycocotools")  # always there
    check_coco_backend("auto")


def hide_faster_coco_eval(monkeypatch, how: str = "find_spec") -> None:
    """Make faster-coco-eval look not installed (``find_spec`` finds nothing, as where it is not), not importable
    (``sys.modules`` entry None: find_spec returns None and the import raises), or installed but broken (found,
    the import raises, as a wheel built for another Python would)."""
    if how == "find_spec":
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *args: None if name == "faster_coco_eval" else real(name, *args))
    elif how == "sys.modules":
        monkeypatch.setitem(sys.modules, "faster_coco_eval", None)
    else:
        real_import = builtins.__import__

        def broken(name, *args, **kwargs):
            if name == "faster_coco_eval":
                raise ImportError("faster_eval_api_cpp: undefined symbol")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", broken)


@pytest.mark.parametrize("how", ["find_spec", "sys.modules", "import fails"])
def test_auto_is_faster_coco_eval_where_it_imports_else_pycocotools(monkeypatch, how):
    assert resolve_coco_backend("auto") == "faster_coco_eval"  # installed here (the module's importorskip)
    assert resolve_coco_backend("pycocotools") == "pycocotools"
    assert resolve_coco_backend("faster_coco_eval") == "faster_coco_eval"
    hide_faster_coco_eval(monkeypatch, how)
    assert resolve_coco_backend("auto") == "pycocotools"
    assert resolve_coco_backend("pycocotools") == "pycocotools"


@pytest.mark.parametrize("hidden", [False, True])
def test_auto_runs_and_logs_the_resolved_backend(monkeypatch, caplog, hidden):
    expected = "pycocotools" if hidden else "faster_coco_eval"
    if hidden:
        hide_faster_coco_eval(monkeypatch, "sys.modules")
    gt, results = crowd_case()
    used = spy_on_backends(monkeypatch)
    with caplog.at_level(logging.INFO, logger="detectron_res.evaluation.coco"):
        evaluation = run_coco_evaluation(gt, results)  # no backend: the default, auto
        metrics = evaluate_coco_results(gt, results, backend="auto")["bbox"]
    assert used == [expected, expected]
    assert evaluation.backend == expected
    summaries = [record.getMessage().split(" bbox summary")[0] for record in caplog.records
                 if "bbox summary" in record.getMessage()]
    assert summaries == [f"COCOeval ({expected})"] * 2
    expected_cat = (4 * (51 + 25) / 101 + 6 * 51 / 101) / 10 * 100  # test_backends_agree_with_crowd_boxes_...
    assert metrics["AP-cat"] == pytest.approx(expected_cat, abs=1e-9)
    assert evaluation.metrics["bbox"]["AP-cat"] == pytest.approx(expected_cat, abs=1e-9)


@pytest.mark.parametrize("hidden", [False, True])
def test_coco_evaluator_without_a_backend_runs_the_resolved_one(monkeypatch, hidden):
    expected = "pycocotools" if hidden else "faster_coco_eval"
    if hidden:
        hide_faster_coco_eval(monkeypatch)
    records = [{"image_id": 5, "file_name": "5.jpg", "height": 100, "width": 100,
                "annotations": [{"bbox": [10.0, 10.0, 60.0, 50.0], "category_id": 0}]}]
    evaluator = COCOEvaluator(dataset=DetectionDataset(name="one", records=records, class_names=["cat"],
                                                       category_ids=[1]))
    assert evaluator.backend == expected
    used = spy_on_backends(monkeypatch)
    evaluator.process([{"image_id": 5}], [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0], [70.0, 70.0, 90.0, 90.0]]),
                                           "scores": torch.tensor([0.9, 0.5]), "labels": torch.tensor([0, 0])}])
    metrics = evaluator.evaluate()["bbox"]
    assert used == [expected]
    assert metrics["AP"] == pytest.approx(100.0)  # the false positive ranks below the only true positive


def test_config_key_is_validated(monkeypatch):
    cfg = load_config(REPO / "configs" / "shapes_r18.yaml", ["TEST.COCO_BACKEND=faster_coco_eval"])
    assert cfg.TEST.COCO_BACKEND == "faster_coco_eval"
    assert load_config(REPO / "configs" / "shapes_r18.yaml").TEST.COCO_BACKEND == "auto"
    with pytest.raises(ConfigError, match=r"TEST.COCO_BACKEND.*'fast'.*must be one of 'auto', 'pycocotools', "
                                          r"'faster_coco_eval'"):
        load_config(REPO / "configs" / "shapes_r18.yaml", ["TEST.COCO_BACKEND=fast"])
    hide_faster_coco_eval(monkeypatch)
    with pytest.raises(ConfigError, match=r"TEST.COCO_BACKEND.*needs the faster-coco-eval package: pip install "
                                          r"faster-coco-eval"):
        load_config(REPO / "configs" / "shapes_r18.yaml", ["TEST.COCO_BACKEND=faster_coco_eval"])
    assert load_config(REPO / "configs" / "shapes_r18.yaml").TEST.COCO_BACKEND == "auto"  # auto loads without it


def spy_on_backends(monkeypatch) -> list[str]:
    """Records which backend's COCOeval ran."""
    used: list[str] = []
    for backend, name in (("pycocotools", "_pycocotools_cocoeval"), ("faster_coco_eval", "_faster_cocoeval")):
        real = getattr(coco_module, name)
        monkeypatch.setattr(coco_module, name, lambda *args, _real=real, _backend=backend: (used.append(_backend),
                                                                                              _real(*args))[1])
    return used


@pytest.mark.parametrize(("backend", "hidden", "expected"), [
    ("pycocotools", False, "pycocotools"), ("faster_coco_eval", False, "faster_coco_eval"),
    (None, False, "faster_coco_eval"), (None, True, "pycocotools"),  # None: the default, auto
])
def test_the_config_key_reaches_the_runners_evaluation(tmp_path, monkeypatch, backend, hidden, expected):
    root = tmp_path / "shapes"
    generate_shapes(root, num_train=0, num_val=2, image_size=64, seed=3)
    test_set = f"{root}/annotations/instances_val.json:{root}/val"
    cfg = load_config(REPO / "configs" / "shapes_r18.yaml", [
        f"DATASETS.TEST=[{test_set}]", f"OUTPUT_DIR={tmp_path / 'run'}", "MODEL.DEVICE=cpu", "DATALOADER.NUM_WORKERS=0",
        "INPUT.MIN_SIZE_TEST=64", "INPUT.MAX_SIZE_TEST=64", *([f"TEST.COCO_BACKEND={backend}"] if backend else []),
    ])
    from detectron_res.data.build import load_dataset

    if hidden:
        hide_faster_coco_eval(monkeypatch)
    used = spy_on_backends(monkeypatch)
    metrics = evaluate(cfg, GroundTruthModel(load_dataset(cfg, test_set)), progress=False)
    assert used == [expected]
    assert metrics["bbox"]["AP"] == pytest.approx(100.0)


def test_coco_evaluator_refuses_an_unknown_backend():
    with pytest.raises(ValueError, match="backend 'x' is unknown"):
        COCOEvaluator(dataset=None, backend="x")


def run_tool(name: str, argv: list[str]) -> int:
    sys.path.insert(0, str(TOOLS))
    try:
        module = __import__(name)
    finally:
        sys.path.remove(str(TOOLS))
    return module.main(argv)


def test_eval_det_backend_flag(tmp_path, monkeypatch, capsys):
    gt, results = crowd_case()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(results))
    used = spy_on_backends(monkeypatch)
    out = {}
    for backend in ("pycocotools", "faster_coco_eval"):
        assert run_tool("eval_det", ["--gt", str(tmp_path / "gt.json"), "--dets", str(tmp_path / "dets.json"),
                                     "--backend", backend, "--json-out", str(tmp_path / f"{backend}.json")]) == 0
        out[backend] = json.loads((tmp_path / f"{backend}.json").read_text())["bbox"]
    assert used == ["pycocotools", "faster_coco_eval"]
    assert out["faster_coco_eval"]["AP-cat"] == pytest.approx(out["pycocotools"]["AP-cat"], abs=1e-6)
    hide_faster_coco_eval(monkeypatch)
    capsys.readouterr()
    assert run_tool("eval_det", ["--gt", str(tmp_path / "gt.json"), "--dets", str(tmp_path / "dets.json"),
                                 "--backend", "faster_coco_eval"]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "pip install faster-coco-eval" in error
    for backend in ("faster_coco_eval", "auto"):
        with pytest.raises(SystemExit):
            run_tool("eval_det", ["--format", "voc", "--voc-root", str(tmp_path), "--dets", str(tmp_path),
                                  "--backend", backend])
        assert "--backend is for --format coco" in capsys.readouterr().err


@pytest.mark.parametrize("hidden", [False, True])
def test_eval_det_without_backend_runs_and_names_the_resolved_one(tmp_path, monkeypatch, capsys, hidden):
    expected = "pycocotools" if hidden else "faster_coco_eval"
    if hidden:
        hide_faster_coco_eval(monkeypatch, "sys.modules")
    gt, results = crowd_case()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(results))
    used = spy_on_backends(monkeypatch)
    assert run_tool("eval_det", ["--gt", str(tmp_path / "gt.json"), "--dets", str(tmp_path / "dets.json"),
                                 "--json-out", str(tmp_path / "metrics.json")]) == 0
    assert used == [expected]
    printed = capsys.readouterr().out
    assert f"COCOeval ({expected}) bbox summary of {tmp_path / 'dets.json'}" in printed and "(auto)" not in printed
    expected_cat = (4 * (51 + 25) / 101 + 6 * 51 / 101) / 10 * 100
    assert json.loads((tmp_path / "metrics.json").read_text())["bbox"]["AP-cat"] == pytest.approx(expected_cat,
                                                                                                  abs=1e-9)


def test_synthetic_coco_evaluation_and_its_timing():
    gt, results = synthetic_coco_evaluation(num_images=20, detections_per_image=100, seed=1)
    assert len(gt["images"]) == 20 and len(gt["categories"]) == 80 and len(results) == 20 * 100
    assert 3 < len(gt["annotations"]) / 20 < 12  # ~7 boxes per image
    areas = np.array([ann["area"] for ann in gt["annotations"]])
    assert (areas < 32**2).any() and (areas > 96**2).any()  # COCO's small and large both present
    timed = coco_eval_times(gt, results, backends=["pycocotools", "faster_coco_eval"], runs=1)
    assert set(timed["backends"]) == {"pycocotools", "faster_coco_eval"}
    assert all(len(entry["seconds"]) == 1 for entry in timed["backends"].values())
    assert timed["max_metric_difference"] < 1e-6 and timed["AP"]["pycocotools"] > 0
    assert timed["detections"] == 2000 and timed["images"] == 20


def test_benchmark_tool_coco_eval_mode(tmp_path):
    results = run_tool("benchmark", ["--mode", "coco-eval", "--images", "10", "--runs", "1",
                                     "--json-out", str(tmp_path / "times.json")])
    assert json.loads((tmp_path / "times.json").read_text())["images"] == 10
    assert results["speedup"] > 0 and results["max_metric_difference"] < 1e-6


def test_benchmark_tool_other_modes_still_need_a_config(capsys):
    with pytest.raises(SystemExit):
        run_tool("benchmark", ["--mode", "infer"])
    assert "--mode infer needs --cfg" in capsys.readouterr().err
