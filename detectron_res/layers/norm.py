"""Normalisation layers for the ResNet trunk: frozen BatchNorm (the paper's), trainable BN, synchronised BN (over
the processes of a distributed job), GroupNorm."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol  # differentiable collectives (torch's advice)
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

NORMS = ("FrozenBN", "BN", "SyncBN", "GN")


def get_norm(norm: str, *, gn_groups: int = 32) -> Callable[[int], nn.Module]:
    """Returns a factory `num_channels -> module` for the normalisation named `norm`."""
    if norm == "FrozenBN":
        return FrozenBatchNorm2d
    if norm == "BN":
        return nn.BatchNorm2d
    if norm == "SyncBN":  # statistics over all ranks' images in distributed training; plain BN in one process
        return SyncBatchNorm
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


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are taken over the inputs of every process of a distributed job.

    Outside a distributed job, and in eval mode, it is exactly `nn.BatchNorm2d` (same state_dict too). In a
    distributed training step, the per-channel sums and counts, then the sums of squared deviations from the global
    mean, are all-reduced with autograd (`torch.distributed._functional_collectives.all_reduce`), so the gradient
    reaches every process's inputs as with torch's `nn.SyncBatchNorm`. torch's class does this on GPUs only (and
    DistributedDataParallel refuses it on CPUs): this one works over gloo on CPUs, and `engine.runner.
    wrap_distributed` replaces it by torch's fused one on GPUs.
    """

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torch's name
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        channels = input.shape[1]
        reduce_dims = [0, *range(2, input.dim())]
        shape = [1, channels] + [1] * (input.dim() - 2)
        sums = torch.cat([input.sum(reduce_dims), input.new_tensor([input.numel() / channels])])
        sums = funcol.all_reduce(sums, "sum", dist.group.WORLD)
        count = float(sums[-1].detach())
        mean = sums[:channels] / count
        squares = funcol.all_reduce(((input - mean.view(shape)) ** 2).sum(reduce_dims), "sum", dist.group.WORLD)
        var = squares / count  # biased, as BatchNorm normalises with
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                unbiased = var.detach() * (count / max(count - 1.0, 1.0))  # as BatchNorm's running variance
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        output = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        return output
