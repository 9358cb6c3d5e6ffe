#!/usr/bin/env python
"""Check that the data sets of a config are complete: every image there, readable, whole and of its stated size.

    python tools/check_data.py --cfg configs/coco_r101.yaml
    python tools/check_data.py --cfg configs/voc_r50.yaml DATASETS.ROOT=/data/datasets
    python tools/check_data.py --cfg configs/coco_r50.yaml "DATASETS.TRAIN=[a/train.json:a/images]" "DATASETS.TEST=[]"

Every data set of DATASETS.TRAIN and DATASETS.TEST is resolved as training resolves it (built-in names under
DATASETS.ROOT, or $DETECTRON_RES_DATASETS when set; `ANNOTATIONS.json:IMAGE_DIR` and `LOC_*_solution.csv:IMAGE_DIR`
pairs), its annotation files are read, and every image it lists is decoded with the loader's own decoder
(`detectron_res.data.mapper.read_image_rgb`, which also refuses a truncated JPEG) on a pool of threads and compared
with the size its annotations state, as the training's mapper does. Unlike training, a COCO json's or CLS-LOC CSV's
missing images are all listed rather than stopping at the first few (training stops on a COCO or VOC image that is
missing; CLS-LOC training leaves absent images out). Names of the generated data sets (shapes, loc_shapes) generate
them when absent, as training does.

Prints one line per data set; exit status 0 when all are complete. Otherwise each incomplete set's line is followed
by its missing, unreadable, truncated or wrongly sized images (the first --show of them, then a count), a last line
on stderr names the incomplete sets, and the exit status is 1. A config or annotation file that cannot be read is
one line, `check_data.py: error: ...`, and status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from detectron_res.config import load_config
from detectron_res.data.datasets import COCO_FILES, get_dataset, load_coco_json, load_voc, resolve_root
from detectron_res.data.datasets.imagenet_loc import image_candidates, read_loc_solution, read_synsets
from detectron_res.data.mapper import BadImageError, read_image_rgb
from detectron_res.engine.runner import parse_args

JSON_PAIR, CSV_PAIR = ".json:", ".csv:"
PROBLEMS = ("missing", "truncated", "unreadable", "wrong size")


class ExpectedImage(NamedTuple):
    """An image a data set lists: where it must be, other places it may be instead (CLS-LOC's two layouts), and
    the size its annotations state (None: taken from the file itself)."""

    path: Path
    alternatives: tuple[Path, ...] = ()
    height: int | None = None
    width: int | None = None


def expected_images(name: str, root: str) -> tuple[list[ExpectedImage], str]:
    """The images data set `name` lists, and where they come from (for its line).

    Raises:
        FileNotFoundError, ValueError: an annotation file is missing or malformed, the name is unknown.
    """
    if JSON_PAIR in name:
        json_part, image_dir = name.split(JSON_PAIR, 1)
        return _coco_images(json_part + ".json", image_dir, name), f"{json_part}.json, images in {image_dir}"
    if CSV_PAIR in name:
        csv_part, image_dir = name.split(CSV_PAIR, 1)
        csv_file = Path(csv_part + ".csv")
        return _loc_images(csv_file, Path(image_dir), csv_file.parent / "LOC_synset_mapping.txt"), (
            f"{csv_file}, images in {image_dir}")
    base = resolve_root(root)
    if name in COCO_FILES:
        json_name, image_folder = COCO_FILES[name]
        json_file, image_dir = base / "coco" / "annotations" / json_name, base / "coco" / image_folder
        if not json_file.is_file():
            raise FileNotFoundError(f"data set {name!r} needs {json_file} (images in {image_dir}); set "
                                    f"DATASETS.ROOT or $DETECTRON_RES_DATASETS to the folder holding coco/")
        return _coco_images(json_file, image_dir, name), f"{json_file}, images in {image_dir}"
    split = name.removeprefix("imagenet_loc_")
    csv_file = base / "imagenet" / f"LOC_{split}_solution.csv"
    if name.startswith("imagenet_loc_") and csv_file.is_file():  # else the loader's own error, or its XML layout
        image_dir = base / "imagenet" / "ILSVRC" / "Data" / "CLS-LOC" / split
        images = _loc_images(csv_file, image_dir, base / "imagenet" / "LOC_synset_mapping.txt")
        return images, f"{csv_file}, images in {image_dir}"
    if name.startswith("voc_") and name.count("_") == 2:  # else get_dataset's error names the known sets
        _, year, split = name.split("_")
        for voc_root in (base / "VOCdevkit" / f"VOC{year}", base / f"VOC{year}"):
            if (voc_root / "ImageSets" / "Main" / f"{split}.txt").is_file():
                dataset = load_voc(voc_root, split, name=name, check_files=False)
                return _record_images(dataset.records), f"{voc_root}, split {split}"
    dataset = get_dataset(name, root=root)  # a VOC name's own error, the generated and the registered data sets
    return _record_images(dataset.records), f"{len(dataset.records)} records"


def _coco_images(json_file: str | os.PathLike, image_dir: str | os.PathLike, name: str) -> list[ExpectedImage]:
    return _record_images(load_coco_json(json_file, image_dir, name=name, check_files=False).records)


def _record_images(records: Sequence[dict]) -> list[ExpectedImage]:
    return [ExpectedImage(Path(r["file_name"]), height=r.get("height"), width=r.get("width")) for r in records]


def _loc_images(csv_file: Path, image_dir: Path, synsets: Path) -> list[ExpectedImage]:
    """Every image a CLS-LOC CSV annotates, in its two possible places (the loader takes either): the one of its
    layout first (`<wnid>/<ImageId>.JPEG` for a training ImageId `<wnid>_<n>`, else `<ImageId>.JPEG`)."""
    if not synsets.is_file():
        raise FileNotFoundError(f"{csv_file} needs {synsets} beside it")
    wnids = set(read_synsets(synsets))
    images = []
    for image_id in sorted(read_loc_solution(csv_file, read_synsets(synsets))):
        flat, in_wnid_folder = image_candidates(image_dir, image_id)
        if image_id.split("_")[0] in wnids:  # the training layout: <wnid>/<wnid>_<n>.JPEG, named when missing
            flat, in_wnid_folder = in_wnid_folder, flat
        images.append(ExpectedImage(flat, alternatives=(in_wnid_folder,)))
    return images


def image_problem(image: ExpectedImage) -> tuple[str, str] | None:
    """(kind, message) of what training would fail on with this image, None when it reads as its annotations say."""
    path = next((p for p in (image.path, *image.alternatives) if p.is_file()), image.path)
    try:
        decoded = read_image_rgb(path)
    except FileNotFoundError:
        return "missing", str(image.path)
    except BadImageError as error:
        return ("truncated" if "truncated" in str(error) else "unreadable"), str(error)
    except OSError as error:  # a folder, no permission, an I/O error
        return "unreadable", f"{path}: {error.strerror or error}"
    if image.height is not None and decoded.shape[:2] != (image.height, image.width):
        return "wrong size", (f"{path}: decoded {decoded.shape[0]}x{decoded.shape[1]} (HxW) but the annotations "
                              f"say {image.height}x{image.width}")
    return None


def check_dataset(name: str, root: str, *, pool: ThreadPoolExecutor, show: int) -> tuple[bool, list[str]]:
    """(complete, the lines to print) for one data set."""
    try:
        images, source = expected_images(name, root)
    except (OSError, ValueError) as error:
        return False, [f"{name}: error: {one_line(error)}"]
    problems = [p for p in pool.map(image_problem, images) if p is not None]
    if not problems:
        return True, [f"{name}: complete, {len(images)} images ({source})"]
    counts = ", ".join(f"{sum(kind == k for kind, _ in problems)} {k}" for k in PROBLEMS
                       if any(kind == k for kind, _ in problems))
    lines = [f"{name}: INCOMPLETE, {len(problems)} of {len(images)} images cannot be used ({counts}; {source})"]
    lines += [f"  {kind}: {message}" for kind, message in problems[:show]]
    if len(problems) > show:
        lines.append(f"  ... and {len(problems) - show} more (--show {len(problems)} lists them all)")
    return False, lines


def one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=Path(__file__).name, description=__doc__.split("\n\n")[0],
        epilog="KEY=VALUE arguments override config keys, e.g. DATASETS.ROOT=/data/datasets",
    )
    parser.add_argument("--cfg", required=True, help="config file (YAML) naming DATASETS.TRAIN and DATASETS.TEST")
    parser.add_argument("--show", type=int, default=20, metavar="N",
                        help="bad images listed per data set before a count of the rest (default: 20)")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                        help="images decoded at once (default: the CPU count, at most 8)")
    parser.add_argument("opts", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; returns the exit status (0: every data set complete, 1 otherwise)."""
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.show < 0 or args.threads < 1:
        parser.error("--show must be >= 0 and --threads >= 1")
    try:
        cfg = load_config(args.cfg, list(args.opts))
    except (OSError, ValueError) as error:
        print(f"{parser.prog}: error: {one_line(error)}", file=sys.stderr)
        return 1
    names = list(dict.fromkeys([*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]))
    if not names:
        print(f"{parser.prog}: error: {args.cfg} names no data set in DATASETS.TRAIN or DATASETS.TEST", file=sys.stderr)
        return 1
    incomplete = []
    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        for name in names:
            complete, lines = check_dataset(name, cfg.DATASETS.ROOT, pool=pool, show=args.show)
            print("\n".join(lines), flush=True)
            if not complete:
                incomplete.append(name)
    if incomplete:
        print(f"{parser.prog}: error: {len(incomplete)} of {len(names)} data sets incomplete: {', '.join(incomplete)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
