"""tools/export.py end to end on a tiny detector's checkpoint: TorchScript traced on a sample image (a real image file
through the test mapper) and loaded in a fresh Python without this package; ONNX traced on the random example and
run in onnxruntime on a third size; the printed check; the add-ons refused by name; a failed check; onnxruntime
missing."""

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import spread_detector_outputs

from detectron_res.config import load_config
from detectron_res.engine.checkpoint import Checkpointer
from detectron_res.engine.export import compare_detections, eager_detections, onnx_runner
from detectron_res.engine.runner import run_tool
from detectron_res.modeling import build_model

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import export  # noqa: E402

CONFIG = str(REPO / "configs/shapes_r18.yaml")
# test size 128 (a 480 x 640 photo becomes 96 x 128, the random example), few proposals
OVERRIDES = ["INPUT.MIN_SIZE_TEST=128", "INPUT.MAX_SIZE_TEST=128", "MODEL.RPN.POST_NMS_TOPK_TEST=50"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(checkpoint, output folder, sample image): shapes_r18 with random weights whose RPN and box predictor
    outputs are spread out (conftest.spread_detector_outputs), and a 150 x 100 PNG with two filled shapes."""
    root = tmp_path_factory.mktemp("export_tool")
    cfg = load_config(CONFIG, ["MODEL.DEVICE=cpu", *OVERRIDES])
    torch.manual_seed(0)
    model = build_model(cfg)
    spread_detector_outputs(model)
    Checkpointer(model=model, save_dir=root / "run", metadata={"class_names": ["a", "b", "c"]}).save("model_final")
    image = np.random.default_rng(0).integers(0, 256, size=(100, 150, 3), dtype=np.uint8)
    cv2.rectangle(image, (20, 10), (80, 70), (250, 20, 20), thickness=-1)
    cv2.circle(image, (115, 60), 25, (20, 20, 250), thickness=-1)
    cv2.imwrite(str(root / "sample.png"), image)
    return root / "run" / "model_final.pth", root / "run", root / "sample.png"


def run_export(checkpoint, output, *extra):
    path, run_dir, _ = checkpoint
    return export.main(
        ["--cfg", CONFIG, "--ckpt", str(path), "--output", str(output), *extra, f"OUTPUT_DIR={run_dir}", *OVERRIDES]
    )


def test_torchscript_on_a_sample_image_loads_without_the_package(checkpoint, tmp_path, capsys):
    _, _, sample = checkpoint
    output = tmp_path / "deploy" / "model.ts"  # the folder is created
    result = run_export(checkpoint, output, "--format", "torchscript", "--sample-image", str(sample))
    assert result["format"] == "torchscript" and Path(result["output"]) == output and output.is_file()
    # the 100 x 150 sample through the test mapper: MAX_SIZE_TEST caps the long side at 128 (85 x 128); then 3/4, odd
    assert [c["image_size"] for c in result["checks"]] == [[85, 128], [63, 97]]
    for check in result["checks"]:
        assert check["same_labels"] and check["exported_detections"] > 0
        assert check["max_box_diff"] <= 1e-3 and check["max_score_diff"] <= 1e-5
    out = capsys.readouterr().out
    assert f"Exported torchscript to {output}" in out
    assert "Check on the example image (85x128): " in out and "Check on the second image (63x97): " in out

    # a fresh interpreter with torch and torchvision only: the file runs on an image of yet another size
    script = (
        "import sys, warnings, torch, torchvision\n"
        "warnings.simplefilter('ignore')\n"
        f"model = torch.jit.load({str(output)!r})\n"
        "boxes, scores, labels = model(torch.full((3, 70, 110), 128, dtype=torch.uint8))\n"
        "assert 'detectron_res' not in sys.modules\n"
        "print(tuple(boxes.shape), tuple(scores.shape), labels.dtype)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True)
    shape, _, dtype = done.stdout.strip().rpartition(" ")
    assert dtype == "torch.int64" and shape.startswith("(") and ", 4)" in shape


def test_onnx_on_the_random_example_runs_in_onnxruntime(checkpoint, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    path, _, _ = checkpoint
    output = tmp_path / "model.onnx"
    result = run_export(checkpoint, output, "--format", "onnx")
    assert [c["image_size"] for c in result["checks"]] == [[96, 128], [73, 97]]  # 480 x 640 at 128; 3/4, odd
    assert all(c["same_labels"] and c["exported_detections"] > 0 for c in result["checks"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Check on the")]
    assert len(lines) == 2 and all("detections, same labels; max box difference" in line for line in lines)

    # the file against the checkpoint's eager model on a third size, as a user would run it
    cfg = load_config(CONFIG, ["MODEL.DEVICE=cpu", *OVERRIDES])
    model = build_model(cfg)
    Checkpointer(model=model, save_dir=tmp_path).load(str(path))
    image = torch.randint(0, 256, (3, 110, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    comparison = compare_detections(eager_detections(model, image), onnx_runner(output)(image))
    assert comparison["same_labels"] and comparison["reference_detections"] > 0
    assert comparison["max_box_diff"] <= 1e-3 and comparison["max_score_diff"] <= 1e-5


def test_add_ons_are_refused_by_name(checkpoint, tmp_path, capsys):
    path, run_dir, _ = checkpoint
    argv = ["--cfg", CONFIG, "--ckpt", str(path), "--format", "torchscript", "--output", str(tmp_path / "m.ts"),
            f"OUTPUT_DIR={run_dir}", "TEST.BOX_REFINEMENT.ENABLED=true", "TEST.MULTI_SCALE.ENABLED=true"]
    assert run_tool(export.main, argv) == 1
    err = capsys.readouterr().err
    assert "TEST.MULTI_SCALE.ENABLED, TEST.BOX_REFINEMENT.ENABLED on" in err
    assert "TEST.MULTI_SCALE.ENABLED=false TEST.BOX_REFINEMENT.ENABLED=false" in err
    assert not (tmp_path / "m.ts").exists()


def test_a_failed_check_exits_with_1_and_keeps_the_file(checkpoint, tmp_path, capsys, monkeypatch):
    path, run_dir, _ = checkpoint
    monkeypatch.setattr(export, "SCORE_TOLERANCE", -1.0)  # no export can be that close
    argv = ["--cfg", CONFIG, "--ckpt", str(path), "--format", "torchscript", "--output", str(tmp_path / "m.ts"),
            f"OUTPUT_DIR={run_dir}", *OVERRIDES]
    assert run_tool(export.main, argv) == 1
    captured = capsys.readouterr()
    assert "differ from the eager model's beyond" in captured.err and "m.ts is kept" in captured.err
    assert (tmp_path / "m.ts").is_file() and "Check on the example image" in captured.out


def test_missing_onnxruntime_says_what_to_install(checkpoint, tmp_path, capsys, monkeypatch):
    path, run_dir, _ = checkpoint
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    argv = ["--cfg", CONFIG, "--ckpt", str(path), "--format", "onnx", "--output", str(tmp_path / "m.onnx"),
            f"OUTPUT_DIR={run_dir}"]
    assert run_tool(export.main, argv) == 1
    err = capsys.readouterr().err
    assert "pip install 'detectron_res[export]'" in err and "onnxruntime" in err
    assert not (tmp_path / "m.onnx").exists()


# -- --output checked before anything is loaded or written; extreme aspect ratios (issue 21 items 5, 13, 18) -------
@pytest.mark.parametrize("height, width, sizes", [(4, 6000, [[1, 128], [17, 97]]), (6000, 3, [[128, 1], [97, 17]])])
def test_sample_images_of_extreme_aspect_ratio(checkpoint, tmp_path, height, width, sizes):
    """At the test size 128 the short side of 4 x 6000 (6000 x 3) rounds to 0.085 (0.064) px and keeps 1 px: the
    trace runs on a 1 x 128 (128 x 1) image; the second image is 3/4 of it, at least 16 px, odd: 17 x 97."""
    sample = tmp_path / f"extreme_{height}x{width}.png"
    cv2.imwrite(str(sample), np.random.default_rng(1).integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    result = run_export(checkpoint, tmp_path / "m.ts", "--format", "torchscript", "--sample-image", str(sample))
    assert [c["image_size"] for c in result["checks"]] == sizes
    assert all(c["same_labels"] and c["max_box_diff"] <= 1e-3 for c in result["checks"])


def test_output_on_an_input_is_refused_before_anything_is_written(checkpoint, tmp_path, capsys):
    path, run_dir, sample = checkpoint
    config = tmp_path / "config.yaml"
    base = f"_base_: {REPO / 'configs/base_c4.yaml'}"
    config.write_text(Path(CONFIG).read_text().replace("_base_: base_c4.yaml", base))
    (tmp_path / "link.pth").symlink_to(path)
    inputs = [path, sample, config]
    before = [p.read_bytes() for p in inputs]
    log_before = (run_dir / "log.txt").read_bytes() if (run_dir / "log.txt").exists() else None
    cases = [
        (path, f"--output {path} is the same path as the input --ckpt {path}: refusing to overwrite it"),
        (tmp_path / "link.pth",
         f"--output {tmp_path / 'link.pth'} (= {path}) is the same path as the input --ckpt {path}: refusing to "
         "overwrite it"),
        (sample, f"--output {sample} is the same path as the input --sample-image {sample}: refusing to overwrite it"),
        (config, f"--output {config} is the same path as the input --cfg {config}: refusing to overwrite it"),
        (run_dir / ".." / run_dir.name / "log.txt",
         f"--output {run_dir / '..' / run_dir.name / 'log.txt'} (= {run_dir / 'log.txt'}) and the log "
         f"{run_dir / 'log.txt'} are the same path: one output would overwrite the other"),
        (tmp_path, f"--output {tmp_path} is a folder: give the file to write (e.g. {tmp_path / 'model.ts'})"),
    ]
    for output, message in cases:
        argv = ["--cfg", str(config), "--ckpt", str(path), "--output", str(output), "--format", "torchscript",
                "--sample-image", str(sample), f"OUTPUT_DIR={run_dir}", *OVERRIDES]
        capsys.readouterr()
        assert run_tool(export.main, argv) == 1
        assert capsys.readouterr().err.splitlines() == [f"{Path(sys.argv[0]).name}: error: {message}"]
    assert [p.read_bytes() for p in inputs] == before
    assert ((run_dir / "log.txt").read_bytes() if (run_dir / "log.txt").exists() else None) == log_before


def test_an_unwritable_output_is_named(checkpoint, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError) as caught:
        run_export(checkpoint, blocker / "m.ts", "--format", "torchscript")
    assert str(caught.value) == f"--output {blocker / 'm.ts'} cannot be written: {blocker} is a file, not a folder"

    if Path("/proc/self").is_dir():  # a folder where no file can be created, even by root
        with pytest.raises(OSError) as caught:
            run_export(checkpoint, "/proc/m.ts", "--format", "torchscript")
        assert str(caught.value).startswith("could not write the exported model to /proc/m.ts: ")

    from detectron_res.engine import export as engine_export

    def denied(path, write):
        raise PermissionError(13, "Permission denied", f"{Path(path).parent}/.m.ts.123.tmp")

    monkeypatch.setattr(engine_export, "atomic_write", denied)
    with pytest.raises(OSError) as caught:
        run_export(checkpoint, tmp_path / "m.ts", "--format", "torchscript")
    assert str(caught.value) == f"could not write the exported model to {tmp_path / 'm.ts'}: Permission denied"
    assert not (tmp_path / "m.ts").exists()
