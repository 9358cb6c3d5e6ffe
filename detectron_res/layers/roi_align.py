"""RoIAlign as a weighted sum of feature vectors, for the CPU.

Each output bin of RoIAlign is the average of its bilinear samples, and each sample is a weighted sum of 4 feature
vectors, so a bin is a "bag" of (row, column) positions of the map with weights. `F.embedding_bag` computes every bin
of every RoI in one call from the map's (N*H*W, C) channels-last view, whose rows are contiguous vectors of C
values: vectorised over channels, spread over all threads, and its backward is one scatter of the same weights.
torchvision's CPU kernel computes the same sums one channel plane at a time on one thread, and its backward on one
thread too (R50-C4 on 2 cores: 0.3-0.65 s forward for 300 RoIs, 8 s backward for 1536, against 0.1-0.17 s and
0.5 s here; docs/benchmarks.md).

The sampling follows torchvision's `roi_align_kernel.cpp` step for step (the same coordinates, grid sizes, border
rules and weights, computed in the same order), so the results agree with `torchvision.ops.roi_align` to float
rounding: only the order of the additions differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# most (RoI, bin, sample, tap) entries built at once; more RoIs are pooled in several calls
MAX_TAPS_PER_CALL = 8_000_000


def roi_align(
    features: Tensor,
    rois: Tensor,
    *,
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """`torchvision.ops.roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)` for square
    outputs.

    Args:
        features: (N, C, H, W) maps (any memory format; channels-last needs no copy).
        rois: (R, 5) rows [image index, x1, y1, x2, y2] in input pixels.
        output_size: side S of the pooled features.
        spatial_scale: map pixels per input pixel (1/16 for res4).
        sampling_ratio: samples per bin side; 0 = ceil(RoI side / S) for each RoI, as torchvision.
        aligned: shift the box by half a map pixel (detectron2's ROIAlignV2) instead of the legacy rounding-free
            Fast R-CNN convention, where RoIs are at least 1 map pixel wide.
    Returns:
        (R, C, S, S) in channels-last memory format.
    """
    num_images, channels, height, width = features.shape
    if len(rois) == 0:
        return features.new_zeros((0, channels, output_size, output_size))
    coords_dtype = features.dtype if features.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        boxes = rois[:, 1:].to(coords_dtype) * spatial_scale - (0.5 if aligned else 0.0)
        starts_y, starts_x = boxes[:, 1], boxes[:, 0]
        heights, widths = boxes[:, 3] - starts_y, boxes[:, 2] - starts_x
        if not aligned:
            heights, widths = heights.clamp(min=1.0), widths.clamp(min=1.0)
        if sampling_ratio > 0:
            grid_y = torch.full_like(heights, sampling_ratio, dtype=torch.int64)
            grid_x = grid_y
        else:
            grid_y = torch.ceil(heights / output_size).long()
            grid_x = torch.ceil(widths / output_size).long()
        most_y, most_x = max(int(grid_y.max()), 1), max(int(grid_x.max()), 1)
    table = features.permute(0, 2, 3, 1).reshape(num_images * height * width, channels)  # (N*H*W, C)
    per_call = max(1, MAX_TAPS_PER_CALL // (output_size * output_size * most_y * most_x * 4))
    pooled = []
    for begin in range(0, len(rois), per_call):
        part = slice(begin, begin + per_call)
        with torch.no_grad():
            positions, weights, bag_starts = _bags(
                image_index=rois[part, 0].long(),
                axes=(
                    _axis_samples(starts_y[part], heights[part], grid_y[part], most_y, size=height, bins=output_size),
                    _axis_samples(starts_x[part], widths[part], grid_x[part], most_x, size=width, bins=output_size),
                ),
                count=(grid_y[part] * grid_x[part]).clamp(min=1),
                map_size=(height, width),
            )
        # (R' * S * S, C): each bin's weighted sum of feature rows
        pooled.append(
            F.embedding_bag(positions, table, bag_starts, mode="sum", per_sample_weights=weights.to(table.dtype))
        )
    pooled = pooled[0] if len(pooled) == 1 else torch.cat(pooled)
    return pooled.view(len(rois), output_size, output_size, channels).permute(0, 3, 1, 2)  # (R, C, S, S)


def _axis_samples(
    starts: Tensor, lengths: Tensor, grid: Tensor, most: int, *, size: int, bins: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Along one axis of the map (`size` pixels), the sample points of each RoI's `bins` bins, `grid` per bin
    (padded to `most`): the two neighbouring pixels, their interpolation weights and whether the sample counts.
    All (R, bins, most); the rules of torchvision's `bilinear_interpolate`."""
    bin_size = (lengths / bins)[:, None, None]
    index = torch.arange(bins, dtype=starts.dtype, device=starts.device)[None, :, None]
    sample = torch.arange(most, dtype=starts.dtype, device=starts.device)[None, None, :]
    per_bin = grid.clamp(min=1).to(starts.dtype)[:, None, None]
    coord = starts[:, None, None] + index * bin_size + (sample + 0.5) * bin_size / per_bin  # (R, bins, most)
    used = (sample < grid[:, None, None]) & (coord >= -1.0) & (coord <= size)  # outside [-1, size]: no contribution
    coord = coord.clamp(min=0.0)
    low = coord.floor().long()
    at_end = low >= size - 1  # the last pixel is taken whole
    low = torch.where(at_end, size - 1, low)
    high = torch.where(at_end, low, low + 1)
    frac = torch.where(at_end, 0.0, coord - low)
    return low, high, 1.0 - frac, frac, used


def _bags(
    *,
    image_index: Tensor,
    axes: tuple[tuple[Tensor, ...], tuple[Tensor, ...]],
    count: Tensor,
    map_size: tuple[int, int],
) -> tuple[Tensor, Tensor, Tensor]:
    """The embedding-bag inputs of R RoIs: the flat map positions and weights of every bin's taps, bin after bin
    ((R, S, S) order), and where each bin's taps start."""
    (y_low, y_high, y_wlow, y_whigh, y_used), (x_low, x_high, x_wlow, x_whigh, x_used) = axes
    height, width = map_size
    # taps of one sample, in torchvision's order: (low, low), (low, high), (high, low), (high, high)
    rows = torch.stack([y_low, y_low, y_high, y_high], dim=-1)  # (R, S, Gy, 4)
    row_weights = torch.stack([y_wlow, y_wlow, y_whigh, y_whigh], dim=-1)
    cols = torch.stack([x_low, x_high, x_low, x_high], dim=-1)  # (R, S, Gx, 4)
    col_weights = torch.stack([x_wlow, x_whigh, x_wlow, x_whigh], dim=-1)
    # (R, Sy, Sx, Gy, Gx, 4): bin (Sy, Sx), sample (Gy, Gx), tap
    offset = (image_index * (height * width))[:, None, None, None, None, None]
    positions = offset + rows[:, :, None, :, None, :] * width + cols[:, None, :, None, :, :]
    weights = row_weights[:, :, None, :, None, :] * col_weights[:, None, :, None, :, :]
    weights = weights / count.to(weights.dtype)[:, None, None, None, None, None]
    used = (y_used[:, :, None, :, None] & x_used[:, None, :, None, :])[..., None].expand(positions.shape)
    taps_per_bin = used.flatten(start_dim=3).sum(dim=3).flatten()  # (R * S * S,)
    bag_starts = torch.cumsum(taps_per_bin, dim=0) - taps_per_bin
    return positions[used], weights[used], bag_starts
