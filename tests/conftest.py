"""Fixtures shared across test folders: the package logger restored after each test, the shared real data (which
must be there when CI is set), and the real VOC2012 sample's detections, as tuples and as devkit files."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import pytest
import torch

# ../shared/data beside the checkout (this file is <checkout>/tests/conftest.py)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOC_SAMPLE = SHARED_DATA / "voc2012_sample"


def require_shared_data(path: Path) -> Path:
    """`path` under ../shared/data: skips the test when it is missing, except under CI (the CI environment variable
    set), where the data is provided and its absence is a failure, never a silent skip."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"shared test data missing under CI: {path}")
        pytest.skip(f"sample data not present: {path}")
    return path


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str, *, tools_dir: Path = TOOLS):
    """tools/<name>.py as a module (the tools are scripts, not a package), for tests that call its `main`.

    The module is registered in `sys.modules` while it runs, as `import` does: a dataclass (and anything else that
    looks its module up by name) fails without it. Its name is `tools_<name>`, which no real module has, so a tool
    named like a library (`benchmark`, `export`) shadows nothing; loading a tool again replaces the entry."""
    import importlib.util
    import sys

    module_name = f"tools_{name}"
    spec = importlib.util.spec_from_file_location(module_name, Path(tools_dir) / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]  # as a failed import leaves nothing behind
        raise
    return module


def spread_detector_outputs(model) -> None:
    """Re-draws, seeded, the weights of a randomly initialised detector's RPN objectness and deltas and its box
    predictor with a larger spread: with the default initialisation all their outputs are nearly equal, so their
    order would be decided by rounding (the export tests compare detections one by one)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in (model.rpn.head.objectness_logits, model.rpn.head.anchor_deltas):
            layer.weight.normal_(0, 0.1, generator=generator)
        model.roi_heads.predictor.cls_score.weight.normal_(0, 0.02, generator=generator)
        model.roi_heads.predictor.bbox_pred.weight.normal_(0, 0.02, generator=generator)


def write_voc_annotations(voc_root: Path, objects: dict, *, split: str = "test") -> None:
    """A VOC year folder of 100 x 100 images: `objects` maps an image id to its (class, (xmin, ymin, xmax, ymax),
    difficult) objects, written as Annotations/<id>.xml (the devkit's 1-based pixels), ImageSets/Main/<split>.txt
    listing the ids."""
    (voc_root / "Annotations").mkdir(parents=True)
    (voc_root / "ImageSets" / "Main").mkdir(parents=True)
    (voc_root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{image_id}\n" for image_id in objects))
    for image_id, objs in objects.items():
        body = "".join(
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{box[0]}</xmin>"
            f"<ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"
            for name, box, difficult in objs
        )
        (voc_root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><size><width>100</width><height>100</height></size>{body}</annotation>"
        )


def read_png(path: Path):
    """The decoded image of a valid, non-blank PNG file (the plot tests): the PNG signature, decodable by OpenCV,
    at least 100 px a side, more than two colours."""
    import cv2
    import numpy as np

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None and image.ndim == 3 and min(image.shape[:2]) >= 100, path
    assert len(np.unique(image.reshape(-1, image.shape[2]), axis=0)) > 2, f"{path} is blank"
    return image


@pytest.fixture
def shared_data():
    """`shared_data("coco128")` -> ../shared/data/coco128, or a skip (a failure under CI) when it is missing."""
    return lambda name: require_shared_data(SHARED_DATA / name)


@contextlib.contextmanager
def package_logger_restored():
    """The tools' `setup_logging` gives the `detectron_res` logger its own handlers (one writing to a test's
    log.txt) and stops propagation; put it back as it was so that later tests (and caplog) see every record.
    Module-scoped fixtures that run a tool use it themselves: they run before the per-test fixture below saves."""
    package_logger = logging.getLogger("detectron_res")
    saved = (list(package_logger.handlers), package_logger.propagate, package_logger.level)
    try:
        yield
    finally:
        for handler in package_logger.handlers:
            if handler not in saved[0]:
                handler.close()
        package_logger.handlers[:] = saved[0]
        package_logger.propagate, package_logger.level = saved[1], saved[2]


@pytest.fixture(autouse=True)
def restore_package_logger():
    with package_logger_restored():
        yield


@pytest.fixture(scope="session")
def voc_sample_detections() -> list[tuple[str, int, float, list[float]]]:
    """(image_id, class index, score, 0-based box) from ``voc2012_sample/detections_xyxy``, in split then file
    order; skips the test when the sample is absent.

    Those boxes are 0-based continuous pixels, checked against the XML: 31 detections have x1 = 0 and 12 have
    y1 = 0 (impossible for 1-based devkit boxes, whose smallest index is 1; no XML box of the sample has a 0),
    and none exceeds the image width or height (x2 = width 21 times), i.e. they live in [0, W] x [0, H] like
    detectron2's outputs. So the devkit box is (x1 + 1, y1 + 1, x2, y2).
    """
    require_shared_data(VOC_SAMPLE)
    split = (VOC_SAMPLE / "VOC2012" / "ImageSets" / "Main" / "val.txt").read_text().split()
    detections = []
    for image_id in split:
        path = VOC_SAMPLE / "detections_xyxy" / f"{image_id}.txt"
        if not path.is_file():  # 2007_000676 and 2007_001377 have no detection
            continue
        for line in path.read_text().splitlines():
            class_index, score, *box = line.split()
            detections.append((image_id, int(class_index), float(score), [float(v) for v in box]))
    return detections


@pytest.fixture
def voc_sample_devkit_dir(voc_sample_detections, tmp_path: Path) -> Path:
    """A folder of devkit files ``comp4_det_test_<class>.txt`` holding the sample's detections, boxes shifted
    to the devkit's 1-based pixels (x1 + 1, y1 + 1, x2, y2), one file per class of ``voc.names``."""
    class_names = (VOC_SAMPLE / "voc.names").read_text().split()
    lines: dict[str, list[str]] = {name: [] for name in class_names}
    for image_id, class_index, score, (x1, y1, x2, y2) in voc_sample_detections:
        lines[class_names[class_index]].append(f"{image_id} {score} {x1 + 1} {y1 + 1} {x2} {y2}\n")
    results = tmp_path / "voc_sample_results"
    results.mkdir()
    for name, class_lines in lines.items():
        (results / f"comp4_det_test_{name}.txt").write_text("".join(class_lines))
    return results


class GroundTruthModel(torch.nn.Module):
    """Returns each image's ground-truth boxes with score 0.9 (a perfect detector)."""

    def __init__(self, dataset):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.records = {record["image_id"]: record for record in dataset.records}

    def forward(self, inputs: list[dict]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for inp in inputs:
            annotations = self.records[inp["image_id"]]["annotations"]
            boxes = torch.tensor([ann["bbox"] for ann in annotations], dtype=torch.float32).reshape(-1, 4)
            labels = torch.tensor([ann["category_id"] for ann in annotations], dtype=torch.int64)
            outputs.append({"boxes": boxes, "scores": torch.full((len(boxes),), 0.9), "labels": labels})
        return outputs
