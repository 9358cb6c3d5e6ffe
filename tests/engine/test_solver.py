import pytest
import torch

from detectron_res.engine.solver import param_groups, warmup_multistep_factor


@pytest.mark.parametrize(
    "iteration,expected",
    [(0, 0.001), (50, 0.5005), (100, 1.0), (599, 1.0), (600, 0.1), (800, 0.01), (1000, 0.01)],
)
def test_warmup_then_steps(iteration, expected):
    factor = warmup_multistep_factor(iteration, warmup_iters=100, warmup_factor=0.001, steps=(600, 800), gamma=0.1)
    assert factor == pytest.approx(expected)


def test_param_groups_separate_norm_decay_and_bias_lr():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    groups = param_groups(model, base_lr=0.1, weight_decay=1e-4, weight_decay_norm=0.0, bias_lr_factor=2.0)
    summary = sorted((g["lr"], g["weight_decay"], len(g["params"])) for g in groups)
    # conv bias; BN weight; BN bias; linear weight; linear bias
    assert summary == [(0.1, 0.0, 1), (0.1, 1e-4, 1), (0.2, 0.0, 1), (0.2, 1e-4, 2)]
