"""What the Fast R-CNN stage does at test time beyond one pass over the proposals (the paper's Appendix B), and the
res4 maps it pools from: one per pyramid scale, unflipped or mirrored, each computed when first needed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor


@dataclass(frozen=True)
class TestTimeAugmentation:
    """The test-time add-ons; the default is plain single-scale inference.

    Attributes:
        scales: shorter sides of the image pyramid the Fast R-CNN stage runs on, increasing (the inputs carry the
            resized images under "pyramid", see `DatasetMapper`); () = the input image only. Each RoI is pooled at
            two adjacent scales (`adjacent_scale_pairs`) and the two res5 features are merged by element-wise max.
        reference_size: the RoI side (in pixels at a scale) the scale choice aims for, 224 in SPPnet.
        flip: also run the Fast R-CNN stage on the mirrored images and average each RoI's class probabilities and
            (mirrored back) class-specific boxes over both.
        refine_nms_thresh: box refinement when not None: each RoI's regressed box of its top class is pooled and
            predicted again; both passes' predictions go to the per-class NMS, at this IoU.
        vote_iou_thresh: box voting when not None: each detection kept by the NMS becomes the score-weighted mean
            of the candidate boxes of its class overlapping it by at least this IoU.
    """

    __test__ = False  # not a pytest test class despite the name

    scales: tuple[int, ...] = ()
    reference_size: int = 224
    flip: bool = False
    refine_nms_thresh: float | None = None
    vote_iou_thresh: float | None = None


class ScaledFeatures(NamedTuple):
    """res4 features of a batch at one scale: (N, C4, H, W), and each image's (height, width) at that scale."""

    features: Tensor
    image_sizes: list[tuple[int, int]]


class FeaturePyramid:
    """The res4 maps of one batch at each scale, unflipped and mirrored. `compute(scale_index, flipped)` runs the
    trunk; each map is computed on first use and kept for the batch (a second pass such as box refinement reuses
    it), so the trunk's activations exist for one scale at a time and unused scales cost nothing.

    Args:
        scale_sizes: for each scale, each image's (height, width) at that scale.
        compute: the res4 features of the batch at a scale, mirrored or not.
    """

    def __init__(
        self, *, scale_sizes: list[list[tuple[int, int]]], compute: Callable[[int, bool], ScaledFeatures]
    ):
        self.scale_sizes = scale_sizes
        self._compute = compute
        self._maps: dict[tuple[int, bool], ScaledFeatures] = {}

    @property
    def num_scales(self) -> int:
        return len(self.scale_sizes)

    @classmethod
    def single(cls, features: Tensor, image_sizes: list[tuple[int, int]]) -> FeaturePyramid:
        """The one scale of already computed features (no mirrored maps)."""

        def compute(scale_index: int, flipped: bool) -> ScaledFeatures:
            if flipped:
                raise ValueError("this feature pyramid holds no mirrored features")
            return ScaledFeatures(features, image_sizes)

        return cls(scale_sizes=[image_sizes], compute=compute)

    def __call__(self, scale_index: int, flipped: bool = False) -> ScaledFeatures:
        key = (scale_index, flipped)
        if key not in self._maps:
            self._maps[key] = self._compute(scale_index, flipped)
        return self._maps[key]
