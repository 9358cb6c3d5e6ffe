"""ROIPooler values on feature maps whose pooled values can be worked out by hand.

Bilinear interpolation of a function that is linear in x (or y) is exact, so RoIAlign of f(y, x) = x returns the
mean x coordinate of each bin's samples, i.e. the bin centre. With aligned=True (detectron2's ROIAlignV2) a box
edge at input pixel X maps to feature coordinate X * scale - 0.5; with aligned=False to X * scale.
"""

import pytest
import torch

from detectron_res.layers import ROIPooler


def coordinate_features() -> torch.Tensor:
    """(2, 2, 6, 8): channel 0 is x (0..7), channel 1 is y (0..5); image 1 is image 0 + 100."""
    ys, xs = torch.meshgrid(torch.arange(6.0), torch.arange(8.0), indexing="ij")
    image = torch.stack([xs, ys])
    return torch.stack([image, image + 100.0])


def test_roi_align_is_half_pixel_aligned():
    pooler = ROIPooler(kind="ROIAlign", output_size=2, spatial_scale=1 / 16)
    boxes = [torch.tensor([[16.0, 16.0, 80.0, 48.0]]), torch.zeros((0, 4))]
    pooled = pooler(coordinate_features(), boxes)
    assert pooled.shape == (1, 2, 2, 2)
    # x: 16/16 - 0.5 = 0.5 .. 80/16 - 0.5 = 4.5, two bins 2 wide -> centres 1.5, 3.5
    # y: 16/16 - 0.5 = 0.5 .. 48/16 - 0.5 = 2.5, two bins 1 high -> centres 1.0, 2.0
    # (aligned=False would give x centres 2, 4 and y centres 1.5, 2.5)
    torch.testing.assert_close(pooled[0, 0], torch.tensor([[1.5, 3.5], [1.5, 3.5]]))
    torch.testing.assert_close(pooled[0, 1], torch.tensor([[1.0, 1.0], [2.0, 2.0]]))


@pytest.mark.parametrize("kernel", ["bag", "torchvision"])
def test_roi_align_without_the_half_pixel_shift(kernel):
    # aligned=False (Detectron's RoIAlign): the box maps to x 1 .. 5 (two bins 2 wide, centres 2 and 4) and y 1 .. 3
    # (centres 1.5 and 2.5)
    pooler = ROIPooler(kind="ROIAlign", output_size=2, spatial_scale=1 / 16, aligned=False, roi_align_kernel=kernel)
    pooled = pooler(coordinate_features(), [torch.tensor([[16.0, 16.0, 80.0, 48.0]]), torch.zeros((0, 4))])
    torch.testing.assert_close(pooled[0, 0], torch.tensor([[2.0, 4.0], [2.0, 4.0]]))
    torch.testing.assert_close(pooled[0, 1], torch.tensor([[1.5, 1.5], [2.5, 2.5]]))


def test_roi_align_takes_each_box_from_its_own_image():
    pooler = ROIPooler(kind="ROIAlign", output_size=1, spatial_scale=0.5)
    boxes = [torch.tensor([[2.0, 2.0, 6.0, 4.0]]), torch.tensor([[2.0, 2.0, 6.0, 4.0], [4.0, 6.0, 12.0, 10.0]])]
    pooled = pooler(coordinate_features(), boxes)
    # one bin: the RoI centre; box (2, 2, 6, 4) at scale 0.5 -> x 1 - 0.5 .. 3 - 0.5, centre x 1.5, y centre 1.0;
    # box (4, 6, 12, 10) -> x 1.5 .. 5.5, centre 3.5; y 2.5 .. 4.5, centre 3.5
    expected = torch.tensor([[1.5, 1.0], [101.5, 101.0], [103.5, 103.5]])
    torch.testing.assert_close(pooled[:, :, 0, 0], expected)


def test_roi_align_default_sampling_is_adaptive():
    # f(x) = x**2 on the pixel grid; bilinear interpolation is the piecewise linear interpolant, so the value
    # depends on where the samples are. One bin covering x 0.5 .. 4.5 (box 16..80 at 1/16): the adaptive sampling
    # ratio is ceil(4 / 1) = 4 samples at x = 1, 2, 3, 4 -> (1 + 4 + 9 + 16) / 4 = 7.5; one sample (ratio 1) at
    # x = 2.5 would give 4 + 0.5 * (9 - 4) = 6.5.
    xs = torch.arange(8.0) ** 2
    features = xs.expand(1, 1, 6, 8).contiguous()
    box = [torch.tensor([[16.0, 16.0, 80.0, 48.0]])]
    adaptive = ROIPooler(kind="ROIAlign", output_size=1, spatial_scale=1 / 16)(features, box)
    assert adaptive.item() == pytest.approx(7.5)
    one_sample = ROIPooler(kind="ROIAlign", output_size=1, spatial_scale=1 / 16, sampling_ratio=1)(features, box)
    assert one_sample.item() == pytest.approx(6.5)


def test_roi_pool_takes_the_max_of_quantised_bins():
    pooler = ROIPooler(kind="ROIPool", output_size=2, spatial_scale=1 / 16)
    boxes = [torch.zeros((0, 4)), torch.tensor([[16.0, 16.0, 80.0, 48.0]])]
    pooled = pooler(coordinate_features(), boxes)
    # x: round(1) .. round(5) -> 5 columns 1..5, bins of 2.5: [1, 1+ceil(2.5)) = 1..3 -> max 3; [1+2, 1+5) -> max 5
    # y: 1 .. 3 -> 3 rows, bins of 1.5: [1, 1+ceil(1.5)) = 1..2 -> max 2; [1+1, 1+3) = 2..3 -> max 3
    torch.testing.assert_close(pooled[0, 0], torch.tensor([[103.0, 105.0], [103.0, 105.0]]))
    torch.testing.assert_close(pooled[0, 1], torch.tensor([[102.0, 102.0], [103.0, 103.0]]))


@pytest.mark.parametrize("kind", ["ROIAlign", "ROIPool"])
def test_boxes_of_another_dtype_are_cast_to_the_features_dtype(kind):
    pooler = ROIPooler(kind=kind, output_size=1, spatial_scale=0.5)
    pooled = pooler(coordinate_features(), [torch.tensor([[2.0, 2.0, 6.0, 4.0]], dtype=torch.float64), torch.zeros((0, 4))])
    assert pooled.dtype == torch.float32 and pooled.shape == (1, 2, 1, 1)


def test_no_boxes_gives_an_empty_batch_of_the_output_size():
    pooler = ROIPooler(kind="ROIAlign", output_size=3, spatial_scale=1 / 16)
    pooled = pooler(coordinate_features(), [torch.zeros((0, 4)), torch.zeros((0, 4))])
    assert pooled.shape == (0, 2, 3, 3) and pooled.dtype == torch.float32


def test_unknown_kind_and_repr():
    with pytest.raises(ValueError, match="Unknown RoI pooler 'ROIMax'; expected one of"):
        ROIPooler(kind="ROIMax", output_size=7, spatial_scale=1 / 16)
    pooler = ROIPooler(kind="ROIPool", output_size=7, spatial_scale=0.0625)
    assert pooler.kind == "ROIPool" and pooler.output_size == (7, 7) and pooler.sampling_ratio == 0
    assert repr(pooler) == (
        "ROIPooler(kind=ROIPool, output_size=(7, 7), spatial_scale=0.0625, aligned=True, roi_align_kernel=auto)"
    )
    with pytest.raises(ValueError, match="Unknown RoIAlign kernel 'fast'; expected one of"):
        ROIPooler(kind="ROIAlign", output_size=7, spatial_scale=1 / 16, roi_align_kernel="fast")
