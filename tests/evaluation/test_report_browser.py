"""The evaluation report opened in a real headless browser (Debian's Chromium driven by Playwright): it renders
without a console error or a request leaving the file, its tables and gallery images are there and loaded, the class
table sorts on a click, an image links to its boxes, and the screenshot is not blank.

Needs the `chromium` executable (Debian: apt-get install chromium; .ci/run installs it) and the playwright package
(the test extra). Skipped without them, except under CI, where that is a failure. With
DETECTRON_RES_REPORT_SCREENSHOT=PATH set, the screenshots (the page's top, and its gallery) are also saved to PATH and
PATH_gallery (docs/images/report.png and report_gallery.png were made so)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from detectron_res.data.datasets import generate_shapes
from detectron_res.evaluation.coco import run_coco_evaluation
from detectron_res.evaluation.report import write_report

# Chromium's flags as root on a machine without network: no sandbox (root), no GPU, no background connections
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    """The Chromium executable and Playwright, or a skip (a failure under CI)."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        executable, missing = None, "the playwright package (pip install playwright)"
    else:
        missing = "the chromium executable (Debian: apt-get install chromium)"
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test needs {missing} under CI (.ci/run installs both)")
        pytest.skip(f"needs {missing}")
    return executable


@pytest.fixture(scope="module")
def report_page(tmp_path_factory):
    """A report of 12 shapes images, every box found but with some shifted, some mislabelled, some missed."""
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=1, num_val=12, image_size=160, seed=5)
    gt = json.loads((root / "annotations/instances_val.json").read_text())
    rng = np.random.default_rng(0)
    detections = []
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        kind = rng.integers(4)  # 0 exact, 1 shifted, 2 another class, 3 missed
        if kind == 3:
            continue
        category = ann["category_id"] if kind != 2 else 1 + ann["category_id"] % len(gt["categories"])
        shift = 0.6 * w if kind == 1 else 0.0
        detections.append({"image_id": ann["image_id"], "category_id": category, "bbox": [x + shift, y, w, h],
                           "score": float(rng.uniform(0.3, 1.0))})
    evaluation = run_coco_evaluation(root / "annotations/instances_val.json", detections)
    files = {image["id"]: root / "val" / image["file_name"] for image in gt["images"]}
    write_report(root / "report", evaluation, image_files=files, title="shapes: evaluation report", gallery_size=6)
    return root / "report" / "index.html", len(gt["categories"])


def test_the_report_renders_in_chromium(report_page, tmp_path):
    executable = chromium()
    from playwright.sync_api import sync_playwright

    index, num_classes = report_page
    problems, requests = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda message: message.type in ("error", "warning") and problems.append(message.text))
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("requestfailed", lambda request: problems.append(f"failed: {request.url}"))
            page.on("request", lambda request: requests.append(request.url))
            page.goto(index.as_uri(), wait_until="load")

            assert page.title() == "shapes: evaluation report"
            assert page.locator("#summary-table tbody tr").count() == 1
            assert page.locator("#errors-table tbody tr").count() == 6  # TIDE's six types
            assert page.locator("#class-table tbody tr").count() == num_classes
            assert page.locator("figure.curve svg polyline").count() == 2 * num_classes  # IoU 0.5 and 0.5:0.95
            images = page.locator(".gallery img")
            assert images.count() == 6
            sizes = page.evaluate("Array.from(document.querySelectorAll('.gallery img'))"
                                  ".map(img => [img.complete, img.naturalWidth, img.naturalHeight])")
            assert sizes == [[True, 640, 640]] * 6  # decoded, the 160-pixel images enlarged to the thumbnail side

            def column(index: int) -> list[float]:
                return [float(value) for value in page.eval_on_selector_all(
                    f"#class-table tbody tr td:nth-child({index})", "cells => cells.map(c => c.dataset.value)")]

            page.click("#class-table th[data-key=AP]")
            ascending = column(4)
            assert ascending == sorted(ascending) and len(set(ascending)) > 1
            page.click("#class-table th[data-key=AP]")
            assert column(4) == sorted(ascending, reverse=True)

            page.screenshot(path=str(tmp_path / "top.png"))
            page.evaluate("document.getElementById('gallery').scrollIntoView()")
            page.screenshot(path=str(tmp_path / "gallery.png"))
            images.first.click()
            assert page.evaluate("location.hash") == "#image-0"
            assert page.locator("#image-0").is_visible() and page.locator("#image-0 tbody tr").count() > 0
        finally:
            browser.close()

    assert problems == []
    assert requests and all(url.startswith(("file:", "data:")) for url in requests), requests
    top, gallery = (cv2.imread(str(tmp_path / name)) for name in ("top.png", "gallery.png"))
    for shot in (top, gallery):
        assert shot.shape == (900, 1280, 3)
        assert (shot < 128).mean() > 0.01 and shot.std() > 20  # text, tables and images drawn, not a blank page
    assert np.abs(top.astype(int) - gallery).mean() > 10  # scrolled to another part of the page
    colorful = np.ptp(gallery.astype(int), axis=2) > 60  # the drawn boxes and the shapes, not grey text
    assert colorful.mean() > 0.05
    if os.environ.get("DETECTRON_RES_REPORT_SCREENSHOT"):
        target = Path(os.environ["DETECTRON_RES_REPORT_SCREENSHOT"])
        shutil.copyfile(tmp_path / "top.png", target)
        shutil.copyfile(tmp_path / "gallery.png", target.with_name(f"{target.stem}_gallery{target.suffix}"))
