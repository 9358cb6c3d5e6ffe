"""ResNet for the C4 detector: the trunk (stem, res2..res4, stride 16) and res5, built from torchvision's blocks.

The trunk and res5 keep torchvision's module names (`conv1`, `bn1`, `layer1`..`layer3` in the trunk, `layer4` as
res5), so a torchvision ResNet state_dict maps onto them by prefix alone (see `weights.py`). A `width` other than
64 scales every stage (stem `width`, stage planes `width * (1, 2, 4, 8)`): the narrow trunks used to train from
scratch on CPU keep the exact stage layout of the full network.

Each convolution followed by a norm with fixed statistics (FrozenBN, in training too; BN in eval mode) runs as one
convolution with the norm folded into its weights and bias (`conv_norm`): the same function, and one pass over the
activations fewer, forward and backward. The folded weights are computed at each call (a few ms for R101), so
nothing is cached and a model switched between training and evaluation stays consistent.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.models import resnet as torchvision_resnet

from ...layers import FrozenBatchNorm2d, convert_frozen_batchnorm


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """`norm(conv(x))`; when the norm's statistics are fixed (FrozenBatchNorm2d always, BatchNorm2d outside
    training), one convolution with the norm folded in: weight * scale and a bias (the same to float rounding, with
    gradients to the convolution's weight as before)."""
    frozen = isinstance(norm, FrozenBatchNorm2d)
    evaluating = isinstance(norm, nn.BatchNorm2d) and not norm.training and norm.running_mean is not None
    if not (frozen or (evaluating and norm.affine)):
        return norm(conv(x))
    scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)  # FrozenBatchNorm2d's own arithmetic
    shift = norm.bias - norm.running_mean * scale
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    return conv._conv_forward(x, conv.weight * scale.view(-1, 1, 1, 1), shift)


class BasicBlock(torchvision_resnet.BasicBlock):
    """torchvision's block (the same modules and state_dict keys) whose norms with fixed statistics are folded into
    their convolutions (`conv_norm`)."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = conv_norm(self.conv2, self.bn2, out)
        out += x if self.downsample is None else conv_norm(self.downsample[0], self.downsample[1], x)
        return self.relu(out)


class Bottleneck(torchvision_resnet.Bottleneck):
    """torchvision's block (v1.5: stride in the 3x3 conv; the same modules and state_dict keys) whose norms with
    fixed statistics are folded into their convolutions (`conv_norm`)."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = self.relu(conv_norm(self.conv2, self.bn2, out))
        out = conv_norm(self.conv3, self.bn3, out)
        out += x if self.downsample is None else conv_norm(self.downsample[0], self.downsample[1], x)
        return self.relu(out)

# depth -> (block type, blocks in res2, res3, res4, res5)
RESNET_SPECS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


def make_stage(
    block: type[nn.Module],
    *,
    in_channels: int,
    planes: int,
    num_blocks: int,
    stride: int,
    norm_layer: Callable[[int], nn.Module],
    stride_in_1x1: bool = False,
) -> nn.Sequential:
    """One ResNet stage exactly as torchvision's `ResNet._make_layer` builds it (stride in the first block). With
    `stride_in_1x1` the first bottleneck strides in its 1x1 `conv1` instead of its 3x3 `conv2`: the MSRA/Caffe
    ResNet (the paper's own, and detectron2's `STRIDE_IN_1X1`); the modules and their shapes are the same."""
    out_channels = planes * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
            norm_layer(out_channels),
        )
    blocks = [block(in_channels, planes, stride, downsample, norm_layer=norm_layer)]
    if stride_in_1x1:
        if not hasattr(blocks[0], "conv3"):
            raise ValueError(f"stride_in_1x1 needs bottleneck blocks; {block.__name__} has no 1x1 conv to stride in")
        blocks[0].conv1.stride, blocks[0].conv2.stride = blocks[0].conv2.stride, blocks[0].conv1.stride
    blocks += [block(out_channels, planes, norm_layer=norm_layer) for _ in range(1, num_blocks)]
    return nn.Sequential(*blocks)


def init_resnet_weights(module: nn.Module) -> None:
    """torchvision's ResNet initialisation: He (fan-out) convs, unit-scale zero-shift norms."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNetTrunk(nn.Module):
    """Stem + res2..res4: (N, 3, H, W) -> (N, C4, ceil(H/16), ceil(W/16)), computed once per image."""

    stride = 16

    def __init__(
        self,
        *,
        depth: int,
        width: int = 64,
        norm_layer: Callable[[int], nn.Module],
        freeze_at: int = 2,
        stride_in_1x1: bool = False,
    ):
        """
        Args:
            depth: 18, 34, 50, 101 or 152.
            width: stem channels; stage planes are width * (1, 2, 4).
            norm_layer: factory `channels -> normalisation module` (see `layers.get_norm`).
            freeze_at: 0 trains everything; 1 freezes the stem; k >= 2 also freezes res2..res(k).
            stride_in_1x1: res3 and res4 stride in their first block's 1x1 conv (MSRA/Caffe ResNets), not in
                its 3x3 conv (torchvision's); bottlenecks only (see `make_stage`).
        """
        super().__init__()
        if depth not in RESNET_SPECS:
            raise ValueError(f"Unknown ResNet depth {depth}; expected one of {sorted(RESNET_SPECS)}")
        block, num_blocks = RESNET_SPECS[depth]
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = width
        for index, (blocks, stride) in enumerate(zip(num_blocks[:3], (1, 2, 2))):
            planes = width * 2**index
            stage = make_stage(
                block, in_channels=in_channels, planes=planes, num_blocks=blocks, stride=stride,
                norm_layer=norm_layer, stride_in_1x1=stride_in_1x1,
            )
            self.add_module(f"layer{index + 1}", stage)
            in_channels = planes * block.expansion
        self.out_channels = in_channels
        init_resnet_weights(self)
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> None:
        """Stops gradients into the stem (freeze_at >= 1) and res2..res(freeze_at) and fixes their norms."""
        if not 0 <= freeze_at <= 4:
            raise ValueError(f"freeze_at must be in 0..4, got {freeze_at}")
        frozen: list[str] = ["conv1", "bn1"] if freeze_at >= 1 else []
        frozen += [f"layer{i}" for i in range(1, freeze_at)]  # res2 = layer1, ..., res4 = layer3
        for name in frozen:
            module = convert_frozen_batchnorm(getattr(self, name))
            setattr(self, name, module)
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(conv_norm(self.conv1, self.bn1, x)))  # (N, 3, H, W) -> (N, W0, H/4, W/4)
        x = self.layer1(x)
        x = self.layer2(x)  # -> (N, C3, H/8, W/8)
        return self.layer3(x)  # -> (N, C4, H/16, W/16)


def build_res5(
    *, depth: int, width: int = 64, norm_layer: Callable[[int], nn.Module], stride_in_1x1: bool = False
) -> tuple[nn.Sequential, int]:
    """res5 (torchvision's `layer4`, first block stride 2, in its 1x1 conv with `stride_in_1x1`), run per RoI.
    Returns (module, output channels)."""
    if depth not in RESNET_SPECS:
        raise ValueError(f"Unknown ResNet depth {depth}; expected one of {sorted(RESNET_SPECS)}")
    block, num_blocks = RESNET_SPECS[depth]
    in_channels = width * 4 * block.expansion
    res5 = make_stage(
        block, in_channels=in_channels, planes=width * 8, num_blocks=num_blocks[3], stride=2, norm_layer=norm_layer,
        stride_in_1x1=stride_in_1x1,
    )
    init_resnet_weights(res5)
    return res5, width * 8 * block.expansion
