"""TIDE's error breakdown of COCO-style box detections: which kind of mistake costs how much AP.

Definitions from Bolya et al., "TIDE: A General Toolbox for Identifying Object Detection Errors", ECCV 2020
(https://arxiv.org/abs/2008.08115), whose reference implementation is tidecv (github.com/dbolya/tide,
``tidecv/quantify.py`` and ``tidecv/errors/main_errors.py``). tidecv is unmaintained and breaks on current numpy,
so the computation is written here against those definitions, reading a pycocotools ``COCO`` ground truth.

Matching is COCOeval's at IoU ``iou_fg`` (0.5): per image and class, the top ``max_dets`` detections by score,
each taking the best still unmatched ground truth of its class, crowd regions (and boxes outside COCO's "all"
area range) ignored as COCOeval ignores them. So the AP without fixes is pycocotools' AP50 to the last bit.
Every counted false positive then gets the first of these types that applies (``iou_bg`` = 0.1):

- ``loc``: its largest IoU with a ground truth of its own class is in ``[iou_bg, iou_fg)``;
- ``cls``: IoU >= ``iou_fg`` with a ground truth of another class;
- ``dupe``: IoU >= ``iou_fg`` with a ground truth of its class that a higher-scoring detection already matched;
- ``bkg``: IoU < ``iou_bg`` with every ground truth of the image;
- ``both``: the rest (IoU in ``[iou_bg, iou_fg)`` with a ground truth of another class only).

A ground truth that no detection matched and that no ``cls`` or ``loc`` error points at is ``miss``.

Each type's dAP is TIDE's oracle: fix that type alone, recompute the AP, and subtract the AP without fixes. A
``cls`` or ``loc`` error becomes a true positive (of the ground truth's class) if its ground truth is unmatched and
it is the highest-scoring ``cls``/``loc`` error pointing at it; otherwise it is removed, as are the fixed ``dupe``,
``bkg`` and ``both`` errors; fixing ``miss`` removes the missed ground truth from its class's count.

Where this differs from tidecv, it is to stay equal to COCOeval: the 100-detection cap is per image and class (tidecv:
per image); detections COCOeval ignores (inside a crowd region, over the cap) are neither scored nor typed (tidecv
types those in crowds and may count them when fixed); the classes averaged are those with ground truth (tidecv also
averages classes with detections only, at AP 0); interval ends follow the paper (``loc`` is IoU < ``iou_fg``,
tidecv's code has <=, so a detection at exactly ``iou_fg`` of a matched box is ``dupe`` here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools.coco import COCO

from .coco import _check_ids_in_ground_truth, validate_coco_results

ERROR_TYPES: tuple[str, ...] = ("cls", "loc", "both", "dupe", "bkg", "miss")  # tidecv's order
IOU_FG, IOU_BG, MAX_DETS = 0.5, 0.1, 100  # TIDE's foreground and background IoU, COCOeval's detections per class
_AREA_ALL = (0.0, 1e5**2)  # COCOeval's area range "all"
_RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)  # as COCOeval
_TP, _IGNORED = "tp", "ignored"


@dataclass(frozen=True)
class ErrorAssignment:
    """What each detection and ground truth box was found to be, for reports that mark them on images.

    Attributes:
        detection_types: one per input detection, in their order: ``"tp"``, one of ``cls loc both dupe bkg``, or
            ``"ignored"`` (COCOeval does not count it: inside a crowd region, over the per-class cap, or on an
            image that is not evaluated).
        gt_types: annotation id -> ``"tp"`` (matched), ``"miss"``, ``"fn"`` (unmatched but pointed at by a ``cls``
            or ``loc`` error) or ``"ignored"`` (crowd), for the evaluated images.
    """

    detection_types: list[str]
    gt_types: dict[int, str]


def tide_errors(
    coco_gt: COCO,
    detections: list[dict],
    *,
    iou_fg: float = IOU_FG,
    iou_bg: float = IOU_BG,
    max_dets: int = MAX_DETS,
    img_ids: Sequence[int | str] | None = None,
) -> dict:
    """TIDE's error breakdown of COCO results ``detections`` against ``coco_gt`` (see the module docstring).

    Args:
        coco_gt: the ground truth (for example from :func:`~detectron_res.evaluation.load_coco_ground_truth`).
        detections: COCO box results ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` (not modified).
        iou_fg: IoU at which a detection is a true positive (TIDE's and AP50's 0.5).
        iou_bg: IoU below which a false positive is background (TIDE's 0.1).
        max_dets: detections kept per image and class, by score (COCOeval's 100).
        img_ids: evaluate only these images (default all images of ``coco_gt``), as ``evaluate_coco_results``.

    Returns:
        ``{"AP": AP at iou_fg, "dAP": {"cls", "loc", "both", "dupe", "bkg", "miss": AP gained by fixing that type
        alone}, "counts": {the six types, "tp", "gt", "detections"}}``, AP and dAP in points (0-100); AP and dAP
        are ``None`` when no evaluated image has a (non-crowd) ground truth box. ``counts["detections"]`` is the
        number of detections COCOeval counts (not ignored).

    Raises:
        ValueError: bad thresholds, malformed detections, or ids that are not in the ground truth (one line naming
            the first bad entry).
    """
    analysis = _analyse(coco_gt, detections, iou_fg=iou_fg, iou_bg=iou_bg, max_dets=max_dets, img_ids=img_ids)
    return analysis.summary()


def tide_assignment(coco_gt: COCO, detections: list[dict], **options) -> ErrorAssignment:
    """The type :func:`tide_errors` gave each detection and ground truth box (same arguments and errors)."""
    return _analyse(coco_gt, detections, **options).assignment()


def tide_breakdown(coco_gt: COCO, detections: list[dict], **options) -> tuple[dict, ErrorAssignment]:
    """:func:`tide_errors` and :func:`tide_assignment` from one analysis (same arguments and errors), for a report
    that needs both: the matching runs once."""
    analysis = _analyse(coco_gt, detections, **options)
    return analysis.summary(), analysis.assignment()


def _box_iou(dets: np.ndarray, gts: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """(D, G) IoU of XYWH boxes with pycocotools' formula and operation order (``maskApi.c`` ``bbIou``), so that
    values at the threshold compare as in COCOeval; against a crowd box the union is the detection's area."""
    dx, dy, dw, dh = (dets[:, None, k] for k in range(4))
    gx, gy, gw, gh = (gts[None, :, k] for k in range(4))
    w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    inter = w * h
    det_area, gt_area = dw * dh, gw * gh
    union = np.where(crowd[None, :], det_area, det_area + gt_area - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return np.where((w > 0) & (h > 0), iou, 0.0)


class _Analysis:
    """Matching and error types of one evaluation, and the AP of each fix."""

    def __init__(self, *, n_dets: int, categories: list[int]) -> None:
        self.categories = categories
        self.det_type = np.full(n_dets, _IGNORED, dtype=object)
        self.det_class = np.zeros(n_dets, dtype=np.int64)  # index into categories
        self.det_score = np.zeros(n_dets, dtype=np.float64)
        self.det_rank = np.zeros(n_dets, dtype=np.int64)  # COCOeval's order of accumulation (see _analyse)
        self.det_target = np.full(n_dets, -1, dtype=np.int64)  # gt row of a cls / loc error
        self.gt_ids: list[int] = []
        self.gt_class: list[int] = []
        self.gt_type: list[str] = []

    def summary(self) -> dict:
        gt_class = np.asarray(self.gt_class, dtype=np.int64)
        gt_type = np.asarray(self.gt_type, dtype=object)
        counted = gt_type != _IGNORED
        npig = np.bincount(gt_class[counted], minlength=len(self.categories)).astype(np.int64)
        counts = {kind: int(np.sum(self.det_type == kind)) for kind in ERROR_TYPES if kind != "miss"}
        counts["miss"] = int(np.sum(gt_type == "miss"))
        counts["tp"] = int(np.sum(self.det_type == _TP))
        counts["gt"] = int(counted.sum())
        counts["detections"] = int(np.sum(self.det_type != _IGNORED))
        counts = {key: counts[key] for key in (*ERROR_TYPES, "tp", "gt", "detections")}
        if not npig.any():
            return {"AP": None, "dAP": {kind: None for kind in ERROR_TYPES}, "counts": counts}

        evaluated = npig > 0  # COCOeval's classes: those with ground truth
        keep = self.det_type != _IGNORED
        base = self._ap(keep, self.det_type == _TP, self.det_class, npig, evaluated)
        d_ap = {}
        for kind in ERROR_TYPES:
            d_ap[kind] = self._fixed_ap(kind, keep, npig, gt_class, gt_type, evaluated) - base
        return {"AP": base, "dAP": d_ap, "counts": counts}

    def _fixed_ap(self, kind, keep, npig, gt_class, gt_type, evaluated) -> float:
        """TIDE's oracle for one error type (tidecv's ``TIDERun.fix_errors``)."""
        is_tp = self.det_type == _TP
        det_class = self.det_class
        if kind == "miss":
            fixed_npig = npig - np.bincount(gt_class[gt_type == "miss"], minlength=len(npig))
            return self._ap(keep, is_tp, det_class, fixed_npig, evaluated)
        of_kind = self.det_type == kind
        keep = keep & ~of_kind
        if kind in ("cls", "loc"):
            promoted = of_kind & self._best_fix_of_target()
            keep = keep | promoted
            is_tp = is_tp | promoted
            det_class = det_class.copy()
            det_class[promoted] = gt_class[self.det_target[promoted]]
        return self._ap(keep, is_tp, det_class, npig, evaluated)

    def _best_fix_of_target(self) -> np.ndarray:
        """Per detection: it is the highest-scoring cls / loc error (earliest in COCOeval's order on ties)
        pointing at an unmatched ground truth (tidecv's ``BestGTMatch``, shared by both types)."""
        targets = self.det_target
        gt_type = np.asarray(self.gt_type, dtype=object)
        pointing = np.flatnonzero((targets >= 0) & np.isin(self.det_type, ("cls", "loc")))
        pointing = pointing[gt_type[targets[pointing]] != _TP]
        best = np.zeros(len(targets), dtype=bool)
        if pointing.size:
            order = pointing[np.argsort(self.det_rank[pointing], kind="stable")]
            _, first = np.unique(targets[order], return_index=True)
            best[order[first]] = True
        return best

    def _ap(self, keep, is_tp, det_class, npig, evaluated) -> float:
        """COCOeval.accumulate's interpolated precision at its 101 recall thresholds and summarize's mean, in
        points; a class left without ground truth by a fix counts 0 if it still has detections, else drops out
        (tidecv's ``ClassedAPDataObject.get_mAP``), and with every class dropped (all boxes missed and no
        detections: nothing left to get wrong) the fixed AP is 100."""
        chosen = np.flatnonzero(keep)
        chosen = chosen[np.lexsort((self.det_rank[chosen], det_class[chosen]))]
        classes = det_class[chosen]
        bounds = np.searchsorted(classes, np.arange(len(npig) + 1))
        precision = -np.ones((len(_RECALL_THRESHOLDS), len(npig)))
        for k in np.flatnonzero(evaluated):
            tps = is_tp[chosen[bounds[k]:bounds[k + 1]]]
            if npig[k] == 0:
                if tps.size:
                    precision[:, k] = 0.0
                continue
            tp_sum = np.cumsum(tps).astype(dtype=float)
            fp_sum = np.cumsum(~tps).astype(dtype=float)
            rc = tp_sum / npig[k]
            pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
            pr = np.maximum.accumulate(pr[::-1])[::-1]
            q = np.zeros(len(_RECALL_THRESHOLDS))
            inds = np.searchsorted(rc, _RECALL_THRESHOLDS, side="left")
            inside = inds < len(pr)
            q[inside] = pr[inds[inside]]
            precision[:, k] = q
        values = precision[precision > -1]
        return float(np.mean(values) * 100) if values.size else 100.0

    def assignment(self) -> ErrorAssignment:
        return ErrorAssignment(
            detection_types=[str(kind) for kind in self.det_type],
            gt_types={int(ann_id): kind for ann_id, kind in zip(self.gt_ids, self.gt_type)},
        )


def _analyse(coco_gt, detections, *, iou_fg=IOU_FG, iou_bg=IOU_BG, max_dets=MAX_DETS, img_ids=None) -> _Analysis:
    if not (0.0 < iou_bg <= iou_fg <= 1.0):
        raise ValueError(f"TIDE thresholds need 0 < iou_bg <= iou_fg <= 1; got iou_bg={iou_bg}, iou_fg={iou_fg}")
    if isinstance(max_dets, bool) or not isinstance(max_dets, int) or max_dets < 1:
        raise ValueError(f"max_dets must be a positive int, got {max_dets!r}")
    validate_coco_results(detections, source="detections")
    _check_ids_in_ground_truth(coco_gt, detections, img_ids, gt_name="the ground truth", results_name="detections")
    categories = sorted(coco_gt.getCatIds())
    class_index = {cat: k for k, cat in enumerate(categories)}
    images = sorted(coco_gt.getImgIds()) if img_ids is None else sorted(set(img_ids))
    image_position = {image_id: position for position, image_id in enumerate(images)}
    analysis = _Analysis(n_dets=len(detections), categories=categories)

    n = len(detections)
    det_image = np.array([image_position.get(d["image_id"], -1) for d in detections], dtype=np.int64)
    det_class = np.array([class_index[d["category_id"]] for d in detections], dtype=np.int64)
    det_score = np.array([d["score"] for d in detections], dtype=np.float64)
    det_box = np.array([d["bbox"] for d in detections], dtype=np.float64).reshape(n, 4)
    # COCOeval.accumulate's order: by score, ties by image (sorted ids), then by position in the results
    rank = np.empty(n, dtype=np.int64)
    rank[np.lexsort((np.arange(n), det_image, -det_score))] = np.arange(n)
    analysis.det_class, analysis.det_score, analysis.det_rank = det_class, det_score, rank

    by_image = np.argsort(det_image, kind="stable")
    starts = np.searchsorted(det_image[by_image], np.arange(len(images) + 1))
    for position, image_id in enumerate(images):
        dets = by_image[starts[position]:starts[position + 1]]
        anns = coco_gt.imgToAnns.get(image_id, [])
        _analyse_image(analysis, dets, anns, det_box, class_index, iou_fg=iou_fg, iou_bg=iou_bg, max_dets=max_dets)
    return analysis


def _analyse_image(analysis, dets, anns, det_box, class_index, *, iou_fg, iou_bg, max_dets) -> None:
    """COCOeval.evaluateImg's matching of one image (all classes at once) and the types of its false positives."""
    gt_row0 = len(analysis.gt_ids)
    gt_class = np.array([class_index[a["category_id"]] for a in anns], dtype=np.int64)
    gt_box = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(len(anns), 4)
    area = np.array([a.get("area", 0.0) for a in anns], dtype=np.float64)
    gt_crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    gt_ignored = gt_crowd | (area < _AREA_ALL[0]) | (area > _AREA_ALL[1])
    gt_matched = np.zeros(len(anns), dtype=bool)

    # the top max_dets per class by score (stable: ties keep the results' order), in score order
    dets = dets[np.argsort(-analysis.det_score[dets], kind="stable")]
    classes = analysis.det_class[dets]
    seen = np.zeros(len(dets), dtype=np.int64)
    if len(dets):
        order = np.argsort(classes, kind="stable")
        class_sorted = classes[order]
        first = np.searchsorted(class_sorted, class_sorted)
        seen[order] = np.arange(len(dets)) - first
    dets = dets[seen < max_dets]
    classes = analysis.det_class[dets]
    iou = _box_iou(det_box[dets], gt_box, gt_crowd)
    same = classes[:, None] == gt_class[None, :]
    threshold = min(iou_fg, 1 - 1e-10)

    det_type = np.full(len(dets), "fp", dtype=object)
    candidates = np.flatnonzero(((iou >= threshold) & same).any(axis=1))
    for row in candidates:  # COCOeval: the best unmatched counted box (last of equals), else an ignored one
        reachable = same[row] & (gt_crowd | ~gt_matched) & (iou[row] >= threshold)  # a crowd box matches again
        for group, kind in ((~gt_ignored, _TP), (gt_ignored, _IGNORED)):
            usable = reachable & group
            if usable.any():
                values = np.where(usable, iou[row], -1.0)
                gt_matched[len(values) - 1 - int(np.argmax(values[::-1]))] = True
                det_type[row] = kind
                break
    det_area = det_box[dets, 2] * det_box[dets, 3]
    det_type[(det_type == "fp") & ((det_area < _AREA_ALL[0]) | (det_area > _AREA_ALL[1]))] = _IGNORED

    # TIDE's types of the false positives, against the non-crowd boxes, in tidecv's order
    target = np.full(len(dets), -1, dtype=np.int64)
    fp = np.flatnonzero(det_type == "fp")
    if fp.size:
        counted = ~gt_ignored
        fp_iou = np.where(counted[None, :], iou[fp], 0.0)
        fp_same = same[fp]
        same_iou = np.where(fp_same, fp_iou, 0.0)
        other_iou = np.where(~fp_same, fp_iou, 0.0)
        used_same_iou = np.where(gt_matched[None, :], same_iou, 0.0)
        best_same = same_iou.max(axis=1, initial=0.0)
        best_other = other_iou.max(axis=1, initial=0.0)
        best_any = fp_iou.max(axis=1, initial=0.0)
        is_loc = (best_same >= iou_bg) & (best_same < iou_fg)
        is_cls = ~is_loc & (best_other >= iou_fg)
        is_dupe = ~is_loc & ~is_cls & (used_same_iou.max(axis=1, initial=0.0) >= iou_fg)
        is_bkg = ~is_loc & ~is_cls & ~is_dupe & (best_any < iou_bg)
        kinds = np.full(fp.size, "both", dtype=object)
        kinds[is_bkg], kinds[is_dupe], kinds[is_cls], kinds[is_loc] = "bkg", "dupe", "cls", "loc"
        det_type[fp] = kinds
        if len(anns):
            target[fp[is_loc]] = np.argmax(same_iou[is_loc], axis=1) + gt_row0
            target[fp[is_cls]] = np.argmax(other_iou[is_cls], axis=1) + gt_row0

    analysis.det_type[dets] = det_type
    analysis.det_target[dets] = target
    pointed = np.zeros(len(anns), dtype=bool)
    pointed[target[target >= 0] - gt_row0] = True
    gt_type = np.where(gt_ignored, _IGNORED, np.where(gt_matched, _TP, np.where(pointed, "fn", "miss")))
    analysis.gt_ids.extend(int(a["id"]) for a in anns)
    analysis.gt_class.extend(gt_class.tolist())
    analysis.gt_type.extend(str(kind) for kind in gt_type)
