"""The one sampling rule both toolkits are given for the training-step fixtures, instead of their random draws.

detectron2's `subsample_labels` and torchvision's `BalancedPositiveNegativeSampler` (used by detectron_res) take the
same number of positives (at most `positive_fraction` of `num_samples`) and fill the rest with negatives, each a
`torch.randperm` draw. Here the candidates are taken in a fixed pseudo-random order instead (sorted by a
multiplicative hash of their index), so that both pick the same anchors and RoIs without sharing a generator. The
labelling before the draw (anchor matching, RoI matching) stays each toolkit's own and is what the fixtures check.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fixed_order(indices: Tensor) -> Tensor:
    """`indices` (K,) int64 -> the same indices sorted by (index * 2654435761) mod 2**32 (Knuth's hash)."""
    keys = (indices.to(torch.int64) * 2654435761) % (2**32)
    return indices[torch.argsort(keys)]


def fixed_subsample_labels(labels: Tensor, num_samples: int, positive_fraction: float, bg_label: int):
    """detectron2's `subsample_labels` (same arguments, same counts) with `fixed_order` in place of randperm:
    returns the positive and negative indices taken."""
    positive = torch.nonzero((labels != -1) & (labels != bg_label)).flatten()
    negative = torch.nonzero(labels == bg_label).flatten()
    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)
    return fixed_order(positive)[:num_pos], fixed_order(negative)[:num_neg]


class FixedOrderSampler:
    """torchvision's `BalancedPositiveNegativeSampler` interface (a list of per-image label vectors, 1 positive,
    0 negative, -1 ignored -> lists of uint8 masks of the positives and negatives taken) with the rule of
    `fixed_subsample_labels`."""

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, matched_idxs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        positives, negatives = [], []
        for labels in matched_idxs:
            # torchvision's rule: >= 1 positive, == 0 negative; as detectron2's with bg_label 0 for labels in {-1, 0, 1}
            positive_idx, negative_idx = fixed_subsample_labels(
                torch.where(labels >= 1, 1, labels), self.batch_size_per_image, self.positive_fraction, 0
            )
            positive = torch.zeros_like(labels, dtype=torch.uint8)
            negative = torch.zeros_like(labels, dtype=torch.uint8)
            positive[positive_idx] = 1
            negative[negative_idx] = 1
            positives.append(positive)
            negatives.append(negative)
        return positives, negatives
