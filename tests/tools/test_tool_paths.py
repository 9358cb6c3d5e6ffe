"""Issue 21, acceptance 2, for demo, eval_det, plot_log, export and convert_weights: an output path equal to one of
the tool's inputs, named directly or through a symlink, is refused before anything is written: exit 1, one line on
stderr (file descriptor 2, so a C library's own lines would count), every input's bytes unchanged and no file
created. (The tools that run through `engine.runner` are in test_run_tool_paths.py.) To add a tool: a line in
`cases`, with its inputs in the `inputs` fixture."""

import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import load_tool, package_logger_restored

REPO = Path(__file__).resolve().parents[2]


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` (symlinks not followed) -> its bytes (None for a folder or a symlink)."""
    return {
        str(path.relative_to(root)): None if path.is_symlink() or path.is_dir() else path.read_bytes()
        for path in sorted(root.rglob("*"))
    }


@pytest.fixture
def inputs(tmp_path):
    """A detector config, a config with its _base_ beside it, a "checkpoint" (its bytes only matter: nothing may be
    read from it before the refusal), a folder of two images, a sample image, a COCO ground truth and results file,
    and a run folder with its metrics.jsonl; a symlink beside each at the top (link_<name>)."""
    root = tmp_path / "inputs"
    root.mkdir()
    base = b"_base_: " + str(REPO / "configs/base_c4.yaml").encode()
    config = (REPO / "configs/shapes_r18.yaml").read_bytes()
    (root / "det.yaml").write_bytes(config.replace(b"_base_: base_c4.yaml", base))
    (root / "base.yaml").write_bytes((REPO / "configs/base_c4.yaml").read_bytes())
    (root / "child.yaml").write_bytes(b"_base_: base.yaml\nSEED: 3\n")  # a config whose _base_ is an input too
    (root / "a.pth").write_bytes(b"checkpoint a")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for name in ("one.png", "two.png", "../sample.png"):
        cv2.imwrite(str(root / "images" / name), rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8))
    (root / "gt.json").write_text(json.dumps({
        "images": [{"id": 1, "height": 100, "width": 100}], "categories": [{"id": 4, "name": "ball"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 4, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0}
        ],
    }))
    detection = {"image_id": 1, "category_id": 4, "bbox": [10, 10, 20, 20], "score": 0.5}
    (root / "dets.json").write_text(json.dumps([detection]))
    (root / "run").mkdir()
    (root / "run" / "metrics.jsonl").write_text('{"iteration": 20, "total_loss": 1.5, "lr": 0.01}\n')
    for name in ("det.yaml", "base.yaml", "a.pth", "images", "sample.png", "gt.json", "dets.json", "run/metrics.jsonl"):
        os.symlink(root / name, root / f"link_{Path(name).name}")
    return root


def cases(root: Path) -> list[tuple[str, list[str], str, str, str]]:
    """(tool, argv with {out} for the output path, the output's flag, the aliased input's flag and path)."""
    det, a, images, sample = (str(root / name) for name in ("det.yaml", "a.pth", "images", "sample.png"))
    gt, dets, run = (str(root / name) for name in ("gt.json", "dets.json", "run"))
    one = str(root / "images" / "one.png")
    child, base = str(root / "child.yaml"), str(root / "base.yaml")
    return [
        ("demo", ["--cfg", det, "--ckpt", a, "--input", images, "--output", "{out}"], "--output", "--input", images),
        ("demo", ["--cfg", det, "--ckpt", a, "--input", one, "--output", "{out}"], "--output", "--ckpt", a),
        ("eval_det", ["--gt", gt, "--dets", dets, "--json-out", "{out}"], "--json-out", "--dets", dets),
        ("eval_det", ["--gt", gt, "--dets", dets, "--json-out", "{out}"], "--json-out", "--gt", gt),
        ("plot_log", [run, "--out", "{out}"], "--out", "training log", f"{run}/metrics.jsonl"),
        ("export", ["--cfg", det, "--ckpt", a, "--format", "torchscript", "--output", "{out}", f"OUTPUT_DIR={run}"],
         "--output", "--ckpt", a),
        ("export", ["--cfg", det, "--ckpt", a, "--format", "torchscript", "--sample-image", sample, "--output", "{out}",
                    f"OUTPUT_DIR={run}"], "--output", "--sample-image", sample),
        ("convert_weights", ["--from", "torchvision", a, "{out}"], "OUTPUT", "INPUT", a),
        ("convert_weights", ["--from", "torchvision", a, "{out}", "--check-cfg", det], "OUTPUT", "--check-cfg", det),
        ("demo", ["--cfg", child, "--ckpt", a, "--input", one, "--output", "{out}"], "--output", "--cfg", base),
        ("export", ["--cfg", child, "--ckpt", a, "--format", "torchscript", "--output", "{out}", f"OUTPUT_DIR={run}"],
         "--output", "--cfg", base),
        ("convert_weights", ["--from", "torchvision", a, "{out}", "--check-cfg", child], "OUTPUT", "--check-cfg", base),
    ]


def run(tool_name: str, argv: list[str]) -> int:
    """The tool's exit status, as its command line gives it (run_tool's, or main's own for the tools without)."""
    tool = load_tool(tool_name)
    with package_logger_restored():
        if hasattr(tool, "run_tool"):
            return tool.run_tool(tool.main, argv)
        return tool.main(argv)


@pytest.mark.parametrize("alias", ["same", "symlink"])
@pytest.mark.parametrize("index", range(12))
def test_output_on_an_input_is_refused_and_the_input_kept(inputs, index, alias, monkeypatch, capfd):
    root = inputs
    tool_name, argv, flag, input_flag, target = cases(root)[index]
    out = target if alias == "same" else str(root / f"link_{Path(target).name}")
    before = tree(root)
    monkeypatch.setattr(sys, "argv", [str(REPO / "tools" / f"{tool_name}.py")])  # run_tool's program name
    capfd.readouterr()
    assert run(tool_name, [arg.replace("{out}", out) for arg in argv]) == 1
    err = capfd.readouterr().err.splitlines()
    shown = f"{flag} {out}" if alias == "same" else f"{flag} {out} (= {target})"
    assert err == [f"{tool_name}.py: error: {shown} is the same path as the input {input_flag} {target}: "
                   "refusing to overwrite it"]
    assert tree(root) == before  # every input's bytes, and nothing written beside them
