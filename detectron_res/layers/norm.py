"""Normalisation layers for the ResNet trunk: frozen BatchNorm (the paper's), trainable BN, synchronised BN, GroupNorm."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.ops import FrozenBatchNorm2d

NORMS = ("FrozenBN", "BN", "SyncBN", "GN")


def get_norm(norm: str, *, gn_groups: int = 32) -> Callable[[int], nn.Module]:
    """Returns a factory `num_channels -> module` for the normalisation named `norm`."""
    if norm == "FrozenBN":
        return FrozenBatchNorm2d
    if norm == "BN":
        return nn.BatchNorm2d
    if norm == "SyncBN":  # statistics over all ranks' images in distributed training; plain BN in one process
        return nn.SyncBatchNorm
    if norm == "GN":

        def group_norm(num_channels: int) -> nn.Module:
            if num_channels % gn_groups:
                raise ValueError(f"GroupNorm: {num_channels} channels are not divisible into {gn_groups} groups")
            return nn.GroupNorm(gn_groups, num_channels)

        return group_norm
    raise ValueError(f"Unknown normalisation {norm!r}; expected one of {NORMS}")


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Replaces every BatchNorm2d in `module` (or `module` itself) by a FrozenBatchNorm2d with the same
    statistics and affine parameters, so frozen stages stay frozen when the rest trains with BN."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        frozen.running_mean.copy_(module.running_mean)
        frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new_child = convert_frozen_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
