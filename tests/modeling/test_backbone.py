import pytest
import torch
import torchvision
from torch import nn

from detectron_res.config import get_default_config
from detectron_res.layers import FrozenBatchNorm2d, convert_frozen_batchnorm, get_norm
from detectron_res.modeling import build_model, count_parameters
from detectron_res.modeling.backbone import ResNetTrunk, build_res5, load_resnet_weights, read_resnet_state_dict


def test_frozen_batchnorm_equals_eval_mode_batchnorm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.5, 3.0)
    x = torch.randn(2, 5, 7, 7)
    frozen = convert_frozen_batchnorm(bn)
    assert isinstance(frozen, FrozenBatchNorm2d)
    torch.testing.assert_close(frozen(x), bn.eval()(x))
    assert sum(p.numel() for p in frozen.parameters()) == 0  # nothing left to train


@pytest.mark.parametrize("depth,channels", [(18, 256), (50, 1024)])
def test_trunk_is_stride_16_and_res5_halves_the_pooled_roi(depth, channels):
    trunk = ResNetTrunk(depth=depth, norm_layer=get_norm("FrozenBN"), freeze_at=2)
    assert trunk.out_channels == channels
    features = trunk(torch.zeros(1, 3, 64, 96))
    assert features.shape == (1, channels, 4, 6)
    res5, res5_channels = build_res5(depth=depth, norm_layer=get_norm("FrozenBN"))
    assert res5(torch.zeros(2, channels, 14, 14)).shape == (2, res5_channels, 7, 7)


@pytest.mark.parametrize("stride_in_1x1", [False, True])
def test_stride_placement_of_each_stages_first_block(stride_in_1x1):
    trunk = ResNetTrunk(depth=50, width=8, norm_layer=get_norm("FrozenBN"), stride_in_1x1=stride_in_1x1)
    res5, _ = build_res5(depth=50, width=8, norm_layer=get_norm("FrozenBN"), stride_in_1x1=stride_in_1x1)
    one_by_one, three_by_three = ((2, 2), (1, 1)) if stride_in_1x1 else ((1, 1), (2, 2))
    for stage in (trunk.layer2, trunk.layer3, res5):
        assert (stage[0].conv1.stride, stage[0].conv2.stride) == (one_by_one, three_by_three)
        assert stage[0].downsample[0].stride == (2, 2) and stage[1].conv1.stride == stage[1].conv2.stride == (1, 1)
    assert trunk.layer1[0].conv1.stride == trunk.layer1[0].conv2.stride == (1, 1)  # res2 does not stride
    assert trunk(torch.zeros(1, 3, 64, 96)).shape == (1, 128, 4, 6)
    with pytest.raises(ValueError, match="stride_in_1x1 needs bottleneck blocks; BasicBlock has no 1x1 conv"):
        ResNetTrunk(depth=18, norm_layer=get_norm("FrozenBN"), stride_in_1x1=True)


def test_freeze_at_freezes_stem_and_res2_only():
    trunk = ResNetTrunk(depth=18, width=8, norm_layer=get_norm("BN"), freeze_at=2)
    trainable = {name.split(".")[0] for name, p in trunk.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3"}
    assert isinstance(trunk.bn1, FrozenBatchNorm2d) and isinstance(trunk.layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(trunk.layer2[0].bn1, nn.BatchNorm2d)


def test_narrow_width_scales_every_stage():
    trunk = ResNetTrunk(depth=50, width=16, norm_layer=get_norm("GN", gn_groups=4), freeze_at=0)
    assert trunk.conv1.out_channels == 16 and trunk.out_channels == 16 * 4 * 4


def c4_config(depth: int, num_classes: int = 80):
    cfg = get_default_config()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.DEPTH = depth
    cfg.MODEL.NUM_CLASSES = num_classes
    cfg.MODEL.RPN.ANCHOR_SIZES = [64, 128, 256, 512]
    return cfg


@pytest.mark.parametrize("depth", [50, 101])
def test_c4_parameter_count_is_torchvision_trunk_plus_heads(depth):
    model = build_model(c4_config(depth))
    reference = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    trunk_and_res5 = count_parameters(reference) - count_parameters(reference.fc)
    assert count_parameters(model.backbone) + count_parameters(model.roi_heads.res5) == trunk_and_res5
    num_anchors, k = 12, 80
    rpn_head = (1024 * 1024 * 9 + 1024) + (1024 * num_anchors + num_anchors) + (1024 * 4 * num_anchors + 4 * num_anchors)
    predictor = (2048 * (k + 1) + k + 1) + (2048 * 4 * k + 4 * k)
    assert count_parameters(model.rpn) == rpn_head
    assert count_parameters(model.roi_heads.predictor) == predictor
    assert count_parameters(model) == trunk_and_res5 + rpn_head + predictor
    # the documented totals (docs/models.md)
    assert count_parameters(model) == {50: 33_829_389, 101: 52_821_517}[depth]


@pytest.mark.parametrize("depth", [50, 101])
def test_torchvision_state_dict_maps_every_trunk_and_res5_weight(depth, tmp_path):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    with torch.no_grad():  # make the BN statistics non-trivial so that loading them is observable
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"resnet{depth}.pth"
    torch.save(reference.state_dict(), path)

    model = build_model(c4_config(depth))
    state = read_resnet_state_dict(str(path), depth=depth)
    report = load_resnet_weights(trunk=model.backbone, res5=model.roi_heads.res5, state_dict=state, source=str(path))
    assert report.missing == []
    assert report.unexpected == ["fc.weight", "fc.bias"]
    expected = [k for k in reference.state_dict() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    assert sorted(report.loaded) == sorted(expected)
    torch.testing.assert_close(model.roi_heads.res5[2].conv3.weight, reference.layer4[2].conv3.weight)
    torch.testing.assert_close(model.backbone.layer3[0].bn2.running_var, reference.layer3[0].bn2.running_var)
    # the trunk with FrozenBN computes what torchvision's eval-mode network computes up to res4
    x = torch.randn(1, 3, 64, 64)
    reference.eval()
    expected_res4 = reference.layer3(reference.layer2(reference.layer1(reference.maxpool(reference.relu(reference.bn1(reference.conv1(x)))))))
    # random deep networks reach activations ~1e5: compare relative to the output's scale
    scale = expected_res4.abs().max()
    torch.testing.assert_close(model.backbone(x) / scale, expected_res4 / scale, rtol=0, atol=1e-5)


def test_weights_of_another_depth_fail_with_the_key_and_shapes(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    model = build_model(c4_config(50))
    state = read_resnet_state_dict(str(path), depth=50)
    with pytest.raises(ValueError, match=r"Shape mismatch for layer1\.0\.conv1\.weight .*resnet18\.pth"):
        load_resnet_weights(trunk=model.backbone, res5=model.roi_heads.res5, state_dict=state, source=str(path))


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        read_resnet_state_dict(str(tmp_path / "nothere.pth"), depth=50)
