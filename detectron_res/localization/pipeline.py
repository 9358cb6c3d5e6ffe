"""The two stages put together: classes -> the RPN's top boxes per class -> (R-CNN re-scoring and refinement) -> one
box per class, the image's guesses; the evaluator of those guesses (the CLS-LOC metric), and the R-CNN stage's
training RoIs made by running the trained RPN over the training images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from ..data.datasets.base import DetectionDataset
from ..evaluation.evaluator import DatasetEvaluator
from ..evaluation.imagenet_loc import LocGroundTruth, evaluate_localization
from .rcnn_stage import RCNNLocalizer
from .rpn_stage import LocalizationRPN, best_per_class
from .submission import inclusive_boxes

logger = logging.getLogger(__name__)

ClassTable = Mapping[str, Sequence[int]]  # image id -> 0-based classes, best first


def image_key(image_id: object) -> str:
    """The key of an image in class tables and submissions: its id as a string."""
    return str(image_id)


def oracle_class_table(dataset: DetectionDataset) -> dict[str, list[int]]:
    """Each image's ground-truth classes (in order of first appearance): the "oracle" rows of the paper's Table 13."""
    table = {}
    for record in dataset.records:
        classes = [ann["category_id"] for ann in record.get("annotations") or ()]
        table[image_key(record["image_id"])] = list(dict.fromkeys(classes))
    return table


class Localizer:
    """Callable on a batch of `OriginalImageMapper` inputs: per image {"classes" (K,), "boxes" (K, 4), "scores" (K,)},
    one box per class in original pixels, the classes in their given order.

    The classes of an image are ``classes[image_id]`` when a table is given (read from a file of predictions, or
    the ground truth), else ``classify(input)`` (e.g. a `TorchvisionClassifier` on ``input["original"]``); both keep
    their order. Without either, the system ranks classes itself: the RPN localises its `candidate_classes` best by
    image score and the classes are ordered by their best box's score, the R-CNN stage's when there is one (the
    RPN's image scores alone are a weak classifier, see docs/localization.md). With an R-CNN stage, each class's RPN
    boxes are re-scored and refined by it and the best refined box is kept; without, the RPN's best box.
    """

    def __init__(
        self,
        *,
        rpn: LocalizationRPN,
        rcnn: RCNNLocalizer | None = None,
        classes: ClassTable | None = None,
        classify: Callable[[dict], Sequence[int]] | None = None,
        classes_per_image: int = 5,
    ) -> None:
        self.rpn = rpn
        self.rcnn = rcnn
        self.classes = classes
        self.classify = classify
        self.classes_per_image = classes_per_image

    def eval(self) -> Localizer:
        self.rpn.eval()
        if self.rcnn is not None:
            self.rcnn.eval()
        return self

    def image_classes(self, x: dict) -> list[int] | None:
        """The classes to localise in input `x`, best first; None: the RPN's own choice."""
        if self.classes is None:
            return None if self.classify is None else list(self.classify(x))[: self.classes_per_image]
        key = image_key(x["image_id"])
        if key not in self.classes:
            raise ValueError(f"no class predictions for image {key!r} ({x.get('file_name', '')})")
        return list(self.classes[key])[: self.classes_per_image]

    @torch.no_grad()
    def __call__(self, batched_inputs: list[dict]) -> list[dict[str, Tensor]]:
        inputs = []
        for x in batched_inputs:
            classes = self.image_classes(x)
            inputs.append(x if classes is None else {**x, "classes": classes})
        proposals = self.rpn(inputs)
        if self.rcnn is not None:
            proposals = [
                {**p, **refined}
                for p, refined in zip(
                    proposals,
                    self.rcnn(
                        [
                            {"original": self._original(x), "proposals": p["boxes"], "proposal_labels": p["labels"]}
                            for x, p in zip(inputs, proposals)
                        ]
                    ),
                )
            ]
        results = []
        for x, p in zip(inputs, proposals):
            classes, boxes, scores = best_per_class(p, image_size=(x["height"], x["width"]))
            if "classes" not in x:  # the system's own choice: the classes whose best boxes score highest
                order = scores.argsort(descending=True, stable=True)
                classes, boxes, scores = classes[order], boxes[order], scores[order]
            keep = slice(0, self.classes_per_image)
            results.append({"classes": classes[keep], "boxes": boxes[keep], "scores": scores[keep]})
        return results

    @staticmethod
    def _original(x: dict) -> Tensor:
        if "original" not in x:
            raise ValueError(
                "the R-CNN stage crops from the original image: build the inputs with OriginalImageMapper "
                "(build_localization_test_loader)"
            )
        return x["original"]


def ground_truth_of(record: dict) -> LocGroundTruth:
    """A record's ground truth in the scorer's form: 1-based labels and inclusive boxes (x2 = last pixel)."""
    annotations = record.get("annotations") or ()
    boxes = np.array([ann["bbox"] for ann in annotations], dtype=np.float64).reshape(-1, 4)
    boxes[:, 2:] -= 1.0
    return LocGroundTruth(
        labels=np.array([ann["category_id"] + 1 for ann in annotations], dtype=np.int64), boxes=boxes
    )


class LocalizationEvaluator(DatasetEvaluator):
    """The CLS-LOC metric on a `Localizer`'s outputs, scored exactly as the submission file of the same guesses
    would be (boxes converted to inclusive integer pixels first). `guesses` keeps every image's (labels, boxes)
    in the order processed, ready for `write_submission`."""

    def __init__(self, dataset: DetectionDataset) -> None:
        self.truth = {image_key(r["image_id"]): ground_truth_of(r) for r in dataset.records}
        self.reset()

    def reset(self) -> None:
        self.image_ids: list[str] = []
        self.guesses: list[tuple[np.ndarray, np.ndarray]] = []

    def process(self, inputs: list[dict], outputs: list[dict[str, Tensor]]) -> None:
        for x, out in zip(inputs, outputs):
            labels = out["classes"].cpu().numpy().astype(np.int64) + 1
            boxes = inclusive_boxes(out["boxes"].cpu().numpy(), width=x["width"], height=x["height"])
            self.image_ids.append(image_key(x["image_id"]))
            self.guesses.append((labels, boxes))

    def evaluate(self) -> dict:
        return evaluate_localization(self.guesses, [self.truth[i] for i in self.image_ids])


def run_localizer(
    localizer: Callable[[list[dict]], list[dict]], data_loader, evaluator: LocalizationEvaluator, *, progress: bool = True
) -> dict:
    """Every batch of `data_loader` through `localizer` into `evaluator`; returns its metrics."""
    evaluator.reset()
    with torch.inference_mode():
        for inputs in tqdm(data_loader, desc="localize", disable=None if progress else True):
            inputs = [x for x in inputs if "bad_image" not in x]
            if inputs:
                evaluator.process(inputs, localizer(inputs))
    return evaluator.evaluate()


@torch.no_grad()
def rcnn_training_records(
    rpn: LocalizationRPN,
    dataset: DetectionDataset,
    data_loader,
    *,
    fg_iou_thresh: float,
    progress: bool = True,
) -> DetectionDataset:
    """The R-CNN stage's training pool: each record gains ``rois`` (P, 4), the RPN's top boxes of each of its
    ground-truth classes (the paper's top 200) and its ground-truth boxes, continuous XYXY in original pixels, and
    ``roi_foreground`` (P,): whether a RoI overlaps a box of its class with IoU >= `fg_iou_thresh`.

    `RoIMapper` takes one RoI of a record per sample, so a batch holds RoIs of as many images as it has RoIs
    (RoI-centric sampling). `data_loader` yields the data set's images (`build_localization_test_loader`).
    """
    records = {image_key(r["image_id"]): r for r in dataset.records}
    oracle = oracle_class_table(dataset)
    rpn.eval()
    pool, num_foreground, num_rois = [], 0, 0
    for inputs in tqdm(data_loader, desc="R-CNN RoIs", disable=None if progress else True):
        inputs = [x for x in inputs if "bad_image" not in x]
        if not inputs:
            continue
        with_classes = [{**x, "classes": oracle[image_key(x["image_id"])]} for x in inputs]
        for x, result in zip(with_classes, rpn(with_classes)):
            record = records[image_key(x["image_id"])]
            truth = ground_truth_of(record)
            gt_boxes = truth.boxes + np.array([0.0, 0.0, 1.0, 1.0])  # back to continuous
            rois = np.concatenate([result["boxes"].cpu().numpy().astype(np.float64), gt_boxes])
            roi_labels = np.concatenate([result["labels"].cpu().numpy() + 1, truth.labels])
            foreground = np.array(
                [
                    len(gt_boxes[truth.labels == label]) > 0 and _iou(roi, gt_boxes[truth.labels == label]).max() >= fg_iou_thresh
                    for roi, label in zip(rois, roi_labels)
                ],
                dtype=bool,
            )
            # numpy arrays pickle compactly: 200 RoIs take 3.2 kB a record (4 GB for ImageNet's 1.28M images)
            pool.append({**record, "rois": rois.astype(np.float32), "roi_foreground": foreground})
            num_foreground += int(foreground.sum())
            num_rois += len(rois)
    logger.info(
        "R-CNN training pool: %d RoIs (%d foreground) from %d images", num_rois, num_foreground, len(pool)
    )
    return DetectionDataset(
        name=f"{dataset.name}_rcnn_rois",
        records=pool,
        class_names=list(dataset.class_names),
        category_ids=list(dataset.category_ids),
        extra=dict(dataset.extra),
    )


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Continuous-coordinate IoU of one (4,) box with (M, 4) boxes."""
    widths = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    heights = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = widths * heights
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-12)


IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


def image_files(directory: str | Path) -> list[Path]:
    """The image files directly in `directory` (JPEG, PNG, BMP, WebP; symlinks to files included), sorted by file
    name; none when it is not a folder."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def image_folder_dataset(
    directory: str | Path, *, class_names: Sequence[str], on_bad_image: str = "error"
) -> DetectionDataset:
    """Every image file directly in `directory` (JPEG, PNG, BMP, WebP), sorted by file name (the devkit's order),
    as records without annotations; the image id is the file name without extension. Sizes come from the headers.

    An image whose header cannot be read (an empty file, a corrupt header) stops here with an error naming it, or
    with ``on_bad_image="skip"`` keeps its place as a record with ``unreadable`` (the message) and a 0x0 size,
    which `OriginalImageMapper` reports as a bad image, so that the loader skips it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"image folder not found: {directory}")
    files = image_files(directory)
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {directory}")
    records = []
    for path in files:
        record = {"file_name": str(path), "image_id": path.stem}
        try:
            with Image.open(path) as image:
                width, height = image.size
        except Exception as error:  # PIL raises OSError, but also ValueError, SyntaxError, struct.error, ...
            message = f"cannot read the image header of {path}: {' '.join(str(error).split()) or type(error).__name__}"
            if on_bad_image != "skip":
                raise ValueError(f"{message} (DATALOADER.ON_BAD_IMAGE=skip leaves its line empty)") from None
            record.update(height=0, width=0, unreadable=message)
        else:
            record.update(height=height, width=width)
        records.append(record)
    stems = [r["image_id"] for r in records]
    if len(set(stems)) != len(stems):
        duplicate = next(s for s in stems if stems.count(s) > 1)
        raise ValueError(f"two images in {directory} have the id {duplicate!r} (same name, other extension)")
    return DetectionDataset(
        name=str(directory), records=records, class_names=list(class_names), category_ids=list(range(1, len(class_names) + 1))
    )


def localize_images(
    localizer: Localizer, data_loader, *, progress: bool = True
) -> tuple[list[str], list[tuple[np.ndarray, np.ndarray]]]:
    """The submission lines of every image of `data_loader` (`build_localization_test_loader`): the image ids and,
    per image, (1-based labels (K,), inclusive integer boxes (K, 4)) in original pixels."""
    image_ids, lines = [], []
    with torch.inference_mode():
        for inputs in tqdm(data_loader, desc="localize", disable=None if progress else True):
            inputs = [x for x in inputs if "bad_image" not in x]  # reported by the loader; left out
            if not inputs:
                continue
            for x, out in zip(inputs, localizer(inputs)):
                image_ids.append(image_key(x["image_id"]))
                lines.append(
                    (
                        out["classes"].cpu().numpy().astype(np.int64) + 1,
                        inclusive_boxes(out["boxes"].cpu().numpy(), width=x["width"], height=x["height"]),
                    )
                )
    return image_ids, lines
