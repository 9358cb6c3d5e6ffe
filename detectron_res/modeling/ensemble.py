"""An ensemble of detectors (the paper's COCO 2015 entry combined three). Every model runs its trunk and RPN on the
same inputs; the Fast R-CNN stage is then merged in one of two ways (`ENSEMBLE_MERGES`):

- "average" (the paper's: "the union set of proposals are processed by an ensemble of per-region classifiers"):
  each RoI of the union of all models' proposals is classified and regressed by every model, and the models'
  class probabilities and decoded class-specific boxes are averaged per RoI; the averaged predictions then go
  through the post-processing once (box refinement's second pass, also averaged; per-class NMS; top-k; voting).
- "nms": each model's (RoI, class) candidates, on its own proposals or on the union, are pooled and go through one
  per-class NMS (with box voting when on). Not in the paper; kept as an alternative.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .detector import FasterRCNN
from .roi_heads.res5_head import refined_candidates
from .test_time import FeaturePyramid

ENSEMBLE_MERGES = ("average", "nms")

# one model's Fast R-CNN stage at test time: per-image boxes (input pixels) -> per image, class probabilities
# (R_i, K) and class-specific boxes (R_i, K, 4), as `Res5ROIHeads.predict` gives them
Predictor = Callable[[list[Tensor]], tuple[list[Tensor], list[Tensor]]]


def average_predictions(per_model: Sequence[tuple[list[Tensor], list[Tensor]]]) -> tuple[list[Tensor], list[Tensor]]:
    """Per model, per image: class probabilities (R_i, K) and class-specific boxes (R_i, K, 4) for the same RoIs ->
    per image, their means over the models (the same RoI's predictions combined, as flip testing combines two
    views)."""
    probs = [torch.stack(per_image).mean(dim=0) for per_image in zip(*(p for p, _ in per_model))]
    boxes = [torch.stack(per_image).mean(dim=0) for per_image in zip(*(b for _, b in per_model))]
    return probs, boxes


class DetectorEnsemble(nn.Module):
    def __init__(
        self, *, models: Sequence[FasterRCNN], shared_proposals: bool = False, merge: str | None = None
    ):
        """
        Args:
            models: detectors with the same classes; they may differ in anything else (depth, global context, ...).
                Each pools with its own `test_time` (scales, flip); the merge's refinement, NMS, top-k and voting
                are the first model's.
            shared_proposals: each model classifies the union of all models' proposals instead of its own.
            merge: "average" (the paper's per-RoI ensemble; needs `shared_proposals` when there are several models)
                or "nms" (all models' candidates through one NMS); None = "average" with shared proposals, else
                "nms".
        """
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        classes = {model.roi_heads.num_classes for model in models}
        if len(classes) > 1:
            raise ValueError(f"the models of an ensemble must have the same classes, got {sorted(classes)} classes")
        merge = ("average" if shared_proposals else "nms") if merge is None else merge
        if merge not in ENSEMBLE_MERGES:
            raise ValueError(f"the ensemble merge must be one of {list(ENSEMBLE_MERGES)}, got {merge!r}")
        if merge == "average" and not shared_proposals and len(models) > 1:
            raise ValueError(
                "the 'average' merge combines every model's predictions for the same RoIs, so the models must share "
                "their proposals (the union: --proposals union); on their own proposals use the 'nms' merge"
            )
        self.models = nn.ModuleList(models)
        self.shared_proposals = shared_proposals
        self.merge = merge

    @torch.no_grad()
    def forward(self, batched_inputs: list[dict]) -> list[dict[str, Tensor]]:
        """Detections per image in original image pixels, as `FasterRCNN.inference` returns them."""
        models: list[FasterRCNN] = list(self.models)  # type: ignore[arg-type]
        prepared = [model.prepare(batched_inputs) for model in models]
        proposals = [model.propose(p) for model, p in zip(models, prepared)]
        if self.shared_proposals and len(models) > 1:
            union = [torch.cat(per_model) for per_model in zip(*proposals)]  # per image: (sum over models R_m, 4)
            proposals = [union] * len(models)
        if self.merge == "average":
            merged = self.averaged_candidates(batched_inputs, prepared, proposals[0])
        else:
            candidates = [
                model.detection_candidates(batched_inputs, p, boxes)
                for model, p, boxes in zip(models, prepared, proposals)
            ]
            merged = [
                {key: torch.cat([per_model[key] for per_model in per_image]) for key in ("boxes", "scores", "labels")}
                for per_image in zip(*candidates)
            ]
        return models[0].rescale(batched_inputs, prepared[0], models[0].select_detections(merged))

    def averaged_candidates(
        self, batched_inputs: list[dict], prepared: list, proposals: list[Tensor]
    ) -> list[dict[str, Tensor]]:
        """The "average" merge of `averaged_candidates` for the models: each predicts from its own res4 maps (its
        trunk, with its own scales and flip), under its own inference precision."""
        models: list[FasterRCNN] = list(self.models)  # type: ignore[arg-type]
        image_sizes = prepared[0].image_sizes

        def predictor(model: FasterRCNN, pyramid: FeaturePyramid) -> Predictor:
            options = {"flip": model.test_time.flip, "reference_size": model.test_time.reference_size}

            def predict(boxes: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
                with model.inference_precision():
                    return model.roi_heads.predict(pyramid, boxes, image_sizes, **options)

            return predict

        predictors = [predictor(m, m.feature_pyramid(batched_inputs, p)) for m, p in zip(models, prepared)]
        first = models[0]
        return averaged_candidates(
            predictors,
            proposals,
            refine=first.test_time.refine_nms_thresh is not None,
            score_thresh=first.roi_heads.predictor.score_thresh,
            empty_boxes=first.roi_heads.predictor.empty_boxes,
        )


def averaged_candidates(
    predictors: Sequence[Predictor], proposals: list[Tensor], *, refine: bool, score_thresh: float, empty_boxes: str
) -> list[dict[str, Tensor]]:
    """The paper's ensemble of per-region classifiers: every predictor (one per model: per-image boxes -> class
    probabilities (R_i, K) and class-specific boxes (R_i, K, 4)) predicts every RoI of `proposals`, the predictions
    are averaged per RoI (`average_predictions`), and the (RoI, class) candidates are taken from the averages as
    for one model (`refined_candidates`; with `refine`, the second pass pools each RoI's averaged box of its top
    class, again in every model)."""
    return refined_candidates(
        lambda boxes: average_predictions([predict(boxes) for predict in predictors]),
        proposals,
        refine=refine,
        score_thresh=score_thresh,
        empty_boxes=empty_boxes,
    )
