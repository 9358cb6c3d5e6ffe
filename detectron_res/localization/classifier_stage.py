"""An image classifier for the localization system's predicted classes, trained with the same engine and crops.

The paper takes its classes from a separate ResNet-101 classification network (14.4% top-5 LOC error with predicted
classes, Table 13). The class-specific RPN's own image-level scores are no substitute: its logistic outputs are
trained only for the classes present in an image (docs/localization.md). On ImageNet, pass a trained torchvision
classifier (`LOC.CLASSIFIER.WEIGHTS`, `tools/localize.py --classifier`); where none exists (the synthetic data set),
this stage trains a torchvision ResNet on the RPN stage's random crops and saves a plain torchvision state_dict,
which `TorchvisionClassifier` then runs with the usual resize + center crop (or 10-crop) test.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's classification convention: 0-1 pixels, then these
IMAGENET_STD = (0.229, 0.224, 0.225)


class CropClassifier(nn.Module):
    """`net` (a torchvision ResNet) on uint8 crops normalised as torchvision's classifiers expect; trained with
    cross-entropy on each crop's first image class (``image_classes[0]``)."""

    def __init__(self, *, net: torchvision.models.ResNet):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def forward(self, batched_inputs: list[dict]) -> dict[str, Tensor] | Tensor:
        """Training: {"loss_cls"}; inference: class logits (N, C) of the (equal-sized) images."""
        images = torch.stack([x["image"] for x in batched_inputs]).to(self.device).float() / 255.0
        logits = self.net((images - self.mean) / self.std)
        if not self.training:
            return logits
        targets = torch.stack([x["image_classes"][0] for x in batched_inputs]).to(self.device).long()
        return {"loss_cls": F.cross_entropy(logits, targets)}


def build_crop_classifier(*, depth: int, num_classes: int) -> CropClassifier:
    if depth not in (18, 34, 50, 101, 152):
        raise ValueError(f"LOC.CLASSIFIER.DEPTH must be a torchvision ResNet depth (18/34/50/101/152), got {depth}")
    return CropClassifier(net=getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=num_classes))
