"""`layers.roi_align` (the embedding-bag RoIAlign) against torchvision's kernel and hand-computed samples."""

import pytest
import torch
from torchvision.ops import roi_align as torchvision_roi_align

from detectron_res.layers import roi_align as roi_align_module
from detectron_res.layers.roi_align import roi_align


def random_case(seed: int = 0, dtype=torch.float64):
    """Two maps of (8, 20, 30) and 60 RoIs spread over and beyond a 480 x 320 input (some outside the map, one
    empty, one a single column), at scale 1/16."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 8, 20, 30, generator=generator, dtype=dtype)
    corners = torch.rand(60, 4, generator=generator, dtype=torch.float64) * 640 - 100
    rois = torch.cat(
        [
            torch.randint(0, 2, (60, 1), generator=generator).double(),
            torch.minimum(corners[:, :2], corners[:, 2:]),
            torch.maximum(corners[:, :2], corners[:, 2:]),
        ],
        dim=1,
    )
    rois[0, 1:] = torch.tensor([10.0, 10.0, 10.0, 50.0])  # zero width
    rois[1, 1:] = torch.tensor([500.0, 400.0, 700.0, 600.0])  # beyond the map: no sample counts
    rois[2, 1:] = torch.tensor([-40.0, 8.0, -20.0, 40.0])  # left of the map, partly within its 1-pixel margin
    return features, rois.to(dtype)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 2, 3])
def test_matches_torchvision_in_float64(aligned, sampling_ratio):
    features, rois = random_case()
    ours = roi_align(
        features, rois, output_size=7, spatial_scale=1 / 16, sampling_ratio=sampling_ratio, aligned=aligned
    )
    theirs = torchvision_roi_align(features, rois, 7, 1 / 16, sampling_ratio, aligned)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    assert ours[1].abs().max() == 0  # outside the map
    assert ours.is_contiguous(memory_format=torch.channels_last)


def test_gradient_matches_torchvision():
    features, rois = random_case(seed=1)
    upstream = torch.randn(len(rois), 8, 7, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = []
    for pool in (
        lambda x: roi_align(x, rois, output_size=7, spatial_scale=1 / 16, sampling_ratio=0, aligned=True),
        lambda x: torchvision_roi_align(x, rois, 7, 1 / 16, 0, True),
    ):
        x = features.clone().requires_grad_(True)
        pool(x).backward(upstream)
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)
    assert grads[0].abs().sum() > 0


def test_float32_channels_last_input_and_several_calls(monkeypatch):
    features, rois = random_case(seed=3, dtype=torch.float32)
    expected = torchvision_roi_align(features, rois, 14, 1 / 16, 0, True)
    monkeypatch.setattr(roi_align_module, "MAX_TAPS_PER_CALL", 5000)  # 1 RoI per call here
    ours = roi_align(
        features.contiguous(memory_format=torch.channels_last), rois, output_size=14, spatial_scale=1 / 16,
        sampling_ratio=0, aligned=True,
    )  # fmt: skip
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_hand_computed_samples():
    # map 1 x 1 x 3 x 4 with values 10 * y + x; one RoI (aligned=False, scale 1) from (0.5, 0.5) to (2.5, 1.5),
    # one bin, one sample at its centre (1.5, 1.0) -> 10 + 1.5
    features = (10 * torch.arange(3.0)[:, None] + torch.arange(4.0)[None, :])[None, None]
    rois = torch.tensor([[0.0, 0.5, 0.5, 2.5, 1.5]])
    out = roi_align(features, rois, output_size=1, spatial_scale=1.0, sampling_ratio=1, aligned=False)
    assert out.item() == pytest.approx(11.5)
    # 2 x 2 samples in the one bin of (0, 0)-(3, 2), aligned=True shifts by -0.5: x in -0.5..2.5, y in -0.5..1.5;
    # samples x = 0.25, 1.75 and y = 0.0, 1.0 -> mean x 1.0, mean y 0.5 -> 6.0
    out = roi_align(features, torch.tensor([[0.0, 0.0, 0.0, 3.0, 2.0]]), output_size=1, spatial_scale=1.0,
                    sampling_ratio=2, aligned=True)  # fmt: skip
    assert out.item() == pytest.approx(6.0)
    # a sample beyond the last row is clamped to it: y from 2.5 to 3.5 (aligned=False), one sample at y = 3.0
    # (inside the 1-pixel margin) reads row 2 -> 20 + x; x centre 1.0 -> 21
    out = roi_align(features, torch.tensor([[0.0, 0.5, 2.5, 1.5, 3.5]]), output_size=1, spatial_scale=1.0,
                    sampling_ratio=1, aligned=False)  # fmt: skip
    assert out.item() == pytest.approx(21.0)


def test_bfloat16_features_keep_float32_box_coordinates():
    features, rois = random_case(seed=4, dtype=torch.float32)
    rois[:, 1:] += 0.3  # coordinates bfloat16 cannot hold
    ours = roi_align(features.bfloat16(), rois, output_size=7, spatial_scale=1 / 16, sampling_ratio=0, aligned=True)
    expected = torchvision_roi_align(features.bfloat16().float(), rois, 7, 1 / 16, 0, True)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), expected, rtol=2e-2, atol=2e-2)


def test_no_rois():
    out = roi_align(torch.zeros(1, 5, 4, 4), torch.zeros(0, 5), output_size=3, spatial_scale=1.0, sampling_ratio=0,
                    aligned=True)  # fmt: skip
    assert out.shape == (0, 5, 3, 3)
