"""SGD with momentum and the warm-up + step learning-rate schedule, built from the config."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def warmup_multistep_factor(
    iteration: int, *, warmup_iters: int, warmup_factor: float, steps: Sequence[int], gamma: float
) -> float:
    """Learning-rate multiplier at `iteration`: linear ramp from `warmup_factor` to 1 over `warmup_iters`, times
    `gamma` for every step already passed."""
    factor = gamma ** bisect.bisect_right(list(steps), iteration)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


def param_groups(
    model: nn.Module, *, base_lr: float, weight_decay: float, weight_decay_norm: float, bias_lr_factor: float
) -> list[dict]:
    """One group per (lr, weight decay) pair: normalisation parameters get `weight_decay_norm`, biases
    `base_lr * bias_lr_factor`; frozen parameters are left out."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            lr, decay = base_lr, weight_decay
            if isinstance(module, NORM_TYPES):
                decay = weight_decay_norm
            if name == "bias":
                lr = base_lr * bias_lr_factor
            groups.setdefault((lr, decay), []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]


def build_optimizer(cfg, model: nn.Module) -> torch.optim.SGD:
    s = cfg.SOLVER
    groups = param_groups(
        model,
        base_lr=s.BASE_LR,
        weight_decay=s.WEIGHT_DECAY,
        weight_decay_norm=s.WEIGHT_DECAY_NORM,
        bias_lr_factor=s.BIAS_LR_FACTOR,
    )
    return torch.optim.SGD(groups, lr=s.BASE_LR, momentum=s.MOMENTUM)


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer) -> LambdaLR:
    """Stepped once per iteration; its state (the iteration) is saved in checkpoints for --resume."""
    s = cfg.SOLVER
    warmup_iters, warmup_factor, steps, gamma = s.WARMUP_ITERS, s.WARMUP_FACTOR, tuple(s.STEPS), s.GAMMA

    def factor(iteration: int) -> float:
        return warmup_multistep_factor(
            iteration, warmup_iters=warmup_iters, warmup_factor=warmup_factor, steps=steps, gamma=gamma
        )

    return LambdaLR(optimizer, factor)
