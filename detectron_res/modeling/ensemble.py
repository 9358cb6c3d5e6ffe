"""An ensemble of detectors (the paper's COCO 2015 entry combined three): every model runs on the same inputs, each
on its own proposals or on the union of all models' proposals, and the (RoI, class) candidates of all models go
through one per-class NMS (with box voting when on) together."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .detector import FasterRCNN


class DetectorEnsemble(nn.Module):
    def __init__(self, *, models: Sequence[FasterRCNN], shared_proposals: bool = False):
        """
        Args:
            models: detectors with the same classes; they may differ in anything else (depth, global context, ...).
                Each applies its own `test_time` add-ons; the merge uses the first model's NMS, top-k and voting.
            shared_proposals: each model classifies the union of all models' proposals (the paper's ensemble)
                instead of its own.
        """
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        classes = {model.roi_heads.num_classes for model in models}
        if len(classes) > 1:
            raise ValueError(f"the models of an ensemble must have the same classes, got {sorted(classes)} classes")
        self.models = nn.ModuleList(models)
        self.shared_proposals = shared_proposals

    @torch.no_grad()
    def forward(self, batched_inputs: list[dict]) -> list[dict[str, Tensor]]:
        """Detections per image in original image pixels, as `FasterRCNN.inference` returns them."""
        models: list[FasterRCNN] = list(self.models)  # type: ignore[arg-type]
        prepared = [model.prepare(batched_inputs) for model in models]
        proposals = [model.propose(p) for model, p in zip(models, prepared)]
        if self.shared_proposals and len(models) > 1:
            union = [torch.cat(per_model) for per_model in zip(*proposals)]  # per image: (sum over models R_m, 4)
            proposals = [union] * len(models)
        candidates = [
            model.detection_candidates(batched_inputs, p, boxes) for model, p, boxes in zip(models, prepared, proposals)
        ]
        merged = [
            {key: torch.cat([per_model[key] for per_model in per_image]) for key in ("boxes", "scores", "labels")}
            for per_image in zip(*candidates)
        ]
        return models[0].rescale(batched_inputs, prepared[0], models[0].select_detections(merged))
