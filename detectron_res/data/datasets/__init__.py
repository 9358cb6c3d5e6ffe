"""The data set catalog: built-in names resolved under a data root, plus ``ANNOTATIONS.json:IMAGE_DIR`` pairs.

The catalog is a plain dict from a name to a small function ``fn(root: Path, name: str) -> DetectionDataset``;
``register_dataset`` adds names (VOC, ILSVRC, your own).
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable
from pathlib import Path

from .base import DetectionDataset
from .coco import load_coco_json
from .imagenet_loc import load_imagenet_loc_csv, load_imagenet_loc_xml
from .loc_shapes import ensure_loc_shapes, generate_loc_shapes, load_loc_shapes
from .shapes import ensure_shapes, generate_shapes, load_shapes
from .voc import VOC_CLASSES, load_voc, voc_dataset_names

__all__ = [
    "COCO_FILES",
    "DATASET_CATALOG",
    "DATASETS_ENV_VAR",
    "DatasetFunction",
    "DetectionDataset",
    "ensure_loc_shapes",
    "ensure_shapes",
    "generate_loc_shapes",
    "generate_shapes",
    "get_dataset",
    "load_coco_json",
    "load_imagenet_loc_csv",
    "load_imagenet_loc_xml",
    "load_loc_shapes",
    "load_shapes",
    "load_voc",
    "VOC_CLASSES",
    "register_dataset",
    "resolve_root",
]

DatasetFunction = Callable[[Path, str], DetectionDataset]

DATASETS_ENV_VAR = "DETECTRON_RES_DATASETS"
JSON_PAIR_SEPARATOR = ".json:"
CSV_PAIR_SEPARATOR = ".csv:"  # an ILSVRC CLS-LOC CSV and its image folder; the synset mapping lies beside the CSV
SYNSETS_FILE = "LOC_synset_mapping.txt"

DATASET_CATALOG: dict[str, DatasetFunction] = {}


def register_dataset(name: str, fn: DatasetFunction, *, overwrite: bool = False) -> None:
    """Make ``get_dataset(name, root=...)`` return ``fn(resolved_root, name)``.

    Registering the same function under its name again does nothing, so that a notebook cell or a script can run
    twice; that includes the same ``def`` run again (a re-run cell defining ``fn``, a reloaded module), see
    :func:`_same_definition`. A different function under a registered name is refused unless ``overwrite=True``
    (a typo or a clash of two data sets would otherwise silently train on the wrong one).

    Raises:
        ValueError: ``name`` holds a file-pair separator, or is registered to a different function and
            ``overwrite`` is False.
    """
    for separator in (JSON_PAIR_SEPARATOR, CSV_PAIR_SEPARATOR):
        if separator in name:
            raise ValueError(f"data set name {name!r} must not contain {separator!r} (reserved for file pairs)")
    registered = DATASET_CATALOG.get(name)
    if registered is not None and not overwrite and not _same_definition(registered, fn):
        raise ValueError(
            f"data set {name!r} is already registered to {_describe(registered)}; to replace it with "
            f"{_describe(fn)}, call register_dataset({name!r}, fn, overwrite=True)"
        )
    DATASET_CATALOG[name] = fn


def _same_definition(registered: DatasetFunction, fn: DatasetFunction) -> bool:
    """Whether ``fn`` is ``registered`` or the same ``def`` run again in the same namespace: the same globals, code
    and defaults, and no closure (the functions a factory returns share their code but not what they hold)."""
    if registered is fn:
        return True
    if not (inspect.isfunction(registered) and inspect.isfunction(fn)):
        return False
    return (
        registered.__globals__ is fn.__globals__  # the names its body reads
        and registered.__code__ == fn.__code__  # its name, first line and body
        and fn.__closure__ is None  # equal code: the same free variables, so neither has a closure
        and registered.__defaults__ == fn.__defaults__
        and registered.__kwdefaults__ == fn.__kwdefaults__
    )


def _describe(fn: DatasetFunction) -> str:
    """``module.qualname`` of a data set function, for the error of a clashing registration."""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def resolve_root(root: str | os.PathLike) -> Path:
    """The data root: ``$DETECTRON_RES_DATASETS`` when set and not empty, else ``root``."""
    return Path(os.environ.get(DATASETS_ENV_VAR) or root)


def get_dataset(name: str, *, root: str | os.PathLike) -> DetectionDataset:
    """Load the data set called ``name``.

    ``name`` is a registered name (see ``DATASET_CATALOG``), resolved under ``root`` (the config's
    DATASETS.ROOT, overridden by ``$DETECTRON_RES_DATASETS``), ``PATH/TO/ANNOTATIONS.json:IMAGE_DIR`` for any
    COCO-format json, or ``PATH/TO/LOC_*_solution.csv:IMAGE_DIR`` for ILSVRC CLS-LOC data in its CSV form (with
    ``LOC_synset_mapping.txt`` beside the CSV); relative paths are relative to the working directory.
    """
    if JSON_PAIR_SEPARATOR in name:
        json_part, image_dir = name.split(JSON_PAIR_SEPARATOR, 1)
        if not json_part or not image_dir:
            raise ValueError(f"data set {name!r}: expected the form PATH/TO/ANNOTATIONS.json:IMAGE_DIR")
        return load_coco_json(json_part + ".json", image_dir, name=name)
    if CSV_PAIR_SEPARATOR in name:
        csv_part, image_dir = name.split(CSV_PAIR_SEPARATOR, 1)
        if not csv_part or not image_dir:
            raise ValueError(f"data set {name!r}: expected the form PATH/TO/LOC_*_solution.csv:IMAGE_DIR")
        csv_file = Path(csv_part + ".csv")
        return load_imagenet_loc_csv(csv_file, image_dir, csv_file.parent / SYNSETS_FILE, name=name)
    if name not in DATASET_CATALOG:
        nearest = difflib.get_close_matches(name, DATASET_CATALOG, n=1, cutoff=0.0)
        hint = f" (did you mean {nearest[0]!r}?)" if nearest else ""
        raise ValueError(
            f"unknown data set {name!r}{hint}. Known data sets: {sorted(DATASET_CATALOG)}, "
            f"a COCO json given as 'PATH/TO/ANNOTATIONS.json:IMAGE_DIR', or an ILSVRC CLS-LOC CSV as "
            f"'PATH/TO/LOC_val_solution.csv:IMAGE_DIR'"
        )
    return DATASET_CATALOG[name](resolve_root(root), name)


def _coco(json_relative: str, image_relative: str) -> DatasetFunction:
    def load(root: Path, name: str) -> DetectionDataset:
        json_file = root / "coco" / "annotations" / json_relative
        if not json_file.is_file():
            raise FileNotFoundError(
                f"data set {name!r} needs {json_file} (and images in {root / 'coco' / image_relative}); "
                f"set DATASETS.ROOT or ${DATASETS_ENV_VAR} to the folder holding coco/"
            )
        return load_coco_json(json_file, root / "coco" / image_relative, name=name)

    return load


def _imagenet_loc(split: str) -> DatasetFunction:
    """ImageNet CLS-LOC in Kaggle's layout under <root>/imagenet: LOC_<split>_solution.csv, LOC_synset_mapping.txt,
    ILSVRC/Data/CLS-LOC/<split>/ (train: one folder per wnid). Without the CSV, the box XMLs of ILSVRC's own layout,
    ILSVRC/Annotations/CLS-LOC/<split>/, are read instead (with the same synset mapping and images)."""

    def load(root: Path, name: str) -> DetectionDataset:
        base = root / "imagenet"
        csv_file, synsets = base / f"LOC_{split}_solution.csv", base / "LOC_synset_mapping.txt"
        xml_dir = base / "ILSVRC" / "Annotations" / "CLS-LOC" / split
        image_dir = base / "ILSVRC" / "Data" / "CLS-LOC" / split
        hint = f"set DATASETS.ROOT or ${DATASETS_ENV_VAR} to the folder holding imagenet/"
        if not csv_file.is_file() and not xml_dir.is_dir():
            raise FileNotFoundError(
                f"data set {name!r} needs {csv_file} or the box XMLs of {xml_dir}/ (images in {image_dir}); {hint}"
            )
        if not synsets.is_file():
            raise FileNotFoundError(f"data set {name!r} needs {synsets} (images in {image_dir}); {hint}")
        if csv_file.is_file():
            return load_imagenet_loc_csv(csv_file, image_dir, synsets, name=name)
        return load_imagenet_loc_xml(xml_dir, image_dir, synsets, name=name)

    return load


def _shapes(split: str) -> DatasetFunction:
    def load(root: Path, name: str) -> DetectionDataset:
        return load_shapes(ensure_shapes(root / "shapes"), split, name=name)

    return load


def _loc_shapes(split: str) -> DatasetFunction:
    def load(root: Path, name: str) -> DetectionDataset:
        return load_loc_shapes(ensure_loc_shapes(root / "loc_shapes"), split, name=name)

    return load


# built-in COCO names -> (json under <root>/coco/annotations/, image folder under <root>/coco/); tools/check_data.py
# reads them too
COCO_FILES: dict[str, tuple[str, str]] = {
    "coco_2017_train": ("instances_train2017.json", "train2017"),
    "coco_2017_val": ("instances_val2017.json", "val2017"),
    "coco_2014_train": ("instances_train2014.json", "train2014"),
    "coco_2014_val": ("instances_val2014.json", "val2014"),
    "coco_2014_minival": ("instances_minival2014.json", "val2014"),
    "coco_2014_valminusminival": ("instances_valminusminival2014.json", "val2014"),
}

for _name, _fn in {
    **{name: _coco(*files) for name, files in COCO_FILES.items()},
    "imagenet_loc_train": _imagenet_loc("train"),
    "imagenet_loc_val": _imagenet_loc("val"),
    "shapes_train": _shapes("train"),
    "shapes_val": _shapes("val"),
    "loc_shapes_train": _loc_shapes("train"),
    "loc_shapes_val": _loc_shapes("val"),
}.items():
    register_dataset(_name, _fn)
for _name, _voc in voc_dataset_names().items():  # voc_2007_trainval, ..., read from <root>/VOCdevkit/VOC<year>
    register_dataset(_name, lambda root, name, load=_voc: load(root))
del _name, _fn, _voc
