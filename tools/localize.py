#!/usr/bin/env python
"""ImageNet localization (the paper's Appendix C): write an ILSVRC CLS-LOC submission with the class-specific RPN
and the R-CNN stage, or score a submission file.

    python tools/localize.py --cfg configs/ilsvrc_loc_r101.yaml --ckpt RPN.pth [--rcnn-ckpt RCNN.pth | --no-rcnn] \
        --images DIR [--cls-preds FILE | --oracle-gt LOC_val_solution.csv | --classifier RESNET.pth] \
        --out submission.txt [--csv-out submission.csv] [--gt LOC_val_solution.csv] [KEY=VALUE ...]
    python tools/localize.py --evaluate --submission submission.txt --gt LOC_val_solution.csv \
        --synsets LOC_synset_mapping.txt [--image-list images.txt] [--json-out metrics.json]

Writing: one line per image of --images in sorted file-name order, up to five `label x1 y1 x2 y2` groups (labels
1..C in synset-mapping order, inclusive integer pixels), one box per class. The classes come from --cls-preds (a
file of another classifier's top-5), --oracle-gt (the ground truth), --classifier (a torchvision ResNet
classification state_dict, --cls-crop center, 10crop or dense), or by default from the system itself (the RPN's best
LOC.CANDIDATE_CLASSES classes, ranked by their best box's score).
--ckpt and --rcnn-ckpt default to the newest checkpoints in OUTPUT_DIR/rpn and OUTPUT_DIR/rcnn (the R-CNN stage is
skipped with --no-rcnn or LOC.RCNN.ENABLED=false). With --gt the written submission is scored right away.

Scoring: prints the top-1 and top-5 localization errors and the top-5 classification error (docs/localization.md).
Line i of the submission belongs to line i of --image-list, or without it to the ground truth's ids in sorted order;
a submission in the CSV form (--csv-out's) names its images, those of --image-list or else every ground-truth image.
`--json-out` merges {"loc": {"top1_loc_err", "top5_loc_err", "top5_cls_err", "num_images"}} (fractions).

Refused, in one line on stderr and before anything is computed or written: an output (--out, --csv-out,
--json-out, and <out>.images.txt / <out>.synsets.txt beside --out) that is one of the inputs (the flags' files,
the checkpoints read, anything inside --images) or another output, symlinks and `..` resolved. With
DATALOADER.ON_BAD_IMAGE=skip an image that cannot be loaded gets an empty line; otherwise it stops the run, named.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from detectron_res.config import config_files, load_config
from detectron_res.data.datasets.imagenet_loc import read_synsets
from detectron_res.engine.logger import setup_logging
from detectron_res.engine.runner import error_summary
from detectron_res.evaluation.imagenet_loc import evaluate_submission_file
from detectron_res.evaluation.metrics import write_metrics_json
from detectron_res.localization.build import (
    RCNN_FOLDER,
    RPN_FOLDER,
    build_class_predictor,
    build_localization_rpn,
    build_localization_test_loader,
    build_rcnn_localizer,
    classifier_weights,
)
from detectron_res.localization.class_predictions import oracle_classes, read_class_predictions
from detectron_res.localization.pipeline import Localizer, image_files, image_folder_dataset, localize_images
from detectron_res.localization.submission import write_submission, write_submission_csv
from detectron_res.localization.train import last_stage_checkpoint, load_stage
from detectron_res.utils.io import atomic_write_text
from detectron_res.utils.malloc import keep_freed_memory
from detectron_res.utils.paths import check_tool_paths

logger = logging.getLogger("detectron_res.localize")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localize.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--evaluate", action="store_true", help="score --submission against --gt (no model)")
    parser.add_argument("--submission", help="--evaluate: the submission file to score")
    parser.add_argument("--gt", help="the ground truth, LOC_val_solution.csv form (scores the written submission)")
    parser.add_argument("--synsets", help="LOC_synset_mapping.txt: line i is label i (default: the checkpoint's)")
    parser.add_argument("--image-list", default=None, help="--evaluate: the image id of each submission line")
    parser.add_argument("--json-out", default=None, help="merge the errors into this json file")
    parser.add_argument("--cfg", help="the localization config (MODEL.META_ARCHITECTURE: LocalizationRPN)")
    parser.add_argument("--ckpt", help="the RPN stage's checkpoint (default: newest in OUTPUT_DIR/rpn)")
    parser.add_argument("--rcnn-ckpt", help="the R-CNN stage's checkpoint (default: newest in OUTPUT_DIR/rcnn)")
    parser.add_argument("--no-rcnn", action="store_true", help="the RPN's best box per class, no R-CNN stage")
    parser.add_argument("--images", help="folder of the images to localise (sorted by file name)")
    classes = parser.add_mutually_exclusive_group()
    classes.add_argument("--cls-preds", help="top-5 classes per image from a file (docs/localization.md)")
    classes.add_argument("--oracle-gt", help="the ground-truth classes of this LOC_*_solution.csv")
    classes.add_argument("--classifier", help="a torchvision ResNet classification state_dict that predicts them")
    parser.add_argument(
        "--cls-crop", choices=("center", "10crop", "dense"),
        help="the classifier's test (LOC.CLASSIFIER.TEST_CROP; dense: the paper's, at LOC.CLASSIFIER.DENSE_SCALES)",
    )
    parser.add_argument("--out", help="the submission file to write")
    parser.add_argument("--csv-out", help="also write the CSV form (ImageId,PredictionString with wnids)")
    parser.add_argument("opts", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


def print_errors(metrics: dict) -> None:
    loc = metrics["loc"]
    print(f"images: {loc['num_images']}")
    for key, name in (("top1_loc_err", "top-1 localization error"), ("top5_loc_err", "top-5 localization error"),
                      ("top5_cls_err", "top-5 classification error")):
        print(f"{name:28s} {100 * loc[key]:6.2f} %")


def derived_outputs(out: str) -> tuple[Path, Path]:
    """The files written beside the submission `out`: its image order and (with --gt but no --synsets) the synsets."""
    return Path(out).with_suffix(".images.txt"), Path(out).with_suffix(".synsets.txt")


def check_paths(args: argparse.Namespace, *, checkpoints: dict[str, Path | str | None] | None = None) -> None:
    """Refuses, before anything is written or computed, an output (--out, --csv-out, --json-out and the files
    derived from --out) that is one of the inputs, lies inside --images, or is another output (`check_tool_paths`:
    paths resolved, so `..`, symlinks and aliases count; an image of --images that is a symlink counts as the file
    it points to). `checkpoints` are the further inputs of writing: the checkpoints and weights read, as resolved
    from the config."""
    inputs = {
        "--submission": args.submission, "--gt": args.gt, "--synsets": args.synsets, "--image-list": args.image_list,
    }
    outputs = {"--json-out": args.json_out}
    if not args.evaluate:
        inputs.update({
            "--images": args.images, "an image of --images": image_files(args.images),
            "--cfg": config_files(args.cfg) if args.cfg else None, "--ckpt": args.ckpt, "--rcnn-ckpt": args.rcnn_ckpt,
            "--cls-preds": args.cls_preds, "--oracle-gt": args.oracle_gt, "--classifier": args.classifier,
            **(checkpoints or {}),
        })
        images_txt, synsets_txt = derived_outputs(args.out)
        outputs = {
            "--out": args.out,
            "--csv-out": args.csv_out,
            "--out's image list": images_txt,
            "--out's synsets file": synsets_txt if args.gt and not args.synsets else None,
            **outputs,
        }
    check_tool_paths(inputs=inputs, outputs=outputs)


def evaluate_mode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    missing = [flag for flag in ("submission", "gt", "synsets") if not getattr(args, flag)]
    if missing:
        parser.error("--evaluate needs " + ", ".join(f"--{flag}" for flag in missing))
    check_paths(args)
    metrics = evaluate_submission_file(args.submission, ground_truth=args.gt, synsets=args.synsets, image_list=args.image_list)
    print_errors(metrics)
    if args.json_out:
        write_metrics_json(args.json_out, metrics)
        print(f"metrics written to {args.json_out}")
    return 0


def write_mode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    missing = [flag for flag in ("cfg", "images", "out") if not getattr(args, flag)]
    if missing:
        parser.error("writing a submission needs " + ", ".join(f"--{flag}" for flag in missing) + " (or use --evaluate)")
    cfg = load_config(args.cfg, [*args.opts, *([f"LOC.CLASSIFIER.TEST_CROP={args.cls_crop}"] if args.cls_crop else [])])
    if cfg.MODEL.META_ARCHITECTURE != "LocalizationRPN":
        raise ValueError(f"{args.cfg} is not a localization config (MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE})")
    output_dir = Path(cfg.OUTPUT_DIR)
    use_rcnn = not args.no_rcnn and cfg.LOC.RCNN.ENABLED
    rpn_path = args.ckpt or last_stage_checkpoint(output_dir / RPN_FOLDER, "RPN-stage")
    rcnn_path = (args.rcnn_ckpt or last_stage_checkpoint(output_dir / RCNN_FOLDER, "R-CNN-stage")) if use_rcnn else None
    config_classifier = not (args.cls_preds or args.oracle_gt or args.classifier)  # LOC.CLASSIFIER.WEIGHTS, if set
    check_paths(args, checkpoints={
        "RPN checkpoint": rpn_path,
        "R-CNN checkpoint": rcnn_path,
        "LOC.CLASSIFIER.WEIGHTS": classifier_weights(cfg) if config_classifier else None,
        "MODEL.BACKBONE.WEIGHTS": cfg.MODEL.BACKBONE.WEIGHTS or None,
    })
    setup_logging(None)
    rpn = build_localization_rpn(cfg)
    metadata = load_stage(rpn, rpn_path)
    rcnn = None
    if use_rcnn:
        rcnn = build_rcnn_localizer(cfg)
        load_stage(rcnn, rcnn_path)
    wnids = read_synsets(args.synsets) if args.synsets else metadata.get("wnids")
    if wnids is not None and len(wnids) != cfg.MODEL.NUM_CLASSES:
        raise ValueError(f"{len(wnids)} synsets but MODEL.NUM_CLASSES={cfg.MODEL.NUM_CLASSES}")
    if wnids is None and (args.cls_preds or args.oracle_gt or args.csv_out or args.gt):
        raise ValueError(f"{rpn_path} names no synsets (wnids): pass --synsets LOC_synset_mapping.txt")

    dataset = image_folder_dataset(
        args.images,
        class_names=metadata.get("class_names") or [str(i) for i in range(cfg.MODEL.NUM_CLASSES)],
        on_bad_image=cfg.DATALOADER.ON_BAD_IMAGE,
    )
    ids = [r["image_id"] for r in dataset.records]
    table, classify, weights = None, None, None
    if args.cls_preds:
        table = read_class_predictions(args.cls_preds, wnids=wnids, image_ids=ids)
    elif args.oracle_gt:
        table = oracle_classes(args.oracle_gt, wnids=wnids)
        absent = [i for i in ids if i not in table]
        if absent:
            raise ValueError(f"{args.oracle_gt} has no ground truth for {len(absent)} of the images, e.g. {absent[0]!r}")
    else:
        weights = args.classifier or classifier_weights(cfg)
        classify = build_class_predictor(cfg, weights) if weights else None
        if classify is None:
            logger.warning(
                "No class source (--cls-preds, --oracle-gt, --classifier, LOC.CLASSIFIER.WEIGHTS): the RPN's best %d "
                "classes by image score are ranked by their best box's score (docs/localization.md)",
                cfg.LOC.CANDIDATE_CLASSES,
            )
    localizer = Localizer(
        rpn=rpn, rcnn=rcnn, classes=table, classify=classify, classes_per_image=cfg.LOC.CLASSES_PER_IMAGE
    ).eval()
    source = ("--cls-preds" if args.cls_preds else "--oracle-gt" if args.oracle_gt else
              f"the classifier {weights}" if classify else "the system's own ranking")
    logger.info("Localising %d images of %s, classes from %s, %s", len(ids), args.images, source,
                "RPN + R-CNN" if rcnn is not None else "RPN only")
    image_ids, lines = localize_images(localizer, build_localization_test_loader(cfg, dataset))
    found = dict(zip(image_ids, lines))
    skipped = [i for i in ids if i not in found]
    if skipped:  # DATALOADER.ON_BAD_IMAGE=skip: the line stays, empty, so that the lines still match the images
        logger.warning("%d unreadable images get an empty line, e.g. %s", len(skipped), skipped[0])
    lines = [found.get(i, (np.zeros(0, dtype=np.int64), np.zeros((0, 4), dtype=np.int64))) for i in ids]
    images_txt, synsets_txt = derived_outputs(args.out)
    write_submission(args.out, lines)
    atomic_write_text(images_txt, "".join(f"{i}\n" for i in ids))
    print(f"submission for {len(ids)} images written to {args.out} (image order in {images_txt})")
    if args.csv_out:
        write_submission_csv(args.csv_out, ids, lines, wnids=wnids)
        print(f"CSV form written to {args.csv_out}")
    if args.gt:
        synsets = args.synsets
        if synsets is None:
            synsets = str(synsets_txt)
            atomic_write_text(synsets, "".join(f"{w}\n" for w in wnids))
        metrics = evaluate_submission_file(args.out, ground_truth=args.gt, synsets=synsets, image_list=images_txt)
        print_errors(metrics)
        if args.json_out:
            write_metrics_json(args.json_out, metrics)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    try:
        return evaluate_mode(parser, args) if args.evaluate else write_mode(parser, args)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as error:
        print(f"{parser.prog}: error: {error_summary(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    keep_freed_memory()  # reuse the large per-RoI buffers instead of page-faulting them afresh (as run_tool does)
    sys.exit(main())
