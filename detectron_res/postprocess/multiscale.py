"""Multi-scale testing (Appendix B, after SPPnet and Networks on Convolutional Feature Maps): the shapes of the image
pyramid, and which two adjacent scales each RoI is pooled at before their features are merged by maxout."""

from __future__ import annotations

import torch
from torch import Tensor


def pyramid_max_size(scale: int, *, min_size: int, max_size: int) -> int:
    """Longer-side cap of pyramid scale `scale` (a shorter side): `max_size` scaled like the shorter side
    `min_size` -> `scale` (1000 with 600 / 1000 gives 1667), so every scale keeps the test image's proportions."""
    return int(max_size * scale / min_size + 0.5)


def adjacent_scale_pairs(areas: Tensor, *, reference_area: float) -> Tensor:
    """The two adjacent pyramid scales each RoI is pooled at.

    SPPnet's rule picks the one scale at which a RoI's area is closest to 224 x 224 pixels; with two scales merged
    by maxout, each RoI takes the adjacent pair between which its area crosses `reference_area`: the last scale
    where it is smaller and the first where it is at least as large. That pair always holds the closest scale, and
    its neighbour is the one on the other side of the reference. A RoI larger than the reference at every scale
    takes the two smallest scales; one smaller at every scale, the two largest; with one scale, both are it.

    Args:
        areas: (R, S) area of each RoI at each scale, scales in increasing order.
        reference_area: 224 * 224 in the paper.
    Returns:
        (R, 2) int64 scale indices (lower, upper), equal only when S == 1.
    """
    num_scales = areas.shape[1]
    if num_scales == 0:
        raise ValueError("adjacent_scale_pairs needs at least one scale")
    first_large = (areas < reference_area).sum(dim=1)  # (R,) index of the first scale where the area >= reference
    lower = (first_large - 1).clamp(min=0, max=max(num_scales - 2, 0))
    upper = (lower + 1).clamp(max=num_scales - 1)
    return torch.stack([lower, upper], dim=1)
