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


def test_cell_anchor_coordinates_sizes_outer_ratios_inner():
    anchors = make_cell_anchors([16, 32], [0.25, 1.0])
    # size 16, ratio h/w 0.25: w = sqrt(256 / 0.25) = 32, h = 8; size 32, ratio 0.25: w = sqrt(1024 / 0.25) = 64, h = 16
    expected = torch.tensor(
        [
            [-16.0, -4.0, 16.0, 4.0],
            [-8.0, -8.0, 8.0, 8.0],
            [-32.0, -8.0, 32.0, 8.0],
            [-16.0, -16.0, 16.0, 16.0],
        ]
    )
    torch.testing.assert_close(anchors, expected)
    assert anchors.dtype == torch.float32


def test_anchor_generator_exact_grid_with_offset():
    generator = AnchorGenerator(sizes=[8], aspect_ratios=[1.0, 4.0], stride=16, offset=0.5)
    # ratio 4: w = sqrt(64 / 4) = 4, h = 16; centres at ((x + 0.5) * 16, (y + 0.5) * 16) = (8 | 24, 8 | 24 | 40)
    anchors = generator((3, 2))
    expected = []
    for cy in (8.0, 24.0, 40.0):
        for cx in (8.0, 24.0):
            expected += [[cx - 4, cy - 4, cx + 4, cy + 4], [cx - 2, cy - 8, cx + 2, cy + 8]]
    torch.testing.assert_close(anchors, torch.tensor(expected))
    assert generator.offset == 0.5 and generator.stride == 16


def test_anchor_generator_default_offset_puts_the_first_centre_on_the_corner():
    generator = AnchorGenerator(sizes=[32], aspect_ratios=[1.0], stride=16)
    anchors = generator((1, 2))
    torch.testing.assert_close(anchors, torch.tensor([[-16.0, -16.0, 16.0, 16.0], [0.0, -16.0, 32.0, 16.0]]))


def test_cell_anchors_are_a_buffer_outside_the_state_dict():
    generator = AnchorGenerator(sizes=[32, 64], aspect_ratios=[0.5, 1.0, 2.0], stride=16)
    assert generator.num_anchors == 6
    assert "cell_anchors" in dict(generator.named_buffers())
    assert generator.state_dict() == {}  # derived from the config, never checkpointed


def test_anchors_are_made_on_the_module_device():
    # the meta device stands in for a GPU: anchors built on another device than the buffer would fail to add
    generator = AnchorGenerator(sizes=[16], aspect_ratios=[1.0], stride=16).to("meta")
    assert generator((2, 3)).device.type == "meta"


def test_anchors_are_float32_whatever_the_default_dtype():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        generator = AnchorGenerator(sizes=[16], aspect_ratios=[0.5, 1.0], stride=16)
        anchors = generator((2, 3))
    finally:
        torch.set_default_dtype(default)
    assert generator.cell_anchors.dtype == torch.float32 and anchors.dtype == torch.float32


def test_anchor_offset_comes_from_the_config():
    from detectron_res.config import get_default_config
    from detectron_res.modeling.build import build_rpn

    cfg = get_default_config()
    cfg.MODEL.RPN.ANCHOR_SIZES = [16]
    cfg.MODEL.RPN.ASPECT_RATIOS = [1.0]
    cfg.MODEL.RPN.ANCHOR_OFFSET = 0.5
    anchors = build_rpn(cfg, in_channels=4, stride=16).anchor_generator((1, 2))
    torch.testing.assert_close(anchors, torch.tensor([[0.0, 0.0, 16.0, 16.0], [16.0, 0.0, 32.0, 16.0]]))
