"""The speed work leaves results unchanged: each fast-path option alone and all together give the plain path's
detections (float tolerance), FrozenBN folding gives the plain training losses and gradients, bf16 inference stays
within its stated tolerance, and the torchvision-built comparison model computes our model's function."""

from pathlib import Path

import pytest
import torch
from torch import nn

from detectron_res.config import load_config
from detectron_res.engine.benchmark import synthetic_inputs, torchvision_equivalent, torchvision_inputs
from detectron_res.layers import FrozenBatchNorm2d
from detectron_res.modeling import build_model, compile_for_inference
from detectron_res.modeling.backbone import resnet

REPO = Path(__file__).resolve().parents[2]

# R50 layout (Bottleneck blocks, FrozenBN) at width 8 on 128 x 192 images with 40 proposals
SMALL_R50 = ["MODEL.DEVICE=cpu", "MODEL.NUM_CLASSES=5", "MODEL.BACKBONE.WIDTH=8", "MODEL.RPN.ANCHOR_SIZES=[32,64]",
             "MODEL.RPN.POST_NMS_TOPK_TEST=40", "MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.0", "INPUT.MIN_SIZE_TEST=128",
             "INPUT.MAX_SIZE_TEST=192"]  # fmt: skip


def randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Statistics and affine parameters far from the identity, so that a wrong fold changes the numbers."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                n = len(m.running_mean)
                m.weight.copy_(0.5 + torch.rand(n, generator=generator))
                m.bias.copy_(0.2 * torch.randn(n, generator=generator))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(n, generator=generator))


def small_model(overrides=()):
    """The small R50 with random norms, and a predictor scaled to its features: class logits of std ~1.5 and box
    deltas of std ~0.2 (a random trunk's features are large, which would saturate every probability)."""
    cfg = load_config(REPO / "configs/base_c4.yaml", [*SMALL_R50, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    randomise_norms(model)
    inputs = synthetic_inputs(num_images=1, height=128, width=192, seed=9)
    with torch.no_grad():
        prepared = model.prepare(inputs)
        features = model.roi_heads.box_features(prepared.features, model.propose(prepared), prepared.image_sizes)
        size = features.norm(dim=1).mean()
        predictor = model.roi_heads.predictor
        predictor.cls_score.weight.normal_(0, 1.5 / size)
        predictor.bbox_pred.weight.normal_(0, 0.2 / size)
    return model


def unfolded_conv_norm(conv, norm, x):
    return norm(conv(x))


FAST_OPTIONS = ("fold_norms", "channels_last", "bag_roi_align", "chunked_res5")


def set_options(model, monkeypatch, enabled: set[str]) -> None:
    """Switches each fast-path option of the built model on (as build_model sets it on the CPU) or off."""
    if "fold_norms" not in enabled:
        monkeypatch.setattr(resnet, "conv_norm", unfolded_conv_norm)
    model.channels_last = "channels_last" in enabled
    model.roi_heads.pooler.roi_align_kernel = "bag" if "bag_roi_align" in enabled else "torchvision"
    model.roi_heads.inference_chunk = 7 if "chunked_res5" in enabled else 0  # 40 proposals in 6 chunks


def detect(model, inputs):
    with torch.inference_mode():
        return model(inputs)


def test_the_cpu_build_turns_every_option_on():
    """Channels-last images and the RoI chunks are decided by the device at each call (None); cuda features get
    neither (tests/modeling/test_fake_cuda_detector.py)."""
    model = small_model()
    assert model.channels_last is None and model.roi_heads.pooler.roi_align_kernel == "auto"
    assert model.roi_heads.inference_chunk is None
    res4 = torch.zeros(1, 128, 8, 12)  # res4 of width 8: 128 channels
    assert model.roi_heads.chunk_size(res4) == 501  # 48 MB // (128 * 14 * 14 float32) = 50331648 // 100352
    assert model.inference_dtype is None


@pytest.mark.parametrize("options", [*[(option,) for option in FAST_OPTIONS], FAST_OPTIONS])
def test_fast_options_give_the_plain_detections(options, monkeypatch):
    inputs = synthetic_inputs(num_images=2, height=128, width=192, seed=1)
    model = small_model()
    with monkeypatch.context() as patch:
        set_options(model, patch, set())
        plain = detect(model, inputs)
    with monkeypatch.context() as patch:
        set_options(model, patch, set(options))
        fast = detect(model, inputs)
    for p, f in zip(plain, fast):
        assert len(p["boxes"]) == len(f["boxes"]) > 20
        torch.testing.assert_close(f["scores"], p["scores"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(f["boxes"], p["boxes"], rtol=1e-4, atol=1e-3)
        assert torch.equal(f["labels"], p["labels"])


def test_folding_frozen_norms_in_training_gives_the_plain_losses_and_gradients(monkeypatch):
    inputs = synthetic_inputs(num_images=2, height=128, width=192, num_boxes=3, num_classes=5, seed=2)
    results = []
    for fold in (False, True):
        model = small_model(["MODEL.BACKBONE.FREEZE_AT=0"]).train()  # every conv trains, every norm frozen
        with monkeypatch.context() as patch:
            if not fold:
                patch.setattr(resnet, "conv_norm", unfolded_conv_norm)
            torch.manual_seed(3)  # the same RoI sampling
            losses = model(inputs)
            sum(losses.values()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((losses, grads))
    (plain_losses, plain_grads), (losses, grads) = results
    for key in plain_losses:
        torch.testing.assert_close(losses[key], plain_losses[key], rtol=1e-4, atol=1e-6)
    assert grads.keys() == plain_grads.keys() and "backbone.conv1.weight" in grads
    for name in grads:  # float32 sums in another order: relative differences of ~1e-4 (2e-4 for the stem's conv)
        relative = (grads[name] - plain_grads[name]).norm() / plain_grads[name].norm()
        assert relative < 1e-3, name


@pytest.mark.parametrize("depth", [18, 50])
def test_blocks_compute_torchvisions_blocks(depth):
    """Each block (with or without a downsampling shortcut) gives what torchvision's own forward computes with the
    same modules, and the whole trunk (its folded stem too) gives the unfolded stem followed by those."""
    from torchvision.models import resnet as torchvision_resnet

    cfg = load_config(REPO / "configs/base_c4.yaml", ["MODEL.DEVICE=cpu", f"MODEL.BACKBONE.DEPTH={depth}",
                                                      "MODEL.BACKBONE.WIDTH=8"])  # fmt: skip
    torch.manual_seed(0)
    trunk = build_model(cfg).backbone.eval()
    randomise_norms(trunk)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        stem = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(x))))
        expected = stem
        for block in [*trunk.layer1, *trunk.layer2, *trunk.layer3]:
            reference = getattr(torchvision_resnet, type(block).__name__).forward(block, expected)
            got = block(expected)
            torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
            expected = reference
        torch.testing.assert_close(trunk(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert trunk.layer2[0].downsample is not None


def test_only_inference_batches_are_channels_last():
    model = small_model()
    images = [torch.rand(3, 40, 50)]
    assert model.batch_images(images)[0].is_contiguous(memory_format=torch.channels_last)
    model.train()
    batch = model.batch_images(images)[0]
    assert batch.is_contiguous() and not batch.is_contiguous(memory_format=torch.channels_last)


def test_batchnorm_folds_only_in_eval_mode():
    conv, norm = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
    randomise_norms(norm)
    x = torch.randn(2, 3, 5, 5)
    norm.train()
    training = resnet.conv_norm(conv, norm, x)  # batch statistics: normalised per channel
    torch.testing.assert_close(training.mean(dim=(0, 2, 3)), norm.bias.detach(), atol=1e-5, rtol=0)
    norm.eval()
    torch.testing.assert_close(resnet.conv_norm(conv, norm, x), norm(conv(x)), rtol=1e-5, atol=1e-5)


def test_bfloat16_inference_within_its_stated_tolerance():
    """bf16 (TEST.AMP): for the same proposals, class probabilities within 0.02 and boxes within 1 input pixel of
    float32 (docs/benchmarks.md)."""
    inputs = synthetic_inputs(num_images=1, height=128, width=192, seed=4)
    model = small_model()
    with torch.inference_mode():
        prepared = model.prepare(inputs)
        proposals = model.propose(prepared)
        expected = model.detection_candidates(inputs, prepared, proposals)
        model.inference_dtype = torch.bfloat16
        bf16_prepared = model.prepare(inputs)
        assert bf16_prepared.features.dtype == torch.bfloat16
        got = model.detection_candidates(inputs, bf16_prepared, proposals)
    assert got[0]["scores"].dtype == torch.float32 and len(got[0]["scores"]) == len(expected[0]["scores"]) > 100
    assert (got[0]["scores"] - expected[0]["scores"]).abs().max() < 0.02
    assert (got[0]["boxes"] - expected[0]["boxes"]).abs().max() < 1.0
    assert torch.equal(got[0]["labels"], expected[0]["labels"])


def test_float16_inference_on_the_cpu_is_refused():
    with pytest.raises(ValueError, match="TEST.AMP.DTYPE=float16 needs CUDA"):
        small_model(["TEST.AMP.ENABLED=true", "TEST.AMP.DTYPE=float16"])


def test_the_torchvision_equivalent_computes_our_function():
    cfg = load_config(REPO / "configs/base_c4.yaml", ["MODEL.DEVICE=cpu", "MODEL.NUM_CLASSES=3"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    randomise_norms(model)
    theirs = torchvision_equivalent(model, min_size=64, max_size=96).eval()
    inputs = synthetic_inputs(num_images=1, height=64, width=96, seed=5)
    images, targets = torchvision_inputs(inputs, torch.device("cpu"))
    assert targets is None and images[0].max() <= 1.0
    with torch.inference_mode():
        batch, _ = theirs.transform(images)
        features = model.backbone(model.preprocess_images(inputs)[0])
        torch.testing.assert_close(theirs.backbone(batch.tensors), features, rtol=1e-3, atol=1e-3)
        logits, deltas = theirs.rpn.head([features])
        ours_logits, ours_deltas = model.rpn.head(features)
        torch.testing.assert_close(logits[0], ours_logits)
        torch.testing.assert_close(deltas[0], ours_deltas)
        assert torch.equal(theirs.rpn.anchor_generator.cell_anchors[0], model.rpn.anchor_generator.cell_anchors)
        x = torch.randn(4, 2048)
        scores, boxes = theirs.roi_heads.box_predictor(x)
        ours_scores, ours_boxes = model.roi_heads.predictor(x)
        torch.testing.assert_close(scores[:, 0], ours_scores[:, 3])  # background: first there, last here
        torch.testing.assert_close(scores[:, 1:], ours_scores[:, :3])
        torch.testing.assert_close(boxes[:, 4:], ours_boxes)
        assert boxes[:, :4].abs().max() == 0
    assert not theirs.backbone[0].weight.requires_grad and theirs.backbone[6][0].conv1.weight.requires_grad
    assert list(theirs.roi_heads.box_roi_pool.output_size) == [14, 14]
    assert (theirs.rpn._post_nms_top_n["testing"], theirs.roi_heads.detections_per_img) == (300, 100)
    # training: a RoI is foreground from IoU 0.5 and background below it (ours: [0, 0.5)); anchors at 0.7 / 0.3
    matcher = theirs.roi_heads.proposal_matcher
    assert (matcher.high_threshold, matcher.low_threshold) == (0.5, 0.5)
    assert (theirs.rpn.proposal_matcher.high_threshold, theirs.rpn.proposal_matcher.low_threshold) == (0.7, 0.3)
    assert theirs.roi_heads.fg_bg_sampler.batch_size_per_image == 128  # base_c4: py-faster-rcnn's end-to-end value


def test_the_torchvision_equivalent_needs_a_standard_resnet():
    model = small_model()
    with pytest.raises(ValueError, match="standard-width ResNet-50/101/152"):
        torchvision_equivalent(model, min_size=128, max_size=192)


def test_compiled_inference_gives_the_eager_detections():
    inputs = synthetic_inputs(num_images=1, height=128, width=192, seed=6)
    model = small_model()
    eager = detect(model, inputs)
    compiled = detect(compile_for_inference(model), inputs)
    assert len(compiled[0]["boxes"]) == len(eager[0]["boxes"]) > 20
    torch.testing.assert_close(compiled[0]["scores"], eager[0]["scores"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(compiled[0]["boxes"], eager[0]["boxes"], rtol=1e-4, atol=1e-3)
    assert "backbone.conv1.weight" in model.state_dict()  # compiled in place: the keys stay
