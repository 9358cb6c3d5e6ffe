"""An evaluation report to browse: ``index.html`` and ``errors.json`` in one folder, written from a COCO evaluation.

``index.html`` is one self-contained page (styles, script, plots and images inline; nothing is fetched, no server is
needed to open it): the summary metrics, TIDE's error breakdown (:mod:`.errors`), a per-class table that sorts by any
column, each class's precision-recall curves, and a gallery of the images with the most errors, ground truth and
detections drawn, each image linking to the list of its boxes and what each was found to be.

``errors.json`` is ``{"bbox": {"AP", "dAP": {"cls", "loc", "both", "dupe", "bkg", "miss"}, "counts", "iou_fg",
"iou_bg"}}``: TIDE's AP and dAPs in AP points at IoU 0.5 (:func:`~detectron_res.evaluation.tide_errors`).

Which images are "worst": each image's error mass, the sum of the scores of its false positives (of every TIDE kind)
plus one per ground-truth box that no detection matched. A confident false positive weighs almost as much as a missed
object, and the many low-scoring detections that any detector leaves weigh little. Images tie by their order in the
evaluation. The drawings show the detections scoring at least ``show_score``; the lists give every counted
detection, highest score first, up to ``MAX_LISTED_DETECTIONS``.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..utils import atomic_write_text
from .coco import SUMMARY_METRICS, COCOEvaluation
from .errors import ERROR_TYPES, IOU_BG, IOU_FG, ErrorAssignment, tide_breakdown
from .metrics import json_safe
from .pr_curves import ClassCurves

logger = logging.getLogger(__name__)

REPORT_FILE = "index.html"
ERRORS_FILE = "errors.json"
DEFAULT_GALLERY_SIZE = 24
DEFAULT_SHOW_SCORE = 0.3
MAX_LISTED_DETECTIONS = 100
THUMBNAIL_SIDE = 640  # the longer side of a gallery image, pixels
MAX_UPSCALE = 4.0  # a smaller image is enlarged at most this much to reach it
_FONT_SCALE = 0.6  # OpenCV's Hershey font, readable when the page shows the image at 400 pixels

ERROR_NAMES = {
    "cls": "classification: at IoU >= 0.5 with a box of another class",
    "loc": "localization: the right class at IoU in [0.1, 0.5)",
    "both": "classification and localization: another class's box at IoU in [0.1, 0.5)",
    "dupe": "duplicate: IoU >= 0.5 with a box of its class that a higher score already matched",
    "bkg": "background: IoU < 0.1 with every box",
    "miss": "missed: a ground-truth box no detection matched or pointed at",
}
_GT_LABELS = {"tp": "matched", "miss": "missed", "fn": "missed (a cls or loc error points at it)",
              "ignored": "crowd (ignored)"}
# colors (BGR for OpenCV, and the same as CSS) of what the gallery draws
_COLORS = {"gt": (40, 160, 40), "missed": (40, 40, 230), "ignored": (150, 150, 150), "tp": (215, 120, 30),
           "fp": (0, 140, 255)}


@dataclass(frozen=True)
class ImageErrors:
    """One evaluated image's boxes and what they were found to be.

    Attributes:
        image_id: the image's id in the ground truth.
        error_mass: the sum of its false positives' scores plus its unmatched ground-truth boxes (module docstring).
        detections: (detection index in the evaluation's list, type), counted detections only, by score.
        ground_truth: (annotation, type) for each of its boxes (``"tp"``, ``"miss"``, ``"fn"`` or ``"ignored"``).
    """

    image_id: int | str
    error_mass: float
    detections: list[tuple[int, str]]
    ground_truth: list[tuple[dict, str]]


def per_image_errors(evaluation: COCOEvaluation, assignment: ErrorAssignment) -> list[ImageErrors]:
    """Every evaluated image's :class:`ImageErrors`, the worst first (ties keep the evaluation's image order)."""
    coco_gt, detections = evaluation.coco_gt, evaluation.detections
    by_image: dict[int | str, list[int]] = {image_id: [] for image_id in evaluation.img_ids}
    for index, (entry, kind) in enumerate(zip(detections, assignment.detection_types)):
        if kind != "ignored" and entry["image_id"] in by_image:
            by_image[entry["image_id"]].append(index)
    images = []
    for image_id, indices in by_image.items():
        indices.sort(key=lambda index: -detections[index]["score"])
        kinds = [(index, assignment.detection_types[index]) for index in indices]
        ground_truth = [(ann, assignment.gt_types[ann["id"]]) for ann in coco_gt.imgToAnns.get(image_id, [])]
        mass = sum(detections[index]["score"] for index, kind in kinds if kind != "tp")
        mass += sum(1 for _, kind in ground_truth if kind in ("miss", "fn"))
        images.append(ImageErrors(image_id=image_id, error_mass=float(mass), detections=kinds,
                                  ground_truth=ground_truth))
    order = sorted(range(len(images)), key=lambda position: (-images[position].error_mass, position))
    return [images[position] for position in order]


def per_class_rows(evaluation: COCOEvaluation, assignment: ErrorAssignment) -> list[dict]:
    """One row per ground-truth category, in id order: ``name``, ``gt`` (counted boxes), ``detections`` (counted),
    ``AP`` and ``AP50`` (percent, None without ground truth), ``tp`` and each TIDE type's count (a false positive
    counts for its detection's class, a missed box for its own)."""
    coco_gt = evaluation.coco_gt
    category_ids = sorted(coco_gt.getCatIds())
    rows = {cat: {"gt": 0, "detections": 0, "tp": 0, **{kind: 0 for kind in ERROR_TYPES}} for cat in category_ids}
    for entry, kind in zip(evaluation.detections, assignment.detection_types):
        if kind != "ignored":
            rows[entry["category_id"]]["detections"] += 1
            rows[entry["category_id"]][kind] += 1
    for ann_id, kind in assignment.gt_types.items():
        if kind != "ignored":
            row = rows[coco_gt.anns[ann_id]["category_id"]]
            row["gt"] += 1
            if kind == "miss":
                row["miss"] += 1
    if len(evaluation.curves) != len(category_ids):  # COCOeval's catIds are the sorted ids
        raise ValueError(f"{len(evaluation.curves)} precision-recall curves for {len(category_ids)} categories")
    return [
        {"name": coco_gt.cats[cat]["name"], "category_id": cat, "AP": curve.ap["AP"], "AP50": curve.ap["AP50"],
         **rows[cat]}
        for cat, curve in zip(category_ids, evaluation.curves)
    ]


def write_report(
    report_dir: str | os.PathLike,
    evaluation: COCOEvaluation,
    *,
    image_files: Mapping[int | str, str | os.PathLike] | None = None,
    title: str = "Evaluation report",
    sources: Mapping[str, str] | None = None,
    gallery_size: int = DEFAULT_GALLERY_SIZE,
    show_score: float = DEFAULT_SHOW_SCORE,
) -> dict:
    """Writes ``report_dir/index.html`` and ``report_dir/errors.json`` (module docstring), each atomically.

    Args:
        report_dir: the folder to write (created if needed).
        evaluation: a finished COCO evaluation (:func:`~detectron_res.evaluation.coco.run_coco_evaluation`).
        image_files: image id -> image file, for the gallery; an image without a readable file is drawn on a grey
            canvas of its size, with the reason written on it.
        title: the page's title.
        sources: what was evaluated, shown at the top (e.g. ``{"ground truth": path, "detections": path}``).
        gallery_size: how many of the worst images the gallery shows.
        show_score: the lowest score of the detections drawn on the gallery's images.

    Returns:
        The content of errors.json.
    """
    if gallery_size < 0:
        raise ValueError(f"gallery_size must be >= 0, got {gallery_size}")
    if not 0.0 <= show_score <= 1.0:
        raise ValueError(f"show_score must be in [0, 1], got {show_score}")
    report_dir = Path(report_dir)
    tide, assignment = tide_breakdown(evaluation.coco_gt, evaluation.detections, img_ids=evaluation.img_ids,
                                      iou_fg=IOU_FG, iou_bg=IOU_BG)
    errors = {"bbox": {"AP": tide["AP"], "dAP": tide["dAP"], "counts": tide["counts"], "iou_fg": IOU_FG,
                       "iou_bg": IOU_BG}}
    images = per_image_errors(evaluation, assignment)
    gallery = [image for image in images if image.error_mass > 0][:gallery_size]
    page = _Page(evaluation, image_files=image_files or {}, show_score=show_score)
    text = page.render(
        title=title, sources=sources or {}, tide=tide, rows=per_class_rows(evaluation, assignment), gallery=gallery,
        images_with_errors=sum(1 for image in images if image.error_mass > 0),
    )
    report_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report_dir / ERRORS_FILE, json.dumps(json_safe(errors), indent=2) + "\n")
    atomic_write_text(report_dir / REPORT_FILE, text)
    logger.info("Wrote the evaluation report %s (%d gallery images) and %s",
                report_dir / REPORT_FILE, len(gallery), report_dir / ERRORS_FILE)
    return errors


def write_report_index(report_dir: str | os.PathLike, reports: Mapping[str, dict], *, title: str) -> None:
    """For several data sets: ``report_dir/index.html`` linking each ``report_dir/<name>/index.html`` with its AP
    and dAPs, and ``report_dir/errors.json`` as ``{name: that data set's errors.json}``."""
    report_dir = Path(report_dir)
    rows = []
    for name, errors in reports.items():
        bbox = errors["bbox"]
        cells = "".join(f"<td class=num>{_number(bbox['dAP'][kind])}</td>" for kind in ERROR_TYPES)
        rows.append(f"<tr><td><a href=\"{html.escape(name)}/{REPORT_FILE}\">{html.escape(name)}</a></td>"
                    f"<td class=num>{_number(bbox['AP'])}</td>{cells}</tr>")
    header = "".join(f"<th>dAP {kind}</th>" for kind in ERROR_TYPES)
    body = (f"<h1>{html.escape(title)}</h1><table><thead><tr><th>data set</th><th>AP50 (TIDE)</th>{header}</tr>"
            f"</thead><tbody>{''.join(rows)}</tbody></table>")
    report_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report_dir / ERRORS_FILE, json.dumps(json_safe(dict(reports)), indent=2) + "\n")
    atomic_write_text(report_dir / REPORT_FILE, _document(title, body))


def _number(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _css_color(bgr: tuple[int, int, int]) -> str:
    return f"rgb({bgr[2]},{bgr[1]},{bgr[0]})"


class _Page:
    """Renders index.html's sections."""

    def __init__(self, evaluation: COCOEvaluation, *, image_files: Mapping, show_score: float) -> None:
        self.evaluation = evaluation
        self.image_files = image_files
        self.show_score = show_score
        self.names = {cat["id"]: cat["name"] for cat in evaluation.coco_gt.dataset["categories"]}

    def render(self, *, title, sources, tide, rows, gallery, images_with_errors) -> str:
        sections = [
            f"<h1>{html.escape(title)}</h1>",
            self._sources(sources),
            self._summary(),
            self._breakdown(tide),
            self._class_table(rows),
            self._curves(),
            self._gallery(gallery, images_with_errors),
            self._details(gallery),
        ]
        return _document(title, "\n".join(sections))

    def _sources(self, sources: Mapping[str, str]) -> str:
        evaluation = self.evaluation
        items = [f"<dt>{html.escape(key)}</dt><dd>{html.escape(str(value))}</dd>" for key, value in sources.items()]
        items += [
            f"<dt>images evaluated</dt><dd>{len(evaluation.img_ids)}</dd>",
            f"<dt>detections</dt><dd>{len(evaluation.detections)}</dd>",
            f"<dt>COCOeval backend</dt><dd>{html.escape(evaluation.backend)}</dd>",
        ]
        return f"<dl class=sources>{''.join(items)}</dl>"

    def _summary(self) -> str:
        bbox = self.evaluation.metrics["bbox"]
        header = "".join(f"<th>{name}</th>" for name in SUMMARY_METRICS)
        cells = "".join(f"<td class=num>{_number(bbox.get(name))}</td>" for name in SUMMARY_METRICS)
        return (f"<h2 id=summary>Summary (COCO box AP, percent)</h2><table id=summary-table><thead><tr>{header}</tr>"
                f"</thead><tbody><tr>{cells}</tr></tbody></table>")

    def _breakdown(self, tide: dict) -> str:
        d_ap, counts = tide["dAP"], tide["counts"]
        largest = max([value for value in d_ap.values() if value is not None] + [1e-9])
        bars, rows = [], []
        for position, kind in enumerate(ERROR_TYPES):
            value = d_ap[kind] or 0.0
            width = 300.0 * max(value, 0.0) / largest
            y = 6 + position * 26
            bars.append(f"<text x=0 y={y + 15}>{kind}</text><rect x=48 y={y} width={width:.1f} height=18 "
                        f"fill=\"#d9822b\"/><text x={54 + width:.1f} y={y + 15}>{_number(d_ap[kind], 2)}</text>")
            rows.append(f"<tr><td>{kind}</td><td>{html.escape(ERROR_NAMES[kind])}</td><td class=num>{counts[kind]}"
                        f"</td><td class=num>{_number(d_ap[kind], 2)}</td></tr>")
        svg = (f"<svg class=bars width=420 height={12 + 26 * len(ERROR_TYPES)} role=img "
               f"aria-label=\"dAP per error type\">{''.join(bars)}</svg>")
        return (
            "<h2 id=errors>Error breakdown (TIDE)</h2>"
            f"<p>AP at IoU 0.5: <b>{_number(tide['AP'], 2)}</b>. dAP: the AP points gained by fixing that kind of "
            "error alone (Bolya et al., <a href=\"https://arxiv.org/abs/2008.08115\">TIDE</a>, ECCV 2020). "
            f"{counts['tp']} true positives of {counts['gt']} ground-truth boxes; {counts['detections']} counted "
            "detections.</p>"
            f"<div class=breakdown>{svg}<table id=errors-table><thead><tr><th>type</th><th>meaning</th><th>count</th>"
            f"<th>dAP</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
        )

    def _class_table(self, rows: list[dict]) -> str:
        columns = [("name", "class"), ("gt", "ground truth"), ("detections", "detections"), ("AP", "AP"),
                   ("AP50", "AP50"), ("tp", "tp"), *[(kind, kind) for kind in ERROR_TYPES]]
        header = "".join(
            f"<th data-key={key}{' data-numeric' if key != 'name' else ''} title=\"sort\">{html.escape(label)}</th>"
            for key, label in columns
        )
        body = []
        for position, row in enumerate(rows):
            cells = [f"<td data-value=\"{html.escape(row['name'])}\"><a href=\"#pr-{position}\">"
                     f"{html.escape(row['name'])}</a></td>"]
            for key, _ in columns[1:]:
                value = row[key]
                shown = _number(value) if key in ("AP", "AP50") else str(value)
                sort_value = -1 if value is None else value
                cells.append(f"<td class=num data-value=\"{sort_value}\">{shown}</td>")
            body.append(f"<tr>{''.join(cells)}</tr>")
        return (
            "<h2 id=classes>Per class</h2><p>Click a column's header to sort by it (again to reverse). A false "
            "positive counts for its detection's class, a missed box for its own.</p>"
            f"<table id=class-table class=sortable><thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody>"
            "</table>"
        )

    def _curves(self) -> str:
        figures = [_curve_svg(position, item) for position, item in enumerate(self.evaluation.curves)]
        return (
            "<h2 id=curves>Precision-recall curves</h2><p>Per class, area all, 100 detections per image: solid at "
            "IoU 0.5, dashed averaged over IoU 0.5:0.95 (its mean is the class's AP).</p>"
            f"<div class=curves>{''.join(figures)}</div>"
        )

    def _gallery(self, gallery: list[ImageErrors], images_with_errors: int) -> str:
        legend = "".join(
            f"<span><i style=\"border-color:{_css_color(_COLORS[key])}\"></i>{label}</span>"
            for key, label in (("gt", "ground truth, matched"), ("missed", "ground truth, missed"),
                               ("ignored", "crowd (ignored)"), ("tp", "true positive"), ("fp", "false positive"))
        )
        cards = []
        for position, image in enumerate(gallery):
            picture = self._picture(image)
            name = html.escape(self._file_label(image.image_id))
            cards.append(
                f"<figure><a href=\"#image-{position}\"><img src=\"{picture}\" alt=\"{name}\"></a>"
                f"<figcaption><a href=\"#image-{position}\">{name}</a><br>{_summary_line(image)}</figcaption>"
                "</figure>"
            )
        if not cards:
            return "<h2 id=gallery>Worst images</h2><p>No image has an error.</p>"
        return (
            f"<h2 id=gallery>Worst images</h2><p>The {len(gallery)} of {images_with_errors} images with errors whose "
            "false positives' scores plus missed boxes are largest; detections scoring at least "
            f"{self.show_score:g} are drawn, false positives labelled with their error type. Click an image for its "
            f"boxes.</p><p class=legend>{legend}</p><div class=gallery>{''.join(cards)}</div>"
        )

    def _details(self, gallery: list[ImageErrors]) -> str:
        sections = []
        detections = self.evaluation.detections
        for position, image in enumerate(gallery):
            gt_rows = "".join(
                f"<tr class={kind}><td>{html.escape(self.names[ann['category_id']])}</td>"
                f"<td>{_box_text(ann['bbox'])}</td><td>{_GT_LABELS[kind]}</td></tr>"
                for ann, kind in image.ground_truth
            )
            listed = image.detections[:MAX_LISTED_DETECTIONS]
            det_rows = "".join(
                f"<tr class={kind}><td>{html.escape(self.names[detections[index]['category_id']])}</td>"
                f"<td class=num>{detections[index]['score']:.3f}</td><td>{_box_text(detections[index]['bbox'])}</td>"
                f"<td>{kind}</td></tr>"
                for index, kind in listed
            )
            more = len(image.detections) - len(listed)
            more_text = f"<p>{more} more detections with lower scores are not listed.</p>" if more else ""
            sections.append(
                f"<section id=image-{position} class=detail><h3>{html.escape(self._file_label(image.image_id))} "
                f"(image id {html.escape(str(image.image_id))})</h3><p>{_summary_line(image)} "
                "<a href=\"#gallery\">back to the gallery</a></p>"
                f"<div class=lists><table><caption>ground truth</caption><thead><tr><th>class</th><th>box x y w h</th>"
                f"<th>found</th></tr></thead><tbody>{gt_rows}</tbody></table>"
                f"<table><caption>detections</caption><thead><tr><th>class</th><th>score</th><th>box x y w h</th>"
                f"<th>type</th></tr></thead><tbody>{det_rows}</tbody></table></div>{more_text}</section>"
            )
        return ("<h2 id=details>Boxes of the gallery's images</h2>" + "".join(sections)) if sections else ""

    def _file_label(self, image_id: int | str) -> str:
        image = self.evaluation.coco_gt.imgs.get(image_id, {})
        return str(image.get("file_name") or image_id)

    def _picture(self, image: ImageErrors) -> str:
        """The image with its boxes drawn, as a JPEG data URI."""
        info = self.evaluation.coco_gt.imgs.get(image.image_id, {})
        path = self.image_files.get(image.image_id)
        pixels, problem = _read_image(path)
        if pixels is None:
            height, width = int(info.get("height") or 480), int(info.get("width") or 640)
            pixels = np.full((height, width, 3), 200, dtype=np.uint8)
        scale = min(THUMBNAIL_SIDE / max(pixels.shape[:2]), MAX_UPSCALE)  # small images up, so labels stay small
        if scale != 1.0:
            interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
            pixels = cv2.resize(pixels, None, fx=scale, fy=scale, interpolation=interpolation)
        for ann, kind in image.ground_truth:
            color = {"tp": _COLORS["gt"], "ignored": _COLORS["ignored"]}.get(kind, _COLORS["missed"])
            _draw_box(pixels, ann["bbox"], scale, color, thickness=3 if kind in ("miss", "fn") else 2,
                      label=("missed " if kind in ("miss", "fn") else "") + self.names[ann["category_id"]],
                      below=True)
        detections = self.evaluation.detections
        for index, kind in reversed(image.detections):  # the highest scores drawn last, on top
            entry = detections[index]
            if entry["score"] < self.show_score:
                continue
            label = f"{self.names[entry['category_id']]} {entry['score']:.2f}"
            _draw_box(pixels, entry["bbox"], scale, _COLORS["tp"] if kind == "tp" else _COLORS["fp"], thickness=2,
                      label=label if kind == "tp" else f"{kind}: {label}")
        if problem:
            cv2.putText(pixels, problem[:80], (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 160), 1, cv2.LINE_AA)
        ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 85])
        if not ok:
            raise RuntimeError(f"OpenCV could not encode the gallery image of image id {image.image_id!r}")
        return "data:image/jpeg;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


def _read_image(path: str | os.PathLike | None) -> tuple[np.ndarray | None, str]:
    """(BGR pixels, "") or (None, why there are none)."""
    if path is None:
        return None, "no image file given"
    if not os.path.isfile(path):
        return None, f"image not found: {os.fspath(path)}"
    pixels = cv2.imread(os.fspath(path), cv2.IMREAD_COLOR)
    if pixels is None:
        return None, f"unreadable image: {os.fspath(path)}"
    return pixels, ""


def _draw_box(pixels: np.ndarray, xywh: Sequence[float], scale: float, color, *, thickness: int, label: str,
              below: bool = False) -> None:
    """The box at `scale`, its label on a filled band above it (`below`: under it, so that a ground-truth box's label
    and that of a detection on the same box do not cover each other), kept inside the image."""
    x, y, w, h = (float(value) * scale for value in xywh)
    top_left, bottom_right = (int(round(x)), int(round(y))), (int(round(x + w)), int(round(y + h)))
    cv2.rectangle(pixels, top_left, bottom_right, color, thickness, cv2.LINE_AA)
    (text_w, text_h), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, _FONT_SCALE, 1)
    band = text_h + 4
    if below:
        bottom = min(bottom_right[1] + band, pixels.shape[0])
    else:
        bottom = max(top_left[1], band)
    left = min(max(top_left[0], 0), max(pixels.shape[1] - text_w - 4, 0))
    cv2.rectangle(pixels, (left, bottom - band), (left + text_w + 4, bottom), color, -1)
    cv2.putText(pixels, label, (left + 2, bottom - 3), cv2.FONT_HERSHEY_SIMPLEX, _FONT_SCALE, (255, 255, 255), 1,
                cv2.LINE_AA)


def _summary_line(image: ImageErrors) -> str:
    kinds = [kind for _, kind in image.detections if kind != "tp"]
    counts = {kind: kinds.count(kind) for kind in ERROR_TYPES if kind != "miss" and kinds.count(kind)}
    missed = sum(1 for _, kind in image.ground_truth if kind in ("miss", "fn"))
    parts = [f"{count} {kind}" for kind, count in counts.items()]
    if missed:
        parts.append(f"{missed} missed")
    return f"error mass {image.error_mass:.2f}: " + (", ".join(parts) or "none")


def _box_text(xywh: Sequence[float]) -> str:
    return " ".join(f"{float(value):.1f}" for value in xywh)


def _curve_svg(position: int, item: ClassCurves) -> str:
    """One class's precision-recall curves as an inline SVG (steps, as the PNG plots draw them)."""
    width, height, left, bottom = 220, 170, 30, 22
    plot_w, plot_h = width - left - 8, height - bottom - 24

    def point(recall: float, precision: float) -> str:
        return f"{left + recall * plot_w:.1f},{24 + (1.0 - precision) * plot_h:.1f}"

    parts = [f"<rect x={left} y=24 width={plot_w} height={plot_h} class=frame />",
             f"<text x=2 y=14 class=title>{html.escape(item.name)}</text>",
             f"<text x={left} y={height - 6}>0</text><text x={width - 16} y={height - 6}>1</text>"
             f"<text x={left + plot_w / 2 - 14:.0f} y={height - 6}>recall</text>"
             f"<text x=4 y={24 + plot_h:.0f}>0</text><text x=4 y=32>1</text>"]
    if not item.curves:
        parts.append(f"<text x={left + 20} y={24 + plot_h / 2:.0f}>no ground truth</text>")
    for number, (label, (recall, precision)) in enumerate(item.curves.items()):
        recall, precision = np.asarray(recall, dtype=np.float64), np.asarray(precision, dtype=np.float64)
        points = [point(0.0, float(precision[0]))] if recall.size else []
        for k in range(recall.size):
            if k:
                points.append(point(float(recall[k - 1]), float(precision[k])))
            points.append(point(float(recall[k]), float(precision[k])))
        dash = " stroke-dasharray=\"4 3\"" if number else ""
        parts.append(f"<polyline points=\"{' '.join(points)}\" class=curve{dash}><title>{html.escape(label)}"
                     "</title></polyline>")
    aps = "  ".join(f"{label} {_number(value)}" for label, value in item.ap.items())
    return (f"<figure id=pr-{position} class=curve><svg width={width} height={height} role=img "
            f"aria-label=\"precision-recall curves of {html.escape(item.name)}\">{''.join(parts)}</svg>"
            f"<figcaption>{html.escape(aps)}</figcaption></figure>")


_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; } th, td { border: 1px solid #ccc; padding: 2px 8px; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.sortable th { cursor: pointer; user-select: none; } th.sorted-asc::after { content: " \\25B2"; }
th.sorted-desc::after { content: " \\25BC"; }
dl.sources { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; }
dl.sources dt { font-weight: 600; } dl.sources dd { margin: 0; word-break: break-all; }
.breakdown { display: flex; gap: 2em; align-items: flex-start; flex-wrap: wrap; }
svg text { font: 12px system-ui, sans-serif; fill: #222; } svg .title { font-weight: 600; }
svg .frame { fill: none; stroke: #999; } svg .curve { fill: none; stroke: #1f5fa8; stroke-width: 1.5; }
.curves, .gallery { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; } figure.curve figcaption { font-size: 12px; }
.gallery figure { width: 400px; } .gallery img { width: 100%; border: 1px solid #ccc; }
.gallery figcaption { font-size: 12px; word-break: break-all; }
.legend span { margin-right: 1.2em; } .legend i { display: inline-block; width: 14px; height: 10px;
  border: 3px solid; margin-right: 4px; vertical-align: middle; }
.lists { display: flex; gap: 2em; flex-wrap: wrap; align-items: flex-start; }
tr.miss td, tr.fn td { color: #b00; } tr.tp td { color: #175; }
tr.cls td, tr.loc td, tr.both td, tr.dupe td, tr.bkg td { color: #b35900; }
section.detail:target { background: #fff8e0; }
"""

_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, column) {
    th.addEventListener("click", function () {
      var numeric = th.hasAttribute("data-numeric");
      var ascending = !th.classList.contains("sorted-asc");
      table.querySelectorAll("th").forEach(function (other) { other.classList.remove("sorted-asc", "sorted-desc"); });
      th.classList.add(ascending ? "sorted-asc" : "sorted-desc");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[column].getAttribute("data-value"), y = b.cells[column].getAttribute("data-value");
        var order = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def _document(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content=\"width=device-width, initial-scale=1\">"
        f"<title>{html.escape(title)}</title><link rel=icon href=\"data:,\"><style>{_STYLE}</style></head>\n"
        f"<body>\n{body}\n<script>{_SCRIPT}</script>\n</body></html>\n"
    )
