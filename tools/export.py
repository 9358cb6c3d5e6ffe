#!/usr/bin/env python
"""Export a trained detector's inference path to TorchScript or ONNX, and check the file against the eager model.

    python tools/export.py --cfg configs/shapes_r18.yaml --ckpt output/shapes_r18/model_final.pth \
        --format torchscript --output export/shapes_r18.ts --sample-image datasets/shapes/val/000000.png
    python tools/export.py --cfg CONFIG --ckpt CHECKPOINT --format onnx --output model.onnx [KEY=VALUE ...]

The exported model takes one (3, h, w) uint8 RGB image already resized to the network's input size (the test
mapper's INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST resize; the model itself never resizes) and returns boxes (D, 4) in
that image's pixels, scores (D,) and labels (D,): the plain inference path (`engine.export.ExportableDetector`).
TEST.MULTI_SCALE, TEST.FLIP, TEST.BOX_REFINEMENT, TEST.BOX_VOTING and TEST.AMP are refused by name; TEST.COMPILE is
ignored. The trace is made on the sample image (`--sample-image`, resized by the test mapper) or on a random image of
the test size of a 480 x 640 photo. Then the saved file is run (torch.jit.load, or onnxruntime on the CPU) on that
image and on a second one of another size (the first resized to three quarters of its sides, odd numbers of pixels),
and its detections are compared with the eager model's: the counts, the labels and the largest box and score
differences are printed, and the tool exits with status 1 (the file is kept) when the labels differ or a difference
exceeds 0.01 px or 1e-4. The export runs on the CPU unless MODEL.DEVICE says otherwise (a TorchScript file runs on
the device it was traced on; an ONNX file anywhere). ONNX needs the `export` extra (pip install
'detectron_res[export]'). Logs go to the config's OUTPUT_DIR/log.txt. Flags may come before or after KEY=VALUE
overrides.

Before anything is loaded or written, `--output` is resolved (`..` and symlinks followed) and refused, in one line
naming both paths, when it is `--cfg`, the checkpoint to export (`--ckpt`, else MODEL.WEIGHTS, else OUTPUT_DIR's
newest), MODEL.BACKBONE.WEIGHTS, `--sample-image` or OUTPUT_DIR/log.txt, or lies inside one of them; a folder, a
path under a file and an unwritable folder are refused too. The file is written atomically: a failed export leaves
an existing file as it was.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from detectron_res.config import config_files, load_config, merge_overrides
from detectron_res.data.build import build_test_mapper
from detectron_res.data.mapper import read_image_rgb, resize_shortest_edge_shape
from detectron_res.engine.export import (
    FORMATS,
    INSTALL_HINT,
    ExportableDetector,
    compare_detections,
    detections_agree,
    eager_detections,
    export_onnx,
    export_torchscript,
    import_onnxruntime,
    onnx_runner,
)
from detectron_res.engine.checkpoint import Checkpointer
from detectron_res.engine.runner import default_argument_parser, load_for_inference, parse_args, run_tool, setup
from detectron_res.utils.paths import check_tool_paths, check_writable

logger = logging.getLogger("detectron_res.export")

BOX_TOLERANCE = 0.01  # pixels: the check's largest box coordinate difference
SCORE_TOLERANCE = 1e-4
SYNTHETIC_PHOTO_SIZE = (480, 640)  # (height, width) of the photo whose test size the random example image has


def main(argv: list[str] | None = None) -> dict:
    common = default_argument_parser(__doc__.splitlines()[0])
    # the tools' --cfg and KEY=VALUE overrides, with --output the exported file here, not the output folder
    parser = argparse.ArgumentParser(
        description=common.description, epilog=common.epilog, parents=[common], conflict_handler="resolve"
    )
    parser.add_argument("--output", required=True, help="the exported file (e.g. model.ts or model.onnx)")
    parser.add_argument("--ckpt", default=None, help="checkpoint to export (default: MODEL.WEIGHTS, else the output "
                        "folder's newest)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="torchscript (torch.jit.trace) or onnx")
    parser.add_argument("--sample-image", default=None, help="image to trace on and to check with (default: random)")
    args = parse_args(parser, argv)
    if args.format == "onnx":
        import_onnx_packages()  # before any work: say what to install
    check_output(args, load_config(args.cfg, ["MODEL.DEVICE=cpu", *args.opts]))
    cfg = setup(
        argparse.Namespace(cfg=args.cfg, output=None, opts=["MODEL.DEVICE=cpu", *args.opts]),
        config_file=None,
        inputs={"--ckpt": args.ckpt, "--sample-image": args.sample_image},
        lock=False,  # it only logs to OUTPUT_DIR (often a training's folder, which may still be training)
    )
    if cfg.TEST.COMPILE:
        logger.info("TEST.COMPILE ignored: the export traces the uncompiled modules")
        cfg = merge_overrides(cfg, ["TEST.COMPILE=false"])
    model, _ = load_for_inference(cfg, args.ckpt)
    detector = ExportableDetector(model=model)  # refuses the add-ons by name

    example = example_image(cfg, args.sample_image).to(model.device)
    output = Path(args.output)
    if args.format == "torchscript":
        export_torchscript(detector, output, example=example)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*`torch\.jit")
            run = torch.jit.load(str(output))
    else:
        export_onnx(detector, output, example=example)
        import onnx

        onnx.checker.check_model(str(output))
        run = onnx_runner(output)
    print(f"Exported {args.format} to {output} ({output.stat().st_size / 2**20:.1f} MB); input: uint8 image "
          f"(3, height, width) RGB at the network's input size; outputs: boxes (D, 4), scores (D,), labels (D,)")

    checks = []
    with torch.no_grad():
        for name, image in (("example image", example), ("second image", other_size(example))):
            comparison = compare_detections(eager_detections(model, image), run(image))
            comparison["image_size"] = [int(image.shape[-2]), int(image.shape[-1])]
            checks.append(comparison)
            print(f"Check on the {name} ({image.shape[-2]}x{image.shape[-1]}): {describe(comparison)}")
    result = {"format": args.format, "output": str(output), "checks": checks}
    if not all(detections_agree(c, box_tol=BOX_TOLERANCE, score_tol=SCORE_TOLERANCE) for c in checks):
        raise RuntimeError(
            f"the exported model's detections differ from the eager model's beyond {BOX_TOLERANCE} px / "
            f"{SCORE_TOLERANCE} (see above); {output} is kept for inspection"
        )
    return result


def check_output(args: argparse.Namespace, cfg) -> None:
    """Refuses, before anything is loaded or written, an --output that is or lies inside an input (--cfg, the
    checkpoint to export, MODEL.BACKBONE.WEIGHTS, --sample-image) or is OUTPUT_DIR/log.txt, and one that is a folder,
    lies under a file or in a folder this user cannot write."""
    output = Path(args.output)
    if args.ckpt:
        checkpoint = {"--ckpt": args.ckpt}
    elif cfg.MODEL.WEIGHTS:
        checkpoint = {"MODEL.WEIGHTS": cfg.MODEL.WEIGHTS}
    else:  # what load_for_inference loads then
        checkpoint = {"OUTPUT_DIR's newest checkpoint": Checkpointer(model=torch.nn.Module(), save_dir=cfg.OUTPUT_DIR)
                      .last_checkpoint()}
    if output.is_dir():
        example = output / ("model.onnx" if args.format == "onnx" else "model.ts")
        raise IsADirectoryError(f"--output {output} is a folder: give the file to write (e.g. {example})")
    weights = {**checkpoint, "MODEL.BACKBONE.WEIGHTS": cfg.MODEL.BACKBONE.WEIGHTS}
    check_tool_paths(
        inputs={"--cfg": config_files(args.cfg),  # and its _base_
                **{key: path for key, path in weights.items() if path and "://" not in str(path)},  # not torchvision://
                "--sample-image": args.sample_image},
        outputs={"--output": output, "the log": Path(cfg.OUTPUT_DIR) / "log.txt"},
    )
    check_writable(output, flag="--output")


def import_onnx_packages() -> None:
    """onnx and onnxruntime, or a RuntimeError (a one-line error of the tool) saying how to install them."""
    try:
        import onnx  # noqa: F401

        import_onnxruntime()
    except ImportError as error:
        missing = error.name or "onnx or onnxruntime"
        raise RuntimeError(f"ONNX export needs onnx and onnxruntime ({missing} is missing): {INSTALL_HINT}") from None


def example_image(cfg, sample_image: str | None) -> torch.Tensor:
    """The (3, h, w) uint8 image to trace on: the sample image through the test mapper, or a random image of the test
    size of a 480 x 640 photo."""
    if sample_image is not None:
        image = read_image_rgb(sample_image)  # its errors name the file
        try:
            return build_test_mapper(cfg).map_image(image)["image"]
        except (ValueError, RuntimeError) as error:  # e.g. a resize's multi-line validation error: one line, named
            message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
            size = f"{image.shape[0]}x{image.shape[1]} px"
            raise ValueError(f"--sample-image {sample_image} ({size}): {message}") from error
    height, width = resize_shortest_edge_shape(
        *SYNTHETIC_PHOTO_SIZE, short_side=cfg.INPUT.MIN_SIZE_TEST, max_size=cfg.INPUT.MAX_SIZE_TEST
    )
    generator = torch.Generator().manual_seed(cfg.SEED)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def other_size(image: torch.Tensor) -> torch.Tensor:
    """`image` resized (bilinear) to three quarters of its sides, rounded to odd numbers of pixels, so that neither
    the size nor its padding to a multiple of 16 is the example's."""
    height, width = (max(int(side) * 3 // 4, 16) | 1 for side in image.shape[-2:])
    resized = F.interpolate(image[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0]
    return resized.round().clamp(0, 255).to(torch.uint8)


def describe(comparison: dict) -> str:
    if not comparison["same_labels"]:
        return (f"eager {comparison['reference_detections']} detections, exported "
                f"{comparison['exported_detections']}: the labels differ")
    return (f"{comparison['exported_detections']} detections, same labels; max box difference "
            f"{comparison['max_box_diff']:.2e} px, max score difference {comparison['max_score_diff']:.2e}")


if __name__ == "__main__":
    sys.exit(run_tool(main, sys.argv[1:]))
