"""COCO-style box evaluation (pycocotools ``COCOeval``, iouType ``"bbox"``) of detections or of a results file.

:func:`evaluate_coco_results` is the one code path: :class:`COCOEvaluator` calls it on the detections it
collected from a model, ``tools/eval_det.py`` on an existing COCO results json. Metrics come back as
``{"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP-<class name>", ...}}`` in percent; a value that
COCOeval leaves undefined (no ground truth in that area range or class) is ``None``.

Two backends run the same COCOeval (``TEST.COCO_BACKEND``, ``tools/eval_det.py --backend``): ``pycocotools``
(the reference, always installed) and ``faster_coco_eval`` (the optional ``faster-coco-eval`` package, whose
``COCOeval_faster`` runs the per-image matching and the accumulation in C++; the tests check that both give the
same metrics and precision array to 1e-6, docs/benchmarks.md times them, 5.4x faster at COCO val2017's size).
The default, ``auto``, is ``faster_coco_eval`` where that package imports and ``pycocotools`` otherwise
(:func:`resolve_coco_backend`), as detectron2's ``COCOEvaluator`` uses its C++ COCOeval when it is built.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor
from torchvision.ops import box_convert

from detectron_res.data.datasets.base import DetectionDataset
from detectron_res.structures.boxes import usable_ground_truth, xywh_to_xyxy

from .evaluator import DatasetEvaluator
from .metrics import format_per_category_table, per_category_values
from .pr_curves import ClassCurves, write_evaluation_plots

logger = logging.getLogger(__name__)

RESULTS_FILE_NAME = "coco_instances_results.json"
SUMMARY_METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]
_RESULT_KEYS: tuple[str, ...] = ("image_id", "category_id", "bbox", "score")
_BOX_DECIMALS = 3
COCO_BACKENDS: tuple[str, ...] = ("pycocotools", "faster_coco_eval")  # the implementations that can run
COCO_BACKEND_CHOICES: tuple[str, ...] = ("auto", *COCO_BACKENDS)  # what TEST.COCO_BACKEND and --backend accept
DEFAULT_COCO_BACKEND = "auto"
FASTER_COCO_EVAL_INSTALL = "pip install faster-coco-eval (or the fast-eval extra: pip install 'detectron_res[fast-eval]')"
_SCORE_DECIMALS = 5


@contextlib.contextmanager
def _quiet():
    """Swallow what pycocotools prints to stdout (index building, timings)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def records_to_coco_dict(dataset: DetectionDataset) -> dict:
    """An in-memory COCO ground truth (``images``, ``categories``, ``annotations``) built from the records.

    Image ids are the records' ``image_id`` (all ints or all strs; pycocotools accepts either), categories are
    ``{"id": category_ids[k], "name": class_names[k]}``, boxes become ``[x, y, w, h]`` with ``area = w * h``.
    An annotation is marked ``iscrowd = 1`` when it is a crowd region **or** a VOC ``difficult`` object, so that
    COCOeval ignores it: detections matched to it count neither as true nor as false positives. (COCOeval
    matches crowd regions by intersection over the *detection's* area, so a small detection inside a difficult
    box is ignored as well; VOC's own protocol uses the ordinary IoU there.)

    Raises:
        ValueError: class metadata of different lengths, a repeated or badly typed image id, int image ids beside
            str ones, or an annotation whose ``category_id`` is not a contiguous index of the data set or whose
            ``bbox`` is not 4 numbers.
    """
    if len(dataset.category_ids) != len(dataset.class_names):
        raise ValueError(
            f"data set {dataset.name!r}: {len(dataset.category_ids)} category_ids but "
            f"{len(dataset.class_names)} class_names"
        )
    categories = [
        {"id": int(category_id), "name": str(name)}
        for category_id, name in zip(dataset.category_ids, dataset.class_names)
    ]
    images: list[dict] = []
    annotations: list[dict] = []
    seen_ids: set = set()
    for position, record in enumerate(dataset.records):
        image_id = record.get("image_id")
        if isinstance(image_id, bool) or not isinstance(image_id, (Integral, str)):
            raise ValueError(
                f"data set {dataset.name!r}: record #{position} has image_id {image_id!r}; expected an int or a str"
            )
        image_id = image_id if isinstance(image_id, str) else int(image_id)
        if image_id in seen_ids:
            raise ValueError(f"data set {dataset.name!r}: image_id {image_id!r} occurs in more than one record")
        seen_ids.add(image_id)
        images.append(
            {
                "id": image_id,
                "height": int(record["height"]),
                "width": int(record["width"]),
                "file_name": str(record.get("file_name", "")),
            }
        )
        for ann in record.get("annotations", []):
            label = ann.get("category_id")
            if isinstance(label, bool) or not isinstance(label, Integral) or not 0 <= label < len(categories):
                raise ValueError(
                    f"data set {dataset.name!r}: image {image_id!r} has an annotation with category_id {label!r}; "
                    f"expected a contiguous class index in [0, {len(categories)})"
                )
            if not _is_number_list(ann.get("bbox"), length=4):
                raise ValueError(
                    f"data set {dataset.name!r}: image {image_id!r} has an annotation with bbox {ann.get('bbox')!r}; "
                    "expected [x1, y1, x2, y2]"
                )
            x1, y1, x2, y2 = (float(value) for value in ann["bbox"])
            width, height = x2 - x1, y2 - y1
            ignored = bool(ann.get("iscrowd", 0)) or bool(ann.get("difficult", 0))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": categories[int(label)]["id"],
                    "bbox": [x1, y1, width, height],
                    "area": width * height,
                    "iscrowd": int(ignored),
                }
            )
    mixed = _first_int_and_str(image["id"] for image in images)
    if mixed is not None:
        (int_position, int_id), (str_position, str_id) = mixed
        raise ValueError(f"data set {dataset.name!r}: record #{int_position} has the int image_id {int_id!r} but "
                         f"record #{str_position} the str image_id {str_id!r}; image ids must be all ints or all strs "
                         "(pycocotools sorts them)")
    return {"images": images, "categories": categories, "annotations": annotations}


def dataset_ground_truth(dataset: DetectionDataset) -> COCO:
    """The COCO ground truth a data set is evaluated against: its ``json_file`` when it has one (official areas and
    crowd flags), otherwise one built from its records by :func:`records_to_coco_dict`."""
    if dataset.json_file is not None:
        return load_coco_ground_truth(dataset.json_file)
    return load_coco_ground_truth(records_to_coco_dict(dataset))


def load_coco_ground_truth(source: COCO | dict | str | os.PathLike) -> COCO:
    """A pycocotools ``COCO`` from a COCO object (returned as is), a COCO dict or the path of a COCO json.

    The boxes go through the rule training applies
    (:func:`~detectron_res.structures.boxes.usable_ground_truth`): a box with a NaN or infinite coordinate, a
    negative width or height, or lying outside its image is dropped, and one reaching outside its image is clipped
    to it (its ``area``, which COCO takes from the segmentation, is kept); a warning counts both and names the
    first dropped annotations. Annotations without ``iscrowd`` get 0, without ``area`` get ``w * h``, without
    ``id`` get their position plus one, as COCOeval needs all three; when an id is not a positive int (0, which
    COCOeval reads as "no match", or a str), all are numbered 1 to N.

    Raises:
        FileNotFoundError: the json does not exist.
        ValueError: it is not valid JSON, lacks ``images`` / ``categories`` lists or well-formed annotations, a
            category lacks an int ``id`` or a str ``name`` or repeats another's id, an image or annotation ``id`` is
            not an int or a str or repeats another's, image ids mix ints and strs (pycocotools sorts them), an image
            has no valid ``height`` / ``width``, or an annotation names an image that is not in ``images``.
    """
    if isinstance(source, COCO):
        return source
    if isinstance(source, dict):
        name = "ground truth dict"
        data = copy.deepcopy(source)
    else:
        name = os.fspath(source)
        data = _read_json(name, what="COCO ground-truth")
    if not isinstance(data, dict):
        raise ValueError(f"{name}: a COCO ground truth must be a JSON object, got {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{name}: a COCO ground truth needs a list under {key!r}")
    annotations = data.setdefault("annotations", [])
    if not isinstance(annotations, list):
        raise ValueError(f"{name}: 'annotations' must be a list, got {type(annotations).__name__}")
    for position, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not all(key in ann for key in ("image_id", "category_id")):
            raise ValueError(f"{name}: annotation #{position} must be an object with 'image_id' and 'category_id'")
        if not _is_number_list(ann.get("bbox"), length=4):
            raise ValueError(f"{name}: annotation #{position} has bbox {ann.get('bbox')!r}; expected [x, y, w, h]")
    _check_categories(data["categories"], name)
    _check_image_ids(data["images"], name)
    _check_annotation_ids(annotations, name)
    _number_annotations_for_cocoeval(annotations, name)
    data["annotations"] = _usable_annotations(data, name)
    for ann in data["annotations"]:
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))

    coco = COCO()
    coco.dataset = data
    with _quiet():
        coco.createIndex()
    return coco


def _check_categories(categories: list, name: str) -> None:
    """Refuse a category that is not an object with an ``id`` and a ``name`` (both backends failed with a bare
    ``KeyError``), an id that is not an int (the COCO format's ids are ints, as results' ``category_id`` must be: a
    str id made faster-coco-eval fail in C++ with a many-line ``TypeError``), a name that is not a str, or an id that
    two categories share (pycocotools keeps the last one's name: the class of the first was reported under the
    second's name, both backends)."""
    first: dict[int, int] = {}  # id -> position of the first category with it
    for position, category in enumerate(categories):
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise ValueError(f"{name}: category #{position} must be an object with an 'id' and a 'name'")
        category_id = category["id"]
        if isinstance(category_id, bool) or not isinstance(category_id, Integral):
            raise ValueError(f"{name}: category #{position} has id {category_id!r}; expected an int")
        if not isinstance(category["name"], str):
            raise ValueError(f"{name}: category #{position} has name {category['name']!r}; expected a str")
        earlier = first.setdefault(category_id, position)
        if earlier != position:
            raise ValueError(f"{name}: categories #{earlier} and #{position} have the same id {category_id!r}; "
                             "category ids must be unique")


def _check_image_ids(images: list, name: str) -> None:
    """Refuse an image that is not an object with an ``id``, an id that is not an int or a str, an id that two
    images share, or int ids beside str ids. pycocotools indexes images by id and keeps the last entry, and so would
    the image sizes of the ground-truth rule, so a repeat silently merges two images (a box of a 200 px image lying
    outside a 100 px one under the same id was dropped, and perfect detections scored AP 50, both backends).
    pycocotools sorts the image ids, which fails on a mix with a bare ``TypeError`` ('<' not supported between
    'str' and 'int') while faster-coco-eval scores it: one ground truth must give one answer."""
    first: dict[int | str, int] = {}  # id -> position of the first image with it
    for position, image in enumerate(images):
        if not isinstance(image, dict) or "id" not in image:
            raise ValueError(f"{name}: image #{position} must be an object with an 'id'")
        image_id = image["id"]
        if isinstance(image_id, bool) or not isinstance(image_id, (Integral, str)):
            raise ValueError(f"{name}: image #{position} has id {image_id!r}; expected an int or a str")
        earlier = first.setdefault(image_id, position)
        if earlier != position:
            raise ValueError(f"{name}: images #{earlier} and #{position} have the same id {image_id!r}; "
                             "image ids must be unique")
    mixed = _first_int_and_str(image["id"] for image in images)
    if mixed is not None:
        (int_position, int_id), (str_position, str_id) = mixed
        raise ValueError(f"{name}: image #{int_position} has the int id {int_id!r} but image #{str_position} the str "
                         f"id {str_id!r}; image ids must be all ints or all strs (pycocotools sorts them)")


def _first_int_and_str(ids: Iterable[int | str]) -> tuple[tuple[int, int], tuple[int, str]] | None:
    """The position and value of the first int and of the first str among ``ids`` (ints or strs), when both occur."""
    first_int = first_str = None
    for position, value in enumerate(ids):
        if isinstance(value, str):
            first_str = first_str or (position, value)
        else:
            first_int = first_int or (position, value)
        if first_int is not None and first_str is not None:
            return first_int, first_str
    return None


def _check_annotation_ids(annotations: list[dict], name: str) -> None:
    """Give an annotation without ``id`` its position plus one, and refuse an id that is not an int or a str or that
    two annotations share: pycocotools indexes annotations by id and keeps one per id, so a repeat would silently
    lose ground-truth boxes (two boxes under one id scored AP 25.2 for perfect detections, both backends)."""
    first: dict[int | str, int] = {}  # id -> position of the first annotation with it
    assigned: set[int] = set()  # positions of the annotations without an id
    for position, ann in enumerate(annotations):
        if "id" not in ann:
            assigned.add(position)
        ann_id = ann.setdefault("id", position + 1)
        if isinstance(ann_id, bool) or not isinstance(ann_id, (Integral, str)):
            raise ValueError(f"{name}: annotation #{position} has id {ann_id!r}; expected an int or a str")
        earlier = first.setdefault(ann_id, position)
        if earlier != position:
            note = "".join(
                f" (#{index} had no 'id' and got its position plus one)" for index in (earlier, position)
                if index in assigned
            )  # at most one of the two: positions differ
            raise ValueError(
                f"{name}: annotations #{earlier} and #{position} have the same id {ann_id!r}{note}; "
                "annotation ids must be unique"
            )


def _number_annotations_for_cocoeval(annotations: list[dict], name: str) -> None:
    """Renumber the annotations 1 to N when an id is not a positive int: COCOeval keeps the matched annotation's id
    in a float array where 0 means "no match", so a box with id 0 (or below) is never found (a perfect detection
    of it counted as a false positive: AP50 25.2 instead of 100 on two boxes, both backends) and a non-numeric str
    id fails once matched. The ids are unique (checked before) and used by nothing but the evaluation."""
    odd = next((position for position, ann in enumerate(annotations)
                if not isinstance(ann["id"], Integral) or ann["id"] <= 0), None)
    if odd is None:
        return
    logger.info("%s: annotation #%d has id %r; the %d annotations are numbered 1 to %d for COCOeval, which reads an "
                "id 0 as no match", name, odd, annotations[odd]["id"], len(annotations), len(annotations))
    for position, ann in enumerate(annotations):
        ann["id"] = position + 1


def _usable_annotations(data: dict, name: str) -> list[dict]:
    """``data["annotations"]`` after the ground-truth rule (see :func:`load_coco_ground_truth`), logged."""
    sizes = {}
    for image in data["images"]:  # objects with unique ids (_check_image_ids)
        height, width = image.get("height"), image.get("width")
        if not (_is_number(height, finite=True) and _is_number(width, finite=True) and height > 0 and width > 0):
            raise ValueError(f"{name}: image {image['id']!r} needs a positive 'height' and 'width', got {height!r}, {width!r}")
        sizes[image["id"]] = (float(height), float(width))
    annotations = data["annotations"]
    categories = {category["id"] for category in data["categories"]}  # ints (_check_categories)
    for position, ann in enumerate(annotations):
        if ann["image_id"] not in sizes:
            raise ValueError(f"{name}: annotation {ann['id']!r} refers to image_id {ann['image_id']!r}, which is not in 'images'")
        if ann["category_id"] not in categories:  # COCOeval would drop the box silently (its class is never scored)
            known = ", ".join(str(cat) for cat in sorted(categories)[:10]) + (", ..." if len(categories) > 10 else "")
            raise ValueError(f"{name}: annotation #{position} has category_id {ann['category_id']!r}, which is not "
                             f"the id of a category in 'categories' ({known})")
    if not annotations:
        return annotations
    size = np.array([sizes[ann["image_id"]] for ann in annotations])
    boxes = xywh_to_xyxy(np.array([ann["bbox"] for ann in annotations], dtype=np.float64))
    clipped, keep = usable_ground_truth(boxes, height=size[:, 0], width=size[:, 1])
    changed = keep & np.any(clipped != boxes, axis=1)
    kept = []
    for ann, box, usable, was_clipped in zip(annotations, clipped, keep.tolist(), changed.tolist()):
        if usable:
            kept.append({**ann, "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]} if was_clipped else ann)
    dropped = [ann["id"] for ann, usable in zip(annotations, keep.tolist()) if not usable]
    if dropped or changed.any():
        ids = ", ".join(map(str, dropped[:10])) + (" ..." if len(dropped) > 10 else "")
        logger.warning(
            "Ground truth %s: dropped %d boxes with a non-finite coordinate, a negative or zero width or height, or "
            "lying outside their image%s; clipped %d boxes to their image (the rule training applies)",
            name, len(dropped), f" (annotation ids {ids})" if dropped else "", int(changed.sum()),
        )
    return kept


def load_coco_results(path: str | os.PathLike) -> list[dict]:
    """Read and check a COCO results json (a list of ``{"image_id", "category_id", "bbox", "score"}``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not valid JSON or an entry is malformed (see :func:`validate_coco_results`).
    """
    name = os.fspath(path)
    results = _read_json(name, what="COCO results")
    validate_coco_results(results, source=name)
    return results


def validate_coco_results(results: object, *, source: str = "results") -> None:
    """Check that ``results`` is a list of COCO box results; the message names ``source`` and the first bad entry.

    Each entry must be an object with an int or str ``image_id``, an int ``category_id``, a ``bbox`` of 4 finite
    numbers ``[x, y, w, h]`` with ``w, h >= 0`` and a finite number ``score``.

    Raises:
        ValueError: on the first entry that does not fit.
    """
    if not isinstance(results, list):
        raise ValueError(f"{source}: COCO results must be a JSON list of detections, got {type(results).__name__}")
    if _plainly_valid_results(results):
        return
    for index, entry in enumerate(results):  # the first bad entry, named (or none: see _plainly_valid_results)
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: entry #{index} is a {type(entry).__name__}, expected an object")
        missing = [key for key in _RESULT_KEYS if key not in entry]
        if missing:
            raise ValueError(f"{source}: entry #{index} lacks {', '.join(repr(key) for key in missing)}: {entry!r}")
        image_id = entry["image_id"]
        if isinstance(image_id, bool) or not isinstance(image_id, (Integral, str)):
            raise ValueError(f"{source}: entry #{index} has image_id {image_id!r}; expected an int or a str")
        category_id = entry["category_id"]
        if isinstance(category_id, bool) or not isinstance(category_id, Integral):
            raise ValueError(f"{source}: entry #{index} has category_id {category_id!r}; expected an int")
        if not _is_number_list(entry["bbox"], length=4, finite=True):
            raise ValueError(
                f"{source}: entry #{index} has bbox {entry['bbox']!r}; expected 4 finite numbers [x, y, w, h]"
            )
        if entry["bbox"][2] < 0 or entry["bbox"][3] < 0:
            raise ValueError(
                f"{source}: entry #{index} has bbox {entry['bbox']!r} with a negative width or height; "
                "COCO boxes are [x, y, width, height] (was [x1, y1, x2, y2] written?)"
            )
        if not _is_number(entry["score"], finite=True):
            raise ValueError(f"{source}: entry #{index} has score {entry['score']!r}; expected a finite number")


def _plainly_valid_results(results: list) -> bool:
    """Whether every entry is a result :func:`validate_coco_results` accepts, checked a field at a time over the whole
    list (the types as sets of exact types, the numbers with numpy) instead of entry by entry in Python: 0.5 s instead
    of 2.4 s for 500,000 detections (COCO val2017's size, 2 CPU cores). False also where some entry may still be
    valid (a numpy number, a dict subclass, an int too large for a float): the per-entry check, which names the first
    bad entry, decides."""
    if not results:
        return True
    if set(map(type, results)) != {dict}:
        return False
    try:  # a list per field: 5x faster than zip(*map(itemgetter(...), results)) here, which makes 500,000 tuples
        image_ids, category_ids, boxes, scores = ([entry[key] for entry in results] for key in _RESULT_KEYS)
    except KeyError:
        return False
    if not (set(map(type, image_ids)) <= {int, str} and set(map(type, category_ids)) == {int}
            and set(map(type, boxes)) <= {list, tuple} and set(map(len, boxes)) == {4}
            and set(map(type, chain.from_iterable(boxes))) <= {int, float} and set(map(type, scores)) <= {int, float}):
        return False
    try:
        xywh = np.fromiter(chain.from_iterable(boxes), dtype=np.float64, count=4 * len(boxes)).reshape(-1, 4)
        score_values = np.fromiter(scores, dtype=np.float64, count=len(scores))
    except OverflowError:
        return False
    return bool(np.isfinite(xywh).all() and np.isfinite(score_values).all() and (xywh[:, 2:] >= 0).all())


def evaluate_coco_results(
    gt: COCO | str | os.PathLike,
    results: list[dict] | str | os.PathLike,
    *,
    img_ids: Sequence[int | str] | None = None,
    plot_dir: str | os.PathLike | None = None,
    backend: str = DEFAULT_COCO_BACKEND,
) -> dict[str, dict[str, float | None]]:
    """Run COCOeval (bbox) of ``results`` against ``gt``, log its standard summary and return the metrics.

    Args:
        gt: a pycocotools ``COCO`` or the path of a COCO ground-truth json.
        results: COCO result dicts (not modified) or the path of a COCO results json.
        img_ids: evaluate only these images (for example the ones a model actually ran on); default all
            images of the ground truth. Detections on other images are ignored.
        plot_dir: when given, the per-class precision-recall curves (:func:`coco_pr_curves`) and AP bars are drawn
            there as ``coco_pr_curves.png`` and ``coco_ap_per_class.png`` if matplotlib is installed (a failure to
            draw is logged, never raised; see :mod:`.pr_curves`).
        backend: ``"auto"``, ``"pycocotools"`` or ``"faster_coco_eval"`` (see the module docstring and
            :func:`resolve_coco_backend`); both implementations see the same checked ground truth and detections.

    Returns:
        ``{"bbox": {...}}`` in percent: ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl`` (``None`` where
        COCOeval has no ground truth to average over), and ``AP-<class name>`` per ground-truth category
        (``None`` for a class without ground truth in the evaluated images). With no detections at all a
        warning is logged and the six summary values are 0.0.

    Raises:
        FileNotFoundError: a named file does not exist.
        ValueError: malformed files, or results / ``img_ids`` that name an image or category id which is not
            in the ground truth (the message names the first one); an unknown ``backend``, or
            ``faster_coco_eval`` when the package is not installed.
    """
    evaluation = run_coco_evaluation(gt, results, img_ids=img_ids, backend=backend)
    if plot_dir is not None:
        write_coco_plots(evaluation, plot_dir)
    return evaluation.metrics


def write_coco_plots(evaluation: COCOEvaluation, plot_dir: str | os.PathLike) -> list[Path]:
    """``coco_pr_curves.png`` and ``coco_ap_per_class.png`` of ``evaluation`` in ``plot_dir`` when matplotlib is
    installed (:func:`~detectron_res.evaluation.pr_curves.write_evaluation_plots`: never raises)."""
    return write_evaluation_plots(
        evaluation.curves, plot_dir, prefix="coco", title="COCO bbox, area all, 100 detections per image"
    )


@dataclass(frozen=True)
class COCOEvaluation:
    """What :func:`run_coco_evaluation` found, for reports that need more than the metrics.

    Attributes:
        metrics: ``{"bbox": {...}}`` as :func:`evaluate_coco_results` returns them.
        curves: per ground-truth category, in id order, its precision-recall curves (:func:`coco_pr_curves`).
        coco_gt: the checked ground truth.
        detections: the checked detections (the caller's list, or the file's entries).
        img_ids: the images evaluated (every image of ``coco_gt`` when none were given).
        backend: the COCOeval implementation that ran (``auto`` resolved: ``pycocotools`` or ``faster_coco_eval``).
    """

    metrics: dict[str, dict[str, float | None]]
    curves: list[ClassCurves]
    coco_gt: COCO
    detections: list[dict]
    img_ids: list[int | str]
    backend: str


def run_coco_evaluation(
    gt: COCO | str | os.PathLike,
    results: list[dict] | str | os.PathLike,
    *,
    img_ids: Sequence[int | str] | None = None,
    backend: str = DEFAULT_COCO_BACKEND,
) -> COCOEvaluation:
    """:func:`evaluate_coco_results` without the plots, returning the curves and checked inputs with the metrics
    (same arguments, log lines and errors)."""
    backend = resolve_coco_backend(backend)
    gt_name = os.fspath(gt) if isinstance(gt, (str, os.PathLike)) else "the ground truth"
    coco_gt = load_coco_ground_truth(gt)
    if isinstance(results, (str, os.PathLike)):
        results_name = os.fspath(results)
        detections = load_coco_results(results_name)
    else:
        results_name = "results"
        validate_coco_results(results, source=results_name)
        detections = results
    _check_ids_in_ground_truth(coco_gt, detections, img_ids, gt_name=gt_name, results_name=results_name)

    if not detections:
        logger.warning("No detections to evaluate in %s; COCO box metrics are 0", results_name)
    if backend == "faster_coco_eval":
        coco_eval = _faster_cocoeval(coco_gt, detections, img_ids)
    else:
        coco_eval = _pycocotools_cocoeval(coco_gt, detections, img_ids)
    summary = io.StringIO()
    if backend == "faster_coco_eval":
        coco_eval.print_function = lambda line: summary.write(f"{line}\n")
    with contextlib.redirect_stdout(summary):
        coco_eval.summarize()
    logger.info("COCOeval (%s) bbox summary of %s:\n%s", backend, results_name, summary.getvalue().rstrip("\n"))

    if detections:
        metrics = {name: _percent(value) for name, value in zip(SUMMARY_METRICS, coco_eval.stats[:6])}
    else:
        metrics = {name: 0.0 for name in SUMMARY_METRICS}
    metrics.update(_per_category_ap(coco_gt, coco_eval))
    return COCOEvaluation(
        metrics={"bbox": metrics},
        curves=coco_pr_curves(coco_eval),
        coco_gt=coco_gt,
        detections=detections,
        img_ids=list(coco_gt.getImgIds()) if img_ids is None else list(img_ids),
        backend=backend,
    )


def check_coco_backend(backend: str) -> None:
    """Refuse an unknown backend, or ``faster_coco_eval`` when its package is not installed (one line each)."""
    if backend not in COCO_BACKEND_CHOICES:
        raise ValueError(
            f"COCO evaluation backend {backend!r} is unknown; choose one of {', '.join(COCO_BACKEND_CHOICES)}"
        )
    if backend == "faster_coco_eval" and importlib.util.find_spec("faster_coco_eval") is None:
        raise ValueError(f"COCO evaluation backend 'faster_coco_eval' needs the faster-coco-eval package: "
                         f"{FASTER_COCO_EVAL_INSTALL}")


def resolve_coco_backend(backend: str) -> str:
    """The implementation ``backend`` names, after :func:`check_coco_backend`: ``auto`` becomes ``faster_coco_eval``
    when the faster-coco-eval package imports (the same numbers to 1e-6, several times faster) and ``pycocotools``
    when it does not, so that the default works on every install; ``pycocotools`` and ``faster_coco_eval`` stay."""
    check_coco_backend(backend)
    if backend != "auto":
        return backend
    return "faster_coco_eval" if _faster_coco_eval_importable() else "pycocotools"


def _faster_coco_eval_importable() -> bool:
    """Whether ``import faster_coco_eval`` works: installed (``find_spec``) and its compiled part loads, so that a
    wheel built for another Python falls back to pycocotools instead of failing after inference."""
    if importlib.util.find_spec("faster_coco_eval") is None:
        return False
    try:
        import faster_coco_eval  # noqa: F401 - a fixed name: nothing read from data is imported
    except ImportError:
        return False
    return True


def _pycocotools_cocoeval(coco_gt: COCO, detections: list[dict], img_ids: Sequence[int | str] | None) -> COCOeval:
    """pycocotools' COCOeval of ``detections``, evaluated and accumulated."""
    if detections:
        with _quiet():
            coco_dt = coco_gt.loadRes([dict(entry) for entry in detections])  # loadRes writes into the dicts
    else:
        coco_dt = _empty_results(coco_gt)
    coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
    if img_ids is not None:
        coco_eval.params.imgIds = list(img_ids)
    with _quiet():
        coco_eval.evaluate()
        coco_eval.accumulate()
    return coco_eval


def _faster_cocoeval(coco_gt: COCO, detections: list[dict], img_ids: Sequence[int | str] | None):
    """faster-coco-eval's ``COCOeval_faster`` of ``detections``, evaluated and accumulated, on copies of the checked
    ground truth (its ``COCO`` wants its own class, and int image and annotation ids: str image ids, which
    pycocotools takes, are replaced by their rank in sorted order, the order in which pycocotools walks the images,
    so that ties between equal scores of different images break the same way; where an annotation id is a str, every
    annotation gets its position plus one, unique and in the file's order as pycocotools keeps them)."""
    from faster_coco_eval import COCO as FasterCOCO
    from faster_coco_eval import COCOeval_faster

    image_ids = [image["id"] for image in coco_gt.dataset["images"]]
    if all(isinstance(image_id, Integral) for image_id in image_ids):
        to_int = {image_id: image_id for image_id in image_ids}
    else:
        to_int = {image_id: rank for rank, image_id in enumerate(sorted(image_ids, key=str), start=1)}
    dataset = copy.deepcopy(coco_gt.dataset)
    for image in dataset["images"]:
        image["id"] = to_int[image["id"]]
    renumber = not all(isinstance(annotation["id"], Integral) for annotation in dataset["annotations"])
    for position, annotation in enumerate(dataset["annotations"]):
        annotation["image_id"] = to_int[annotation["image_id"]]
        if renumber:
            annotation["id"] = position + 1
    faster_gt = FasterCOCO()
    faster_gt.print_function = _discard
    faster_gt.dataset = dataset
    faster_gt.createIndex()
    if detections:
        faster_dt = faster_gt.loadRes([{**entry, "image_id": to_int[entry["image_id"]]} for entry in detections])
    else:
        faster_dt = FasterCOCO()
        faster_dt.print_function = _discard
        faster_dt.dataset = {"images": copy.deepcopy(dataset["images"]),
                             "categories": copy.deepcopy(dataset["categories"]), "annotations": []}
        faster_dt.createIndex()
    coco_eval = COCOeval_faster(faster_gt, faster_dt, iouType="bbox", print_function=_discard)
    if img_ids is not None:
        coco_eval.params.imgIds = [to_int[image_id] for image_id in img_ids]
    coco_eval.evaluate()
    coco_eval.accumulate()
    return coco_eval


def _discard(*_args: object) -> None:
    """faster-coco-eval's print function while it works (it logs each step at INFO otherwise)."""


class COCOEvaluator(DatasetEvaluator):
    """Collects detections as COCO results and evaluates them with COCOeval against the data set.

    The ground truth is :func:`dataset_ground_truth`'s: the data set's ``json_file`` when it has one, otherwise
    one built from its records. Only the images passed to :meth:`process` are evaluated, so evaluating a subset of
    the data set is fine.

    Args:
        dataset: the data set the inputs come from; ``category_ids`` maps the model's labels back to its ids.
        output_dir: when given, :meth:`evaluate` writes the detections there as ``coco_instances_results.json``.
        backend: the COCOeval backend (``TEST.COCO_BACKEND``; see :func:`evaluate_coco_results`); ``auto`` is
            resolved here (:func:`resolve_coco_backend`), so :attr:`backend` names the implementation that runs.
    """

    def __init__(
        self,
        *,
        dataset: DetectionDataset,
        output_dir: str | os.PathLike | None = None,
        backend: str = DEFAULT_COCO_BACKEND,
    ) -> None:
        self.backend = resolve_coco_backend(backend)
        self.dataset = dataset
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.coco_gt = dataset_ground_truth(dataset)
        self._results: list[dict] = []
        self._image_ids: dict[int | str, None] = {}  # processed ids, in order, without repeats

    def reset(self) -> None:
        self._results = []
        self._image_ids = {}

    def process(self, inputs: list[dict], outputs: list[dict[str, Tensor]]) -> None:
        if len(inputs) != len(outputs):
            raise ValueError(f"COCOEvaluator.process got {len(inputs)} inputs but {len(outputs)} outputs")
        for position, (inp, out) in enumerate(zip(inputs, outputs)):
            if "image_id" not in inp:
                raise KeyError(f"COCOEvaluator.process: input #{position} has no 'image_id' (keys: {sorted(inp)})")
            image_id = inp["image_id"]
            if isinstance(image_id, Integral) and not isinstance(image_id, bool):
                image_id = int(image_id)  # numpy / torch integers -> int, for the results json
            self._image_ids[image_id] = None
            self._results.extend(
                detections_to_coco_results(out, image_id=image_id, category_ids=self.dataset.category_ids)
            )

    def evaluate(self) -> dict[str, dict[str, float | None]]:
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.output_dir / RESULTS_FILE_NAME
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(self._results, handle)
            logger.info("Wrote %d COCO detections to %s", len(self._results), path)
        if not self._image_ids:
            logger.warning("COCOEvaluator: no images were processed for data set %r", self.dataset.name)
        metrics = evaluate_coco_results(
            self.coco_gt, self._results, img_ids=list(self._image_ids), plot_dir=self.output_dir, backend=self.backend
        )
        logger.info(
            "Per-category bbox AP on %s:\n%s",
            self.dataset.name, format_per_category_table(per_category_values(metrics["bbox"])),
        )
        return metrics


def detections_to_coco_results(
    detections: dict[str, Tensor], *, image_id: int | str, category_ids: Sequence[int]
) -> list[dict]:
    """One image's model output (``boxes`` XYXY original pixels, ``scores``, contiguous ``labels``) as COCO results.

    Boxes become ``[x, y, w, h]`` rounded to 3 decimals, scores are rounded to 5 decimals, labels are mapped to
    the data set's ids with ``category_ids[label]``.

    Raises:
        KeyError: a key is missing from ``detections``.
        ValueError: shapes that do not agree, or a label outside ``[0, len(category_ids))``.
    """
    for key in ("boxes", "scores", "labels"):
        if key not in detections:
            raise KeyError(f"detections of image {image_id!r} lack {key!r} (keys: {sorted(detections)})")
    boxes = torch.as_tensor(detections["boxes"]).detach().to("cpu", torch.float64)
    scores = torch.as_tensor(detections["scores"]).detach().to("cpu", torch.float64)
    labels = torch.as_tensor(detections["labels"]).detach().to("cpu", torch.int64)
    count = boxes.shape[0] if boxes.dim() == 2 else -1
    if boxes.dim() != 2 or boxes.shape[1] != 4 or scores.shape != (count,) or labels.shape != (count,):
        raise ValueError(
            f"detections of image {image_id!r}: expected boxes (N, 4), scores (N,), labels (N,); got "
            f"{tuple(boxes.shape)}, {tuple(scores.shape)}, {tuple(labels.shape)}"
        )
    if count and (labels.min() < 0 or labels.max() >= len(category_ids)):
        bad = labels[(labels < 0) | (labels >= len(category_ids))][0].item()
        raise ValueError(
            f"detections of image {image_id!r} have label {bad}; expected a contiguous class index in "
            f"[0, {len(category_ids)})"
        )
    xywh = np.round(box_convert(boxes, "xyxy", "xywh").numpy(), _BOX_DECIMALS).tolist()
    rounded_scores = np.round(scores.numpy(), _SCORE_DECIMALS).tolist()
    return [
        {"image_id": image_id, "category_id": int(category_ids[label]), "bbox": box, "score": score}
        for box, score, label in zip(xywh, rounded_scores, labels.tolist())
    ]


def coco_pr_curves(coco_eval: COCOeval) -> list[ClassCurves]:  # or faster-coco-eval's COCOeval_faster
    """Per-class precision-recall curves of an accumulated ``COCOeval`` (area "all", the last ``maxDets``, 100 by
    default), in the order of ``params.catIds``: COCOeval's interpolated precision at its recall thresholds
    (``params.recThrs``, 0 to 1 by 0.01) at IoU 0.5 (``"IoU 0.50"``) and averaged over all IoU thresholds
    (``"IoU 0.50:0.95"``, whose mean over the recall thresholds is the class's COCO AP). APs in percent: ``"AP50"``
    and ``"AP"`` (the ``AP-<class>`` of the metrics). A class without ground truth in the evaluated images has no
    curves and ``None`` APs.
    """
    params = coco_eval.params
    precision = coco_eval.eval["precision"]  # (IoU thresholds, recall thresholds, classes, areas, max dets)
    recall = np.asarray(params.recThrs, dtype=np.float64)
    iou_50 = int(np.argmin(np.abs(np.asarray(params.iouThrs) - 0.5)))
    area_all = list(params.areaRngLbl).index("all") if "all" in params.areaRngLbl else 0
    names = [category["name"] for category in coco_eval.cocoGt.loadCats(params.catIds)]
    classes = []
    for index, name in enumerate(names):
        class_precision = np.asarray(precision[:, :, index, area_all, -1], dtype=np.float64)  # (IoUs, recalls)
        if (class_precision < 0).any():  # -1: no ground truth of the class
            classes.append(ClassCurves(name=name, curves={}, ap={"AP50": None, "AP": None}))
            continue
        at_50, mean = class_precision[iou_50], class_precision.mean(axis=0)
        classes.append(ClassCurves(
            name=name,
            curves={"IoU 0.50": (recall.copy(), at_50), "IoU 0.50:0.95": (recall.copy(), mean)},
            ap={"AP50": float(at_50.mean() * 100), "AP": float(class_precision.mean() * 100)},
        ))
    return classes


def _per_category_ap(coco_gt: COCO, coco_eval: COCOeval) -> dict[str, float | None]:
    """``AP-<class name>`` in percent from the accumulated precision (all areas, 100 detections)."""
    precision = coco_eval.eval["precision"]  # (IoU thresholds, recall thresholds, classes, areas, max dets)
    names = [category["name"] for category in coco_gt.loadCats(coco_eval.params.catIds)]
    values: dict[str, float | None] = {}
    for index, name in enumerate(names):
        class_precision = precision[:, :, index, 0, -1]
        class_precision = class_precision[class_precision > -1]
        values[f"AP-{name}"] = float(class_precision.mean() * 100) if class_precision.size else None
    return values


def _percent(value: float) -> float | None:
    return float(value * 100) if value >= 0 else None


def _empty_results(coco_gt: COCO) -> COCO:
    """A results ``COCO`` without detections (``COCO.loadRes`` cannot take an empty list)."""
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    with _quiet():
        coco_dt.createIndex()
    return coco_dt


def _check_ids_in_ground_truth(
    coco_gt: COCO,
    detections: list[dict],
    img_ids: Sequence[int | str] | None,
    *,
    gt_name: str,
    results_name: str,
) -> None:
    known_images = set(coco_gt.getImgIds())
    known_categories = set(coco_gt.getCatIds())
    if img_ids is not None:
        for image_id in img_ids:
            if image_id not in known_images:
                raise ValueError(f"image id {image_id!r} to evaluate is not an image of {gt_name}")
    for index, entry in enumerate(detections):
        if entry["image_id"] not in known_images:
            raise ValueError(
                f"{results_name}: entry #{index} has image_id {entry['image_id']!r}, which is not an image of {gt_name}"
            )
        if entry["category_id"] not in known_categories:
            raise ValueError(
                f"{results_name}: entry #{index} has category_id {entry['category_id']!r}, which is not a category "
                f"of {gt_name} (known ids: {sorted(known_categories)})"
            )


def _read_json(path: str, *, what: str) -> object:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: {what} file is not valid JSON ({error})") from error


def _is_number(value: object, *, finite: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, Real):
        return False
    try:
        return math.isfinite(value) if finite else True
    except OverflowError:  # an int too large for a float (10**400 in a JSON file) is no finite number to COCOeval
        return False


def _is_number_list(value: object, *, length: int, finite: bool = False) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == length
        and all(_is_number(item, finite=finite) for item in value)
    )
