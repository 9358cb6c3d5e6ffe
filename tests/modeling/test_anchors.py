import math

import pytest
import torch

from detectron_res.modeling.rpn import AnchorGenerator, make_cell_anchors


def test_cell_anchors_keep_area_and_ratio():
    anchors = make_cell_anchors([32, 64], [0.5, 1.0, 2.0])
    assert anchors.shape == (6, 4)
    widths = anchors[:, 2] - anchors[:, 0]
    heights = anchors[:, 3] - anchors[:, 1]
    torch.testing.assert_close(widths * heights, torch.tensor([32.0**2] * 3 + [64.0**2] * 3))
    torch.testing.assert_close(heights / widths, torch.tensor([0.5, 1.0, 2.0, 0.5, 1.0, 2.0]))
    # centred on the origin; the 32-px, ratio-0.5 anchor is sqrt(2048) wide
    torch.testing.assert_close(anchors[:, :2] + anchors[:, 2:], torch.zeros(6, 2))
    assert anchors[0, 2].item() == pytest.approx(math.sqrt(2048) / 2)


def test_anchor_grid_order_is_height_width_anchor():
    generator = AnchorGenerator(sizes=[16], aspect_ratios=[1.0, 2.0], stride=16)
    anchors = generator((2, 3))  # H = 2, W = 3, A = 2
    assert generator.num_anchors == 2
    assert anchors.shape == (2 * 3 * 2, 4)
    grid = anchors.view(2, 3, 2, 4)
    # the square anchor of cell (y=1, x=2) is centred on (32, 16)
    torch.testing.assert_close(grid[1, 2, 0], torch.tensor([24.0, 8.0, 40.0, 24.0]))
    # moving one cell right shifts x by the stride, keeping the anchor shape
    torch.testing.assert_close(grid[0, 1] - grid[0, 0], torch.tensor([[16.0, 0.0, 16.0, 0.0]] * 2))
    torch.testing.assert_close(grid[1, 0] - grid[0, 0], torch.tensor([[0.0, 16.0, 0.0, 16.0]] * 2))
