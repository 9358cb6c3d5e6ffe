"""Multi-scale testing's pure parts: the pyramid's longer-side caps and the pair of adjacent scales each RoI takes."""

import pytest
import torch

from detectron_res.postprocess import adjacent_scale_pairs, pyramid_max_size

PAPER_SCALES = [200, 400, 600, 800, 1000]


def areas_at_scales(side_at_600: float) -> torch.Tensor:
    """A square RoI of `side_at_600` pixels in the 600-px input: its area at each of the paper's scales."""
    return torch.tensor([[(side_at_600 * scale / 600) ** 2 for scale in PAPER_SCALES]])


@pytest.mark.parametrize(
    ("side", "pair"),
    [
        (100.0, [3, 4]),  # 167 px at 1000: still below 224, the two largest scales
        (300.0, [1, 2]),  # 100, 200 | 300 ...: crosses 224 between 400 and 600; closest is 400 (200 px)
        (200.0, [2, 3]),  # 200 at 600 | 267 at 800; closest is 600
        (336.0, [0, 1]),  # exactly 224 at 400: the first scale where it is not smaller is 400, paired with 200
        (600.0, [0, 1]),  # 200 at 200 | 400 at 400
        (1200.0, [0, 1]),  # 400 px even at 200: the two smallest scales
    ],
)
def test_each_roi_takes_the_adjacent_scales_around_224(side, pair):
    assert adjacent_scale_pairs(areas_at_scales(side), reference_area=224.0**2).tolist() == [pair]


def test_several_rois_at_once_and_a_single_scale():
    areas = torch.cat([areas_at_scales(100.0), areas_at_scales(300.0), areas_at_scales(1200.0)])
    assert adjacent_scale_pairs(areas, reference_area=224.0**2).tolist() == [[3, 4], [1, 2], [0, 1]]
    one_scale = torch.tensor([[10.0], [1e6]])
    assert adjacent_scale_pairs(one_scale, reference_area=224.0**2).tolist() == [[0, 0], [0, 0]]
    assert adjacent_scale_pairs(torch.zeros((0, 5)), reference_area=1.0).shape == (0, 2)
    with pytest.raises(ValueError, match="at least one scale"):
        adjacent_scale_pairs(torch.zeros((3, 0)), reference_area=1.0)


def test_the_longer_side_cap_scales_with_the_shorter_side():
    assert [pyramid_max_size(s, min_size=600, max_size=1000) for s in PAPER_SCALES] == [333, 667, 1000, 1333, 1667]
    assert pyramid_max_size(427, min_size=256, max_size=256) == 427


def test_no_scale_at_all_is_refused_with_the_whole_message():
    with pytest.raises(ValueError, match=r"^adjacent_scale_pairs needs at least one scale$"):
        adjacent_scale_pairs(torch.zeros((2, 0)), reference_area=224.0**2)
