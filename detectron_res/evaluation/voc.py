"""PASCAL VOC detection metric (per-class AP at IoU 0.5, VOC07 11-point and area versions), devkit semantics.

The matching follows the official VOCdevkit (``VOCevaldet.m``) and py-faster-rcnn's ``voc_eval.py`` (which
detectron2 and mmdetection copy):

* boxes are 1-based inclusive pixel indices: widths, heights and intersections carry ``+1``;
* detections are ranked by descending score with a STABLE sort, so equal scores keep their input (file)
  order, as MATLAB's ``sort`` does in the devkit (py-faster-rcnn's ``np.argsort(-confidence)`` is a
  quicksort, whose order of ties is unspecified);
* a detection is assigned to the ground-truth box of largest IoU in its image (the first one on ties) and
  counts only if that IoU is strictly ``> iou_thresh`` (py-faster-rcnn, detectron2; the MATLAB devkit
  tests ``>=``, which differs only at an IoU of exactly 0.5);
* if that box is ``difficult`` the detection is neither a true nor a false positive; every other box is
  matched at most once, later detections of it are false positives; ``npos`` counts non-difficult boxes;
* precision is ``tp / max(tp + fp, eps)`` (py-faster-rcnn; where the devkit would divide 0 by 0 it gets 0).

AP definitions (:func:`voc_ap`): the VOC2007 11-point AP averages, for ``t = k/10`` (k = 0..10), the highest
precision at recall ``>= t``; the thresholds are the correctly rounded doubles of ``k/10``, so a recall that
is exactly ``k/10`` (say 3 of 5) reaches ``t``. py-faster-rcnn's ``np.arange(0, 1.1, 0.1)`` yields
0.30000000000000004, 0.6000000000000001 and 0.7000000000000001 (MATLAB's ``0:0.1:1``, built from both ends,
the first of them only), so those implementations drop such a point; otherwise the numbers agree up to float
rounding (the 11 precisions are summed exactly, then divided by 11, so a perfect detector scores exactly 1.0).
The VOC2010+ "area" AP is the area under the monotone (right-to-left maximum) precision envelope, as
``VOCap.m``.

A class with no non-difficult ground truth has an undefined recall: its AP is NaN (both metrics) and it is
left out of the mAPs, which the table states. A class with ground truth but no detections has AP 0.

Results are fractions in [0, 1]: ``{"voc": {"mAP_07", "mAP_area", "per_class": {name: {"AP_07", "AP_area"}}}}``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from detectron_res.data.datasets.base import DetectionDataset
from detectron_res.data.datasets.voc import VOC_CLASSES, load_voc

from .pr_curves import ClassCurves, write_evaluation_plots

__all__ = [
    "voc_ap",
    "eval_class",
    "VOCDetectionEvaluator",
    "evaluate_voc_devkit_results",
    "format_voc_table",
    "devkit_result_file_name",
    "voc_pr_curves",
]

logger = logging.getLogger(__name__)

# Recall thresholds of the 11-point metric: correctly rounded k/10 (see the module docstring).
_ELEVEN_RECALL_THRESHOLDS = np.arange(11, dtype=np.float64) / 10.0


def devkit_result_file_name(class_name: str) -> str:
    """Name of the devkit result file of one class (``comp4``: trained on any data; ``test``: the test set)."""
    return f"comp4_det_test_{class_name}.txt"


def voc_ap(
    recall: Sequence[float] | np.ndarray, precision: Sequence[float] | np.ndarray, *, use_07_metric: bool
) -> float:
    """Average precision from a ranked list's recall and precision (one value per detection, in rank order).

    ``use_07_metric``: the VOC2007 11-point AP; otherwise the area under the precision envelope.
    Empty input gives 0.0.

    Raises:
        ValueError: the arrays differ in length or hold a non-finite value.
    """
    recall = np.asarray(recall, dtype=np.float64).reshape(-1)
    precision = np.asarray(precision, dtype=np.float64).reshape(-1)
    if recall.shape != precision.shape:
        raise ValueError(f"recall has {recall.size} values, precision {precision.size}")
    if not (np.isfinite(recall).all() and np.isfinite(precision).all()):
        raise ValueError("recall and precision must be finite")
    if use_07_metric:
        best = []
        for threshold in _ELEVEN_RECALL_THRESHOLDS:
            reached = recall >= threshold
            best.append(float(precision[reached].max()) if reached.any() else 0.0)
        return math.fsum(best) / 11.0  # a perfect list gives exactly 1.0 (a running sum of p/11 gives 1 + 2e-16)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope: max over this and all later ranks
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


@dataclass
class _ClassDetections:
    """All detections of one class: image ids, scores (D,) and devkit boxes (D, 4), in input order."""

    image_ids: list
    scores: np.ndarray
    boxes: np.ndarray

    @staticmethod
    def empty() -> _ClassDetections:
        return _ClassDetections([], np.zeros(0), np.zeros((0, 4)))

    @staticmethod
    def from_tuples(detections: Iterable[Sequence]) -> _ClassDetections:
        detections = list(detections)
        for index, det in enumerate(detections):
            if len(det) != 6:
                raise ValueError(
                    f"detection #{index} has {len(det)} fields, expected (image_id, score, x1, y1, x2, y2)"
                )
        values = np.asarray([det[1:] for det in detections], dtype=np.float64).reshape(-1, 5)
        return _ClassDetections([det[0] for det in detections], values[:, 0].copy(), values[:, 1:].copy())


def _ground_truth_arrays(ground_truth: Mapping) -> dict:
    """image id -> (boxes (M, 4) float64, difficult (M,) bool), validated."""
    arrays = {}
    for image_id, gt in ground_truth.items():
        boxes = np.asarray(gt["boxes"], dtype=np.float64).reshape(-1, 4)
        difficult = np.asarray(gt["difficult"], dtype=bool).reshape(-1)
        if len(difficult) != len(boxes):
            raise ValueError(f"ground truth of image {image_id!r}: {len(boxes)} boxes but {len(difficult)} flags")
        arrays[image_id] = (boxes, difficult)
    return arrays


def _match(detections: _ClassDetections, ground_truth: Mapping, iou_thresh: float):
    """Rank detections and mark each as true / false positive; returns ``(tp, fp, npos)`` in rank order."""
    gt = _ground_truth_arrays(ground_truth)
    npos = int(sum(int((~difficult).sum()) for _, difficult in gt.values()))
    matched = {image_id: np.zeros(len(boxes), dtype=bool) for image_id, (boxes, _) in gt.items()}
    order = np.argsort(-detections.scores, kind="stable")
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for rank, index in enumerate(order):
        image_id = detections.image_ids[index]
        if image_id not in gt or len(gt[image_id][0]) == 0:
            fp[rank] = 1.0
            continue
        gt_boxes, difficult = gt[image_id]
        box = detections.boxes[index]
        iw = np.maximum(np.minimum(gt_boxes[:, 2], box[2]) - np.maximum(gt_boxes[:, 0], box[0]) + 1.0, 0.0)
        ih = np.maximum(np.minimum(gt_boxes[:, 3], box[3]) - np.maximum(gt_boxes[:, 1], box[1]) + 1.0, 0.0)
        intersection = iw * ih
        union = (
            (box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
            + (gt_boxes[:, 2] - gt_boxes[:, 0] + 1.0) * (gt_boxes[:, 3] - gt_boxes[:, 1] + 1.0)
            - intersection
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            overlaps = intersection / union
        best = int(np.argmax(overlaps))
        if overlaps[best] > iou_thresh:
            if difficult[best]:
                continue  # neither true nor false positive
            if not matched[image_id][best]:
                tp[rank] = 1.0
                matched[image_id][best] = True
            else:
                fp[rank] = 1.0  # a second detection of the same object
        else:
            fp[rank] = 1.0
    return tp, fp, npos


def _recall_precision(tp: np.ndarray, fp: np.ndarray, npos: int) -> tuple[np.ndarray, np.ndarray]:
    tp = np.cumsum(tp)
    fp = np.cumsum(fp)
    recall = tp / npos if npos > 0 else np.full(len(tp), np.nan)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return recall, precision


def eval_class(
    detections: Iterable[Sequence],
    ground_truth: Mapping,
    *,
    iou_thresh: float = 0.5,
    use_07_metric: bool,
) -> dict:
    """AP of one class.

    Args:
        detections: ``(image_id, score, x1, y1, x2, y2)`` tuples, boxes in devkit 1-based inclusive pixels.
        ground_truth: image id -> ``{"boxes": (M, 4) 1-based boxes as in the XML, "difficult": (M,) flags}``;
            an image absent from it has no object of this class.
        iou_thresh: a detection matches when its IoU is strictly greater.
        use_07_metric: the 11-point AP instead of the area AP.

    Returns:
        ``{"ap": float, "recall": (D,) array, "precision": (D,) array, "npos": int}`` in rank order;
        ``ap`` is NaN and ``recall`` all NaN when ``npos == 0``; ``ap`` is 0.0 with no detections.
    """
    tp, fp, npos = _match(_ClassDetections.from_tuples(detections), ground_truth, iou_thresh)
    recall, precision = _recall_precision(tp, fp, npos)
    ap = voc_ap(recall, precision, use_07_metric=use_07_metric) if npos > 0 else math.nan
    return {"ap": ap, "recall": recall, "precision": precision, "npos": npos}


def _mean_ignoring_nan(values: list[float]) -> float:
    defined = [value for value in values if not math.isnan(value)]
    return sum(defined) / len(defined) if defined else math.nan


def voc_pr_curves(ranked: Mapping[str, tuple[np.ndarray, np.ndarray] | None]) -> list[ClassCurves]:
    """Per-class precision-recall curves from each class's ranked ``(recall, precision)`` (one value per detection
    in rank order, as :func:`eval_class` returns them; None for a class without non-difficult ground truth): the
    curve ``"precision"`` itself and ``"envelope"``, the precision made monotone from the right (the highest
    precision at this or any later rank), whose area is the area AP. APs in percent: ``"AP"`` (area) and
    ``"AP07"`` (11-point); None when undefined. A class with ground truth but no detection has empty curves and AP 0.
    """
    classes = []
    for name, curve in ranked.items():
        if curve is None:
            classes.append(ClassCurves(name=name, curves={}, ap={"AP": None, "AP07": None}))
            continue
        recall = np.asarray(curve[0], dtype=np.float64).reshape(-1)
        precision = np.asarray(curve[1], dtype=np.float64).reshape(-1)
        envelope = np.maximum.accumulate(precision[::-1])[::-1] if precision.size else precision.copy()
        classes.append(ClassCurves(
            name=name,
            curves={"precision": (recall, precision), "envelope": (recall.copy(), envelope)},
            ap={
                "AP": 100.0 * voc_ap(recall, precision, use_07_metric=False),
                "AP07": 100.0 * voc_ap(recall, precision, use_07_metric=True),
            },
        ))
    return classes


def _evaluate_classes(
    detections: Sequence[_ClassDetections],
    ground_truth: Sequence[Mapping],
    class_names: Sequence[str],
    iou_thresh: float = 0.5,
    *,
    plot_dir: str | Path | None = None,
) -> dict:
    """The one code path for the evaluator and devkit files: per-class APs, mAPs, logged table; with `plot_dir`,
    the per-class precision-recall curves and AP bars drawn there (when matplotlib is installed)."""
    per_class = {}
    ranked = {}
    for class_name, class_detections, class_ground_truth in zip(class_names, detections, ground_truth, strict=True):
        tp, fp, npos = _match(class_detections, class_ground_truth, iou_thresh)
        recall, precision = _recall_precision(tp, fp, npos)
        ranked[class_name] = (recall, precision) if npos > 0 else None
        if npos > 0:
            per_class[class_name] = {
                "AP_07": voc_ap(recall, precision, use_07_metric=True),
                "AP_area": voc_ap(recall, precision, use_07_metric=False),
            }
        else:
            per_class[class_name] = {"AP_07": math.nan, "AP_area": math.nan}
    result = {
        "voc": {
            "mAP_07": _mean_ignoring_nan([ap["AP_07"] for ap in per_class.values()]),
            "mAP_area": _mean_ignoring_nan([ap["AP_area"] for ap in per_class.values()]),
            "per_class": per_class,
        }
    }
    logger.info("PASCAL VOC detection results (IoU > %g):\n%s", iou_thresh, format_voc_table(result))
    if plot_dir is not None:
        write_evaluation_plots(voc_pr_curves(ranked), plot_dir, prefix="voc", title=f"PASCAL VOC (IoU > {iou_thresh:g})")
    return result


def format_voc_table(result: Mapping) -> str:
    """Per-class AP (percent) for both metrics and the mAPs, as text; accepts the evaluator's result."""
    voc = result["voc"] if "voc" in result else result
    per_class = voc["per_class"]
    width = max([len("class"), *(len(name) for name in per_class)])

    def cell(value: float) -> str:
        return f"{'n/a':>12}" if math.isnan(value) else f"{100.0 * value:12.2f}"

    lines = [f"{'class':<{width}} {'AP07 (%)':>12} {'AP area (%)':>12}"]
    lines += [f"{name:<{width}} {cell(ap['AP_07'])} {cell(ap['AP_area'])}" for name, ap in per_class.items()]
    excluded = [name for name, ap in per_class.items() if math.isnan(ap["AP_area"])]
    lines.append(f"{'mAP':<{width}} {cell(voc['mAP_07'])} {cell(voc['mAP_area'])}")
    lines.append(f"mAP over {len(per_class) - len(excluded)} of {len(per_class)} classes")
    if excluded:
        lines.append(f"n/a: no non-difficult ground truth, left out of the mAP: {', '.join(excluded)}")
    return "\n".join(lines)


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.double().numpy() if value.is_floating_point() else value.numpy()
    return np.asarray(value)


def devkit_ground_truth(records: Sequence[Mapping], num_classes: int) -> list[dict]:
    """Per class, image id -> ``{"boxes": devkit 1-based boxes, "difficult": flags}`` from data set records (whose
    0-based boxes went through the loaders' ground-truth rule): ``xmin = x1 + 1, ymin = y1 + 1, xmax = x2, ymax = y2``."""
    ground_truth: list[dict] = [{} for _ in range(num_classes)]
    for record in records:
        per_class: dict[int, tuple[list, list]] = {}
        for ann in record["annotations"]:
            x1, y1, x2, y2 = ann["bbox"]
            boxes, difficult = per_class.setdefault(ann["category_id"], ([], []))
            boxes.append([x1 + 1.0, y1 + 1.0, x2, y2])
            difficult.append(bool(ann.get("difficult", 0)))
        for class_index, (boxes, difficult) in per_class.items():
            ground_truth[class_index][record["image_id"]] = {"boxes": boxes, "difficult": difficult}
    return ground_truth


class VOCDetectionEvaluator:
    """detectron2-style evaluator (``reset`` / ``process`` / ``evaluate``) computing the devkit metric.

    Ground truth is taken from ``dataset``'s records (0-based continuous boxes, converted back exactly to the
    devkit's 1-based ``xmin = x1 + 1, ymin = y1 + 1, xmax = x2, ymax = y2``; ``difficult`` flags from the
    annotations, missing = 0). Every record is evaluated: an image never passed to :meth:`process` has no
    detections (a warning says how many). Predicted boxes go through the same conversion; with
    ``output_dir`` one devkit result file per class is written (:func:`devkit_result_file_name`, lines
    ``image_id score xmin ymin xmax ymax`` with round-trip exact numbers, so
    :func:`evaluate_voc_devkit_results` on them gives the same APs). With ``plot_dir`` (default: ``output_dir``)
    the per-class precision-recall curves and AP bars are drawn there as ``voc_pr_curves.png`` and
    ``voc_ap_per_class.png`` when matplotlib is installed (:func:`voc_pr_curves`).
    """

    def __init__(
        self,
        *,
        dataset: DetectionDataset,
        output_dir: str | Path | None = None,
        plot_dir: str | Path | None = None,
    ) -> None:
        self.dataset = dataset
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.plot_dir = Path(plot_dir) if plot_dir is not None else self.output_dir
        self._image_ids = {record["image_id"] for record in dataset.records}
        self.reset()

    def reset(self) -> None:
        """Forget all processed predictions."""
        self._predictions: list[tuple] = []  # (image_id, scores (N,), devkit boxes (N, 4), labels (N,))
        self._seen: set = set()

    def process(self, inputs: Sequence[Mapping], outputs: Sequence[Mapping]) -> None:
        """Record one batch: ``inputs[i]["image_id"]`` and ``outputs[i]`` with ``"boxes"`` (N, 4) XYXY in the
        original image's 0-based continuous pixels, ``"scores"`` (N,) and contiguous ``"labels"`` (N,)."""
        if len(inputs) != len(outputs):
            raise ValueError(f"process() got {len(inputs)} inputs but {len(outputs)} outputs")
        num_classes = self.dataset.num_classes
        for inp, out in zip(inputs, outputs, strict=True):
            image_id = inp["image_id"]
            if image_id not in self._image_ids:
                raise ValueError(f"image_id {image_id!r} is not in data set {self.dataset.name!r}")
            if image_id in self._seen:
                raise ValueError(f"image_id {image_id!r} was processed twice")
            for key in ("boxes", "scores", "labels"):
                if key not in out:
                    raise ValueError(f"output for image {image_id!r} has no {key!r} (keys: {sorted(out)})")
            boxes = _as_numpy(out["boxes"]).astype(np.float64)
            scores = _as_numpy(out["scores"]).astype(np.float64).reshape(-1)
            labels = _as_numpy(out["labels"]).reshape(-1)
            if boxes.ndim != 2 or boxes.shape[1] != 4 or not (len(boxes) == len(scores) == len(labels)):
                raise ValueError(
                    f"output for image {image_id!r}: boxes {tuple(boxes.shape)}, scores {tuple(scores.shape)}, "
                    f"labels {tuple(labels.shape)}; expected (N, 4), (N,), (N,)"
                )
            if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(
                    f"output for image {image_id!r}: labels must be in [0, {num_classes}), got {labels.tolist()}"
                )
            devkit_boxes = boxes + np.array([1.0, 1.0, 0.0, 0.0])
            self._seen.add(image_id)
            self._predictions.append((image_id, scores, devkit_boxes, labels.astype(np.int64)))

    def _ground_truth(self) -> list[dict]:
        return devkit_ground_truth(self.dataset.records, self.dataset.num_classes)

    def _detections(self) -> list[_ClassDetections]:
        detections = []
        for class_index in range(self.dataset.num_classes):
            image_ids, scores, boxes = [], [], []
            for image_id, image_scores, image_boxes, labels in self._predictions:
                keep = labels == class_index
                image_ids += [image_id] * int(keep.sum())
                scores.append(image_scores[keep])
                boxes.append(image_boxes[keep])
            if image_ids:
                detections.append(_ClassDetections(image_ids, np.concatenate(scores), np.concatenate(boxes)))
            else:
                detections.append(_ClassDetections.empty())
        return detections

    def _write_result_files(self, detections: Sequence[_ClassDetections]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for class_name, class_detections in zip(self.dataset.class_names, detections, strict=True):
            lines = []
            for image_id, score, box in zip(
                class_detections.image_ids,
                class_detections.scores.tolist(),
                class_detections.boxes.tolist(),
                strict=True,
            ):
                image_id = str(image_id)
                if not image_id or any(char.isspace() for char in image_id):
                    raise ValueError(f"image_id {image_id!r} cannot be written to a devkit result file")
                lines.append(" ".join([image_id, *(repr(value) for value in (score, *box))]) + "\n")
            (self.output_dir / devkit_result_file_name(class_name)).write_text("".join(lines))
        logger.info("wrote devkit result files for %d classes to %s", len(detections), self.output_dir)

    def evaluate(self) -> dict:
        """Per-class AP (both metrics) and mAPs over the whole data set; see the module docstring."""
        missing = len(self._image_ids) - len(self._seen)
        if missing:
            logger.warning(
                "%d of %d images of %s were not processed; their objects count as missed",
                missing, len(self._image_ids), self.dataset.name,
            )  # fmt: skip
        detections = self._detections()
        if self.output_dir is not None:
            self._write_result_files(detections)
        return _evaluate_classes(detections, self._ground_truth(), self.dataset.class_names, plot_dir=self.plot_dir)


def _read_result_file(
    path: Path, split_ids: set[str], *, as_devkit: bool = False
) -> tuple[_ClassDetections, list[str]]:
    """The detections of one devkit result file, and where its lines look 0-based (``"<file>, line <n>: '<line>'"``,
    collected with ``as_devkit`` only: otherwise such a line is an error). With ``as_devkit`` every numeric box is
    kept as written, as the devkit and py-faster-rcnn's ``voc_eval`` read them (floats, no check on the box)."""
    image_ids, values = [], []
    unknown: list[str] = []
    zero_based: list[str] = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 6:
            raise ValueError(f"{path}, line {line_number}: expected 'image_id score xmin ymin xmax ymax', got {line!r}")
        try:
            numbers = [float(field) for field in fields[1:]]
        except ValueError:
            raise ValueError(f"{path}, line {line_number}: not a number in {line!r}") from None
        _, xmin, ymin, xmax, ymax = numbers
        if as_devkit:
            if xmin < 1 or ymin < 1:
                zero_based.append(f"{path}, line {line_number}: {line!r}")
        elif not all(math.isfinite(number) for number in numbers):
            raise ValueError(f"{path}, line {line_number}: non-finite number in {line!r}")
        elif xmax < xmin or ymax < ymin:
            raise ValueError(f"{path}, line {line_number}: xmax < xmin or ymax < ymin in {line!r}")
        elif xmin < 1 or ymin < 1:
            raise ValueError(
                f"{path}, line {line_number}: xmin or ymin below 1 in {line!r}; devkit boxes are 1-based pixel indices "
                "(the first pixel is 1), so these look like 0-based boxes: write x1 + 1, y1 + 1, x2, y2 (or score the "
                "file as the devkit does, unshifted: tools/eval_det.py --as-devkit)"
            )
        if fields[0] not in split_ids and fields[0] not in unknown:
            unknown.append(fields[0])
        image_ids.append(fields[0])
        values.append(numbers)
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise ValueError(f"{path}: {len(unknown)} image ids are not in the split: {shown}")
    if not values:
        return _ClassDetections.empty(), zero_based
    array = np.asarray(values, dtype=np.float64)
    return _ClassDetections(image_ids, array[:, 0].copy(), array[:, 1:].copy()), zero_based


def evaluate_voc_devkit_results(
    *,
    voc_root: str | Path,
    split: str,
    dets_dir: str | Path,
    class_names: Sequence[str] = VOC_CLASSES,
    plot_dir: str | Path | None = None,
    as_devkit: bool = False,
) -> dict:
    """Evaluate devkit result files ``dets_dir/comp4_det_test_<class>.txt`` against ``voc_root/Annotations``.

    Both sides are in the devkit's 1-based pixels (no shift). The images are those of
    ``voc_root/ImageSets/Main/{split}.txt``; the ground truth is read by :func:`load_voc`, so it goes through the
    rule training applies (boxes clipped to the image, degenerate ones dropped, both counted in its log line);
    for valid VOC annotations that changes nothing. A missing class file means no detections for that class
    (warning). Same result as the evaluator. With ``plot_dir``, the per-class precision-recall curves and AP bars
    are drawn there as the evaluator does.

    ``as_devkit`` scores every numeric box as the official devkit and py-faster-rcnn's ``voc_eval`` do: read as
    floats and used unshifted with the +1 pixel convention, with none of the checks below on the box (a 0-based box,
    xmin = 0, then overlaps its object a little less than the 1-based one would); a warning gives how many lines
    looked 0-based (xmin or ymin below 1) and the first of them.

    Raises:
        FileNotFoundError: ``dets_dir``, the split file or an annotation file is missing.
        ValueError: a malformed result line (file and line named: not 6 fields or not numbers; without
            ``as_devkit`` also a non-finite number, xmax < xmin or ymax < ymin, or xmin or ymin below 1, i.e.
            0-based boxes), an image id not in the split, an object whose class is not in ``class_names``, or
            malformed XML.
    """
    voc_root, dets_dir = Path(voc_root), Path(dets_dir)
    if not dets_dir.is_dir():
        raise FileNotFoundError(f"devkit result folder not found: {dets_dir}")
    class_names = list(class_names)
    dataset = load_voc(voc_root, split, name=f"{voc_root.name} {split}", class_names=class_names, check_files=False)
    ground_truth = devkit_ground_truth(dataset.records, len(class_names))
    split_id_set = {record["image_id"] for record in dataset.records}
    detections = []
    zero_based: list[str] = []
    for class_name in class_names:
        path = dets_dir / devkit_result_file_name(class_name)
        if path.is_file():
            class_detections, class_zero_based = _read_result_file(path, split_id_set, as_devkit=as_devkit)
            detections.append(class_detections)
            zero_based += class_zero_based
        else:
            logger.warning("no result file %s: class %r has no detections", path, class_name)
            detections.append(_ClassDetections.empty())
    if zero_based:
        logger.warning(
            "%d line%s looked 0-based (xmin or ymin below 1), scored unshifted as the devkit scores them; "
            "the first: %s",
            len(zero_based), "" if len(zero_based) == 1 else "s", zero_based[0],
        )
    elif as_devkit:
        logger.info("No line looked 0-based (xmin or ymin below 1)")
    return _evaluate_classes(detections, ground_truth, class_names, plot_dir=plot_dir)
