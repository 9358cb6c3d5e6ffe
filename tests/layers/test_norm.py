"""Normalisation choice and the BatchNorm -> FrozenBatchNorm conversion, with hand-computed outputs."""

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detectron_res.layers import convert_frozen_batchnorm, get_norm


def test_get_norm_factories():
    assert get_norm("FrozenBN") is FrozenBatchNorm2d
    assert get_norm("BN") is nn.BatchNorm2d
    assert issubclass(get_norm("SyncBN"), nn.BatchNorm2d)
    gn = get_norm("GN", gn_groups=4)(8)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 4 and gn.num_channels == 8
    assert get_norm("GN")(64).num_groups == 32  # the default group count


def test_get_norm_rejects_bad_names_and_group_counts():
    with pytest.raises(ValueError, match=r"normalisation 'LN'; expected one of \('FrozenBN', 'BN', 'SyncBN', 'GN'\)"):
        get_norm("LN")
    with pytest.raises(ValueError, match="GroupNorm: 12 channels are not divisible into 8 groups"):
        get_norm("GN", gn_groups=8)(12)
    assert get_norm("GN", gn_groups=6)(12).num_groups == 6  # 12 % 6 == 0 is fine


def test_frozen_batchnorm_conversion_keeps_statistics_affine_and_eps():
    bn = nn.BatchNorm2d(2, eps=1.0)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, 0.5]))
        bn.bias.copy_(torch.tensor([1.0, -1.0]))
    bn.running_mean.copy_(torch.tensor([3.0, 0.0]))
    bn.running_var.copy_(torch.tensor([3.0, 15.0]))
    frozen = convert_frozen_batchnorm(bn)
    assert isinstance(frozen, FrozenBatchNorm2d) and frozen.eps == 1.0
    x = torch.tensor([5.0, 8.0]).view(1, 2, 1, 1)
    # channel 0: (5 - 3) / sqrt(3 + 1) * 2 + 1 = 3; channel 1: (8 - 0) / sqrt(15 + 1) * 0.5 - 1 = 0
    torch.testing.assert_close(frozen(x).flatten(), torch.tensor([3.0, 0.0]))
    # the BN module in eval mode computes the same
    torch.testing.assert_close(bn.eval()(x).flatten(), torch.tensor([3.0, 0.0]))


def test_frozen_batchnorm_conversion_without_affine_is_plain_standardisation():
    bn = nn.BatchNorm2d(1, affine=False, eps=0.0)
    bn.running_mean.fill_(2.0)
    bn.running_var.fill_(4.0)
    frozen = convert_frozen_batchnorm(bn)
    # (6 - 2) / sqrt(4) = 2, weight 1 and bias 0
    torch.testing.assert_close(frozen(torch.full((1, 1, 1, 1), 6.0)).flatten(), torch.tensor([2.0]))


def test_frozen_batchnorm_conversion_recurses_and_keeps_other_modules():
    conv = nn.Conv2d(1, 2, 1)
    model = nn.Sequential(conv, nn.Sequential(nn.BatchNorm2d(2), nn.ReLU()), nn.BatchNorm2d(2))
    model[2].running_mean.fill_(5.0)
    converted = convert_frozen_batchnorm(model)
    assert converted is model and model[0] is conv
    assert isinstance(model[1][0], FrozenBatchNorm2d) and isinstance(model[1][1], nn.ReLU)
    assert isinstance(model[2], FrozenBatchNorm2d)
    torch.testing.assert_close(model[2].running_mean, torch.full((2,), 5.0))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_sync_batchnorm_in_one_process_is_exactly_batchnorm():
    from detectron_res.layers.norm import SyncBatchNorm

    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5) * 3 + 1
    outputs = []
    for module in (nn.BatchNorm2d(3), SyncBatchNorm(3)):
        with torch.no_grad():
            module.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
            module.bias.copy_(torch.tensor([0.0, -1.0, 1.0]))
        inputs = x.clone().requires_grad_(True)
        out = module.train()(inputs)
        (out * torch.arange(out.numel()).view_as(out)).sum().backward()
        outputs.append((out.detach(), inputs.grad, module.running_mean.clone(), module.running_var.clone(),
                        module.eval()(x)))  # fmt: skip
    for bn, sync in zip(*outputs):
        assert torch.equal(bn, sync)
    # the running mean moved 10% of the way to the batch mean (momentum 0.1)
    torch.testing.assert_close(outputs[0][2], 0.1 * x.mean(dim=(0, 2, 3)))
