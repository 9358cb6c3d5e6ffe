#!/usr/bin/env python
"""Convert weights of torchvision, MSRA (Detectron / detectron2's R-50.pkl) or detectron2 to detectron_res's names.

    python tools/convert_weights.py --from msra R-50.pkl r50_msra.pth
    python tools/convert_weights.py --from torchvision resnet50-11ad3fa6.pth r50_torchvision.pth
    python tools/convert_weights.py --from detectron2 model_final_f97cb7.pkl d2_r50_c4_3x.pth \
        --check-cfg configs/d2_r50_c4.yaml

ImageNet ResNets (torchvision, msra) become a torchvision-format state_dict for MODEL.BACKBONE.WEIGHTS; detectron2
C4 detectors become a detectron_res checkpoint for MODEL.WEIGHTS. Both remember the config values the weights need
(MSRA and detectron2: MODEL.BACKBONE.STRIDE_IN_1X1 true, INPUT.FORMAT BGR, MODEL.PIXEL_STD [1, 1, 1]); loading them
into a model built otherwise stops with an error naming the keys. Every source key must find its place: the names
that do not are listed and nothing is written. `--check-cfg CONFIG [KEY=VALUE ...]` then builds that config's model
and loads the result into it with strict checking. The same formats also load without conversion (MODEL.WEIGHTS
and MODEL.BACKBONE.WEIGHTS read them directly); see docs/tools.md. Before anything is read or written, the output is
resolved (`..` and symlinks followed) and refused, in one line naming both paths, when it is the input or the
--check-cfg config, or lies inside one of them; the file is written atomically (a failed write keeps what was there).
"""

from __future__ import annotations

import argparse
import logging
import sys

from detectron_res.config import config_files, load_config
from detectron_res.engine.checkpoint import Checkpointer
from detectron_res.engine.runner import check_checkpoint_settings, run_tool
from detectron_res.modeling import build_model
from detectron_res.modeling.build import load_backbone_weights
from detectron_res.modeling.weight_formats import FORMATS, convert_file, describe_settings, save_converted
from detectron_res.utils.paths import check_tool_paths


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source_format", choices=FORMATS, required=True, help="the weights' toolkit")
    parser.add_argument("input", help="weights file (.pkl or .pth)")
    parser.add_argument("output", help="converted file to write (.pth)")
    parser.add_argument("--check-cfg", default=None, metavar="CONFIG",
                        help="load the result into this config's model with strict checking")
    parser.add_argument("opts", nargs="*", metavar="KEY=VALUE", help="overrides of the --check-cfg config")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # stderr: the error line only
    check_config = config_files(args.check_cfg) if args.check_cfg else None  # and its _base_
    check_tool_paths(inputs={"INPUT": args.input, "--check-cfg": check_config}, outputs={"OUTPUT": args.output})
    converted = convert_file(args.input, source_format=args.source_format)
    save_converted(converted, args.output, source=args.input)
    target = "MODEL.WEIGHTS" if converted.format == "detectron2" else "MODEL.BACKBONE.WEIGHTS"
    print(f"{args.input} ({converted.format}): {len(converted.state_dict)} tensors -> {args.output} (for {target})")
    if converted.dropped:
        print(f"  left out, holding no weights: {', '.join(converted.dropped[:8])}"
              + (f" (+{len(converted.dropped) - 8} more)" if len(converted.dropped) > 8 else ""))
    print(f"  needs: {describe_settings(converted.settings)}")
    summary = {"tensors": len(converted.state_dict), "format": converted.format, "dropped": converted.dropped,
               "settings": converted.settings}
    if args.check_cfg:
        check_loads(args.check_cfg, [*args.opts, "MODEL.DEVICE=cpu"], path=args.output, target=target)
        print(f"  loads into {args.check_cfg}'s model with strict checking: every key matched, settings agree")
        summary["checked"] = args.check_cfg
    return summary


def check_loads(config_file: str, overrides: list[str], *, path: str, target: str) -> None:
    """Builds the config's model (without its own weights) and loads `path` as `target` into it: for a detector
    every key must match (`Checkpointer.load`); for a backbone no trunk or res5 key may stay unloaded and only the
    ImageNet classifier may be left over. The config must have the settings the weights need."""
    model = build_model(load_config(config_file, [*overrides, "MODEL.WEIGHTS=", "MODEL.BACKBONE.WEIGHTS="]))
    cfg = load_config(config_file, [*overrides, f"{target}={path}"])
    if target == "MODEL.WEIGHTS":
        extra = Checkpointer(model=model, save_dir=cfg.OUTPUT_DIR).load(path)
        check_checkpoint_settings(cfg, extra, source=path)
        return
    report = load_backbone_weights(cfg, trunk=model.backbone, res5=model.roi_heads.res5)
    left_over = [key for key in report.unexpected if not key.startswith("fc.")]
    if report.missing or left_over:
        raise ValueError(f"{path} does not fill {config_file}'s trunk and res5: missing {report.missing}, "
                         f"unused {left_over}")


if __name__ == "__main__":
    sys.exit(run_tool(main, sys.argv[1:]))
