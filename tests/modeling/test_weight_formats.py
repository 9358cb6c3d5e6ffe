"""Weights of torchvision, MSRA (Detectron's R-50.pkl) and detectron2, converted from fake files with the real key
names and shapes (random values): every key finds its place both ways, and the MSRA trunk computes what the Caffe2
network of those blobs computes (stride in the 1x1 conv, BGR input, affine norms, conv biases)."""

from __future__ import annotations

import io
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from detectron_res.config import load_config
from detectron_res.engine.checkpoint import Checkpointer
from detectron_res.engine.runner import load_for_inference
from detectron_res.modeling import build_model
from detectron_res.modeling.backbone import read_resnet_weights
from detectron_res.modeling.weight_formats import (
    MSRA_SETTINGS,
    convert_file,
    detect_format,
    detectron2_name,
    msra_to_torchvision,
    read_pickled_arrays,
    read_weights_file,
    save_converted,
)

REPO = Path(__file__).resolve().parents[2]

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
MSRA_MEAN_BGR = np.array([103.53, 116.28, 123.675], dtype=np.float32)


# -- fake source files -----------------------------------------------------------------------------------------------
def msra_blobs(depth: int, *, seed: int = 0, classifier: str = "fc1000") -> dict[str, np.ndarray]:
    """MSRA's ResNet as Detectron's pickle_caffe_blobs.py writes it: a weight and a (zero, but conv1's) bias per conv,
    an affine `_bn_s` / `_bn_b` per norm, the 1000-way classifier. Values keep activations of order 1."""
    rng = np.random.default_rng(seed)
    blobs: dict[str, np.ndarray] = {}

    def conv(name: str, out_channels: int, in_channels: int, k: int, *, last: bool = False) -> None:
        fan_in = in_channels * k * k
        blobs[f"{name}_w"] = rng.normal(0, np.sqrt(2.0 / fan_in), (out_channels, in_channels, k, k)).astype(np.float32)
        blobs[f"{name}_b"] = np.zeros(out_channels, np.float32)
        blobs[f"{name}_bn_s" if name != "conv1" else "res_conv1_bn_s"] = rng.uniform(
            0.05 if last else 0.5, 0.2 if last else 1.0, out_channels).astype(np.float32)
        blobs[f"{name}_bn_b" if name != "conv1" else "res_conv1_bn_b"] = rng.uniform(-0.1, 0.1, out_channels).astype(np.float32)

    conv("conv1", 64, 3, 7)
    blobs["conv1_b"] = rng.uniform(-1, 1, 64).astype(np.float32)  # MSRA's conv1 has a bias of its own
    in_channels = 64
    for stage, count in zip(range(2, 6), BLOCKS[depth]):
        planes = 64 * 2 ** (stage - 2)
        for block in range(count):
            prefix = f"res{stage}_{block}_"
            if block == 0:
                conv(prefix + "branch1", planes * 4, in_channels, 1, last=True)
            conv(prefix + "branch2a", planes, in_channels, 1)
            conv(prefix + "branch2b", planes, planes, 3)
            conv(prefix + "branch2c", planes * 4, planes, 1, last=True)
            in_channels = planes * 4
    blobs[f"{classifier}_w"] = rng.normal(0, 0.01, (1000, 2048)).astype(np.float32)
    blobs[f"{classifier}_b"] = np.zeros(1000, np.float32)
    return blobs


def caffe2_stage_forward(blobs: dict, x: torch.Tensor, stage: int, count: int) -> torch.Tensor:
    """One stage as Detectron's Caffe2 ResNet runs it: the stride in the first block's 1x1 branch2a."""

    def conv_affine(name: str, x: torch.Tensor, *, stride: int = 1, padding: int = 0) -> torch.Tensor:
        t = {k: torch.from_numpy(v) for k, v in blobs.items() if k.startswith(name + "_")}
        y = F.conv2d(x, t[name + "_w"], t[name + "_b"], stride=stride, padding=padding)
        return y * t[name + "_bn_s"].view(-1, 1, 1) + t[name + "_bn_b"].view(-1, 1, 1)

    for block in range(count):
        prefix = f"res{stage}_{block}_"
        stride = 2 if block == 0 and stage > 2 else 1
        out = F.relu(conv_affine(prefix + "branch2a", x, stride=stride))
        out = F.relu(conv_affine(prefix + "branch2b", out, padding=1))
        out = conv_affine(prefix + "branch2c", out)
        shortcut = conv_affine(prefix + "branch1", x, stride=stride) if block == 0 else x
        x = F.relu(out + shortcut)
    return x


def caffe2_res4(blobs: dict, bgr_minus_mean: torch.Tensor) -> torch.Tensor:
    weight, bias = torch.from_numpy(blobs["conv1_w"]), torch.from_numpy(blobs["conv1_b"])
    x = F.conv2d(bgr_minus_mean, weight, bias, stride=2, padding=3)
    x = x * torch.from_numpy(blobs["res_conv1_bn_s"]).view(-1, 1, 1) + torch.from_numpy(blobs["res_conv1_bn_b"]).view(-1, 1, 1)
    x = F.max_pool2d(F.relu(x), kernel_size=3, stride=2, padding=1)
    for stage, count in zip((2, 3, 4), BLOCKS[50]):
        x = caffe2_stage_forward(blobs, x, stage, count)
    return x


def detectron2_c4_state(depth: int, *, num_classes: int = 80, seed: int = 0) -> dict[str, np.ndarray]:
    """A detectron2 GeneralizedRCNN (ResNet C4 backbone, StandardRPNHead, Res5ROIHeads) state_dict: its module
    names (`backbone.stem.conv1`, `backbone.res<k>.<i>.conv<j>` with a `.norm` FrozenBN of four buffers, `shortcut`,
    `roi_heads.res5`, `roi_heads.box_predictor`, `proposal_generator.rpn_head`) and shapes."""
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}

    def conv(name: str, out_channels: int, in_channels: int, k: int) -> None:
        state[f"{name}.weight"] = rng.normal(0, 0.05, (out_channels, in_channels, k, k)).astype(np.float32)
        for buffer, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            state[f"{name}.norm.{buffer}"] = (value + rng.uniform(0, 0.1, out_channels)).astype(np.float32)

    conv("backbone.stem.conv1", 64, 3, 7)
    in_channels = 64
    for stage, count in zip(range(2, 6), BLOCKS[depth]):
        planes = 64 * 2 ** (stage - 2)
        prefix = f"backbone.res{stage}" if stage < 5 else "roi_heads.res5"
        for block in range(count):
            if block == 0:
                conv(f"{prefix}.{block}.shortcut", planes * 4, in_channels, 1)
            conv(f"{prefix}.{block}.conv1", planes, in_channels, 1)
            conv(f"{prefix}.{block}.conv2", planes, planes, 3)
            conv(f"{prefix}.{block}.conv3", planes * 4, planes, 1)
            in_channels = planes * 4
    anchors = 15  # 5 sizes x 3 aspect ratios
    for name, shape in (
        ("proposal_generator.rpn_head.conv", (1024, 1024, 3, 3)),
        ("proposal_generator.rpn_head.objectness_logits", (anchors, 1024, 1, 1)),
        ("proposal_generator.rpn_head.anchor_deltas", (anchors * 4, 1024, 1, 1)),
        ("roi_heads.box_predictor.cls_score", (num_classes + 1, 2048)),
        ("roi_heads.box_predictor.bbox_pred", (num_classes * 4, 2048)),
    ):
        state[f"{name}.weight"] = rng.normal(0, 0.01, shape).astype(np.float32)
        state[f"{name}.bias"] = rng.normal(0, 0.01, shape[0]).astype(np.float32)
    return state


def write_pickle(path, data) -> str:
    with open(path, "wb") as handle:
        pickle.dump(data, handle, protocol=2)
    return str(path)


# -- MSRA ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [50, 101])
def test_msra_conversion_fills_every_trunk_and_res5_key_and_uses_every_blob(depth):
    blobs = msra_blobs(depth)
    converted = msra_to_torchvision({k: torch.from_numpy(v) for k, v in blobs.items()})
    reference = torchvision.models.resnet50() if depth == 50 else torchvision.models.resnet101()
    expected = {k for k in reference.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(converted.state_dict) == expected  # every torchvision key filled, nothing extra
    assert converted.dropped == [] and converted.settings == MSRA_SETTINGS
    # each (conv, affine) pair of blobs went into one conv and its norm; conv1's bias was folded into bn1's shift
    scale, shift, bias = (torch.from_numpy(blobs[k]) for k in ("res_conv1_bn_s", "res_conv1_bn_b", "conv1_b"))
    torch.testing.assert_close(converted.state_dict["bn1.bias"], shift + scale * bias)
    torch.testing.assert_close(converted.state_dict["layer3.5.conv2.weight"], torch.from_numpy(blobs["res4_5_branch2b_w"]))
    torch.testing.assert_close(converted.state_dict["layer4.0.downsample.1.weight"],
                               torch.from_numpy(blobs["res5_0_branch1_bn_s"]))
    torch.testing.assert_close(converted.state_dict["fc.weight"], torch.from_numpy(blobs["fc1000_w"]))
    # the affine becomes a FrozenBN that multiplies by exactly its scale
    var = converted.state_dict["layer1.0.bn1.running_var"]
    torch.testing.assert_close(torch.rsqrt(var + 1e-5), torch.ones_like(var), rtol=1e-6, atol=0)


def test_msra_trunk_computes_the_caffe2_networks_features(tmp_path):
    blobs = msra_blobs(50)
    path = write_pickle(tmp_path / "R-50.pkl", blobs)  # read directly, as MODEL.BACKBONE.WEIGHTS=R-50.pkl
    cfg = load_config("configs/d2_r50_c4.yaml", ["MODEL.DEVICE=cpu", f"MODEL.BACKBONE.WEIGHTS={path}"])
    model = build_model(cfg).eval()
    image = torch.randint(0, 256, (3, 40, 56), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        ours = model.backbone(model.normalize(image)[None])
        bgr = image.flip(0).float() - torch.from_numpy(MSRA_MEAN_BGR).view(3, 1, 1)
        theirs = caffe2_res4(blobs, bgr[None])
        assert ours.shape == theirs.shape == (1, 1024, 3, 4)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
        # res5 per RoI, with its stride in the first 1x1 conv too
        pooled = torch.randn(2, 1024, 14, 14, generator=torch.Generator().manual_seed(1)).relu()
        torch.testing.assert_close(model.roi_heads.res5(pooled), caffe2_stage_forward(blobs, pooled, 5, 3),
                                   rtol=1e-4, atol=1e-4)


def test_msra_weights_refuse_a_torchvision_style_config(tmp_path):
    path = write_pickle(tmp_path / "R-50.pkl", msra_blobs(50))
    cfg = load_config("configs/coco_r50.yaml", ["MODEL.DEVICE=cpu", f"MODEL.BACKBONE.WEIGHTS={path}"])
    with pytest.raises(ValueError) as error:
        build_model(cfg)
    message = str(error.value)
    assert "MODEL.BACKBONE.STRIDE_IN_1X1=false (the weights need true)" in message
    assert "INPUT.FORMAT=RGB (the weights need BGR)" in message
    assert "MODEL.PIXEL_STD=[58.395, 57.12, 57.375] (the weights need [1, 1, 1])" in message


def test_msra_classifier_named_pred_and_optimizer_momenta():
    blobs = {k: torch.from_numpy(v) for k, v in msra_blobs(50, classifier="pred").items()}
    blobs["res2_0_branch2a_w_momentum"] = torch.zeros(1)
    converted = msra_to_torchvision(blobs)
    assert "fc.weight" in converted.state_dict and converted.dropped == ["res2_0_branch2a_w_momentum"]


def test_msra_conversion_names_what_has_no_place():
    blobs = {k: torch.from_numpy(v) for k, v in msra_blobs(50).items()}
    blobs["res6_0_branch2a_w"] = torch.zeros(1)
    with pytest.raises(ValueError, match="1 blobs have no place in a ResNet: res6_0_branch2a_w"):
        msra_to_torchvision(blobs)
    del blobs["res6_0_branch2a_w"], blobs["res3_1_branch2b_bn_s"]
    with pytest.raises(ValueError, match=r"layer2.1.conv2 \(layer2.1.bn2\) lacks its bn_s blob"):
        msra_to_torchvision(blobs)


# -- detectron2 ------------------------------------------------------------------------------------------------------
def test_detectron2_names():
    assert detectron2_name("backbone.stem.conv1.weight") == "backbone.conv1.weight"
    assert detectron2_name("backbone.stem.conv1.norm.running_var") == "backbone.bn1.running_var"
    assert detectron2_name("backbone.res2.0.shortcut.weight") == "backbone.layer1.0.downsample.0.weight"
    for conv in (1, 2, 3):
        assert detectron2_name(f"backbone.res3.1.conv{conv}.norm.weight") == f"backbone.layer2.1.bn{conv}.weight"
        assert detectron2_name(f"roi_heads.res5.1.conv{conv}.weight") == f"roi_heads.res5.1.conv{conv}.weight"
    assert detectron2_name("backbone.res4.22.conv3.norm.bias") == "backbone.layer3.22.bn3.bias"
    assert detectron2_name("roi_heads.res5.0.shortcut.norm.weight") == "roi_heads.res5.0.downsample.1.weight"
    assert detectron2_name("roi_heads.res5.2.conv1.weight") == "roi_heads.res5.2.conv1.weight"
    assert detectron2_name("roi_heads.box_predictor.bbox_pred.bias") == "roi_heads.predictor.bbox_pred.bias"
    assert detectron2_name("proposal_generator.rpn_head.anchor_deltas.weight") == "rpn.head.anchor_deltas.weight"
    assert detectron2_name("backbone.fpn_lateral2.weight") is None
    assert detectron2_name("backbone.res5.0.conv1.weight") is None  # a C4 trunk stops at res4


@pytest.mark.parametrize("depth", [50, 101])
def test_detectron2_model_zoo_pkl_loads_strictly_into_the_d2_config(tmp_path, depth):
    state = detectron2_c4_state(depth)
    path = write_pickle(tmp_path / "model_final.pkl", {"model": state, "__author__": "Detectron2 Model Zoo"})
    cfg = load_config(f"configs/d2_r{depth}_c4.yaml", ["MODEL.DEVICE=cpu", f"MODEL.WEIGHTS={path}",
                                                      f"OUTPUT_DIR={tmp_path}"])
    model, metadata = load_for_inference(cfg)  # Checkpointer.load: every key must match, no shape may differ
    assert metadata == {}
    ours = model.state_dict()
    assert len(ours) == len(state)  # nothing of theirs left over, nothing of ours left at its initial value
    for theirs_key, our_key in (
        ("backbone.stem.conv1.norm.running_mean", "backbone.bn1.running_mean"),
        (f"backbone.res4.{5 if depth == 50 else 22}.conv2.weight", f"backbone.layer3.{5 if depth == 50 else 22}.conv2.weight"),
        ("roi_heads.res5.0.shortcut.norm.running_var", "roi_heads.res5.0.downsample.1.running_var"),
        ("proposal_generator.rpn_head.objectness_logits.bias", "rpn.head.objectness_logits.bias"),
        ("roi_heads.box_predictor.cls_score.weight", "roi_heads.predictor.cls_score.weight"),  # row 80: background
    ):
        torch.testing.assert_close(ours[our_key], torch.from_numpy(state[theirs_key]), msg=f"{theirs_key} -> {our_key}")


def test_detectron2_checkpoint_in_an_rgb_config_is_a_warning_and_its_optimizer_is_not_taken(tmp_path, caplog):
    state = {k: torch.from_numpy(v) for k, v in detectron2_c4_state(50).items()}
    state["pixel_mean"] = torch.zeros(3, 1, 1)  # older detectron2 checkpoints hold the pixel statistics
    path = tmp_path / "model_0004999.pth"
    torch.save({"model": state, "optimizer": {"state": {}}, "iteration": 4999}, path)
    cfg = load_config("configs/d2_r50_c4.yaml", ["MODEL.DEVICE=cpu", "INPUT.FORMAT=RGB", f"OUTPUT_DIR={tmp_path}"])
    model = build_model(cfg)
    extra = Checkpointer(model=model, save_dir=tmp_path).read(path)
    assert set(extra) == {"model", "format", "settings"}
    with caplog.at_level(logging.WARNING, logger="detectron_res"):
        load_for_inference(cfg, str(path))
    assert "INPUT.FORMAT=RGB (the weights need BGR)" in caplog.text


def test_detectron2_fpn_weights_are_named_and_refused(tmp_path):
    state = detectron2_c4_state(50)
    state["backbone.fpn_lateral2.weight"] = np.zeros((256, 256, 1, 1), np.float32)
    path = write_pickle(tmp_path / "fpn.pkl", {"model": state, "__author__": "Detectron2 Model Zoo"})
    with pytest.raises(ValueError, match="is it an FPN or Mask R-CNN model.*backbone.fpn_lateral2.weight"):
        convert_file(path, source_format="detectron2")


# -- torchvision and the converter tool -------------------------------------------------------------------------------
def test_torchvision_conversion_and_settings(tmp_path):
    reference = torchvision.models.resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, path)  # a DataParallel state_dict
    converted = convert_file(path, source_format="torchvision")
    assert all(k.endswith("num_batches_tracked") for k in converted.dropped) and len(converted.dropped) == 53
    out = tmp_path / "r50_torchvision.pth"
    save_converted(converted, out, source=str(path))
    weights = read_resnet_weights(str(out), depth=50)
    assert weights.settings["INPUT.FORMAT"] == "RGB" and weights.settings["MODEL.BACKBONE.STRIDE_IN_1X1"] is False
    cfg = load_config("configs/d2_r50_c4.yaml", ["MODEL.DEVICE=cpu", f"MODEL.BACKBONE.WEIGHTS={out}"])
    with pytest.raises(ValueError, match=r"STRIDE_IN_1X1=true \(the weights need false\)"):
        build_model(cfg)
    model = build_model(load_config("configs/coco_r50.yaml", ["MODEL.DEVICE=cpu", f"MODEL.BACKBONE.WEIGHTS={out}"]))
    torch.testing.assert_close(model.roi_heads.res5[2].conv3.weight, reference.layer4[2].conv3.weight)


@pytest.mark.parametrize("source_format", ["msra", "detectron2", "torchvision"])
def test_convert_weights_tool_writes_a_file_that_loads_strictly(tmp_path, capsys, source_format):
    from tools.convert_weights import main

    if source_format == "torchvision":
        source = str(tmp_path / "resnet50.pth")
        torch.save(torchvision.models.resnet50().state_dict(), source)
    else:
        data = msra_blobs(50) if source_format == "msra" else {"model": detectron2_c4_state(50), "__author__": "d2"}
        source = write_pickle(tmp_path / "in.pkl", data)
    config = "configs/coco_r50.yaml" if source_format == "torchvision" else "configs/d2_r50_c4.yaml"
    out = tmp_path / "out.pth"
    summary = main(["--from", source_format, source, str(out), "--check-cfg", config, f"OUTPUT_DIR={tmp_path}"])
    printed = capsys.readouterr().out
    # loaded with nothing of ours missing and nothing of theirs left over but the ImageNet classifier
    assert summary["checked"] == config and "every key matched" in printed
    assert summary["tensors"] == 53 * 5 + (10 if source_format == "detectron2" else 2)  # 53 convs with their norms
    saved = torch.load(out, weights_only=True)
    assert saved["format"] == source_format
    assert saved["settings"]["INPUT.FORMAT"] == ("RGB" if source_format == "torchvision" else "BGR")
    # the wrong --from is named
    wrong = "msra" if source_format == "torchvision" else "torchvision"
    with pytest.raises(ValueError, match=f"holds {source_format} names, not {wrong}'s: pass --from {source_format}"):
        main(["--from", wrong, source, str(tmp_path / "x.pth")])


def test_pickles_that_would_run_code_are_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    path = write_pickle(tmp_path / "evil.pkl", {"conv1_w": Exploit()})
    with pytest.raises(ValueError, match=r"refusing to load (__builtin__|builtins)\.print"):
        read_pickled_arrays(path)


def test_an_unreadable_pkl_or_pth_names_the_file_and_why(tmp_path):
    whole = pickle.dumps({"conv1_w": np.zeros((4, 3, 7, 7), dtype=np.float32)}, protocol=2)
    buffer = io.BytesIO()
    torch.save({"conv1.weight": torch.zeros(4, 3, 7, 7)}, buffer)
    files = {
        "empty.pkl": (b"", "the file is empty (0 bytes)"),
        "text.pkl": (b"conv1_w: 0.1 0.2\n", "not a pickle file but text (17 bytes starting 'conv1_w: 0.1 0.2')"),
        "cut.pkl": (whole[:300], "a truncated pickle (300 bytes)"),
        "torch.pkl": (buffer.getvalue(), "a zip archive (a PyTorch file?), not a pickle: name it .pth"),
    }
    for name, (content, reason) in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError) as caught:
            read_weights_file(tmp_path / name)
        assert str(caught.value) == f"Could not read {tmp_path / name} as a pickle of numpy arrays: {reason}", name
    (tmp_path / "w.pth").write_text("i: the 105 of the issue\n")
    with pytest.raises(ValueError) as caught:
        read_resnet_weights(str(tmp_path / "w.pth"), depth=50)
    assert str(caught.value) == (
        f"Could not read weights file {tmp_path / 'w.pth'}: not a PyTorch file but text (24 bytes starting 'i: the 105 "
        "of the issue')"
    )


def test_detect_format():
    assert detect_format(["conv1_w", "res_conv1_bn_s"]) == "msra"
    assert detect_format(["backbone.stem.conv1.weight"]) == "detectron2"
    assert detect_format(["conv1.weight", "layer1.0.conv1.weight", "fc.weight"]) == "torchvision"
    assert detect_format(["backbone.layer1.0.conv1.weight", "rpn.head.conv.weight"]) == "detectron_res"
    assert detect_format(["something.else"]) is None


def test_convert_weights_errors_are_the_only_stderr_line_after_its_warnings(tmp_path):
    """--check-cfg with another pixel mean (a warning) and another stride placement (an error): the warning goes to
    stdout with the tool's other output, stderr holds the error line alone (with logging on stderr it was two)."""
    source = write_pickle(tmp_path / "in.pkl", msra_blobs(50))
    result = subprocess.run(
        [sys.executable, str(REPO / "tools/convert_weights.py"), "--from", "msra", source, str(tmp_path / "out.pth"),
         "--check-cfg", str(REPO / "configs/d2_r50_c4.yaml"), f"OUTPUT_DIR={tmp_path}", "MODEL.PIXEL_MEAN=[1,2,3]",
         "MODEL.BACKBONE.STRIDE_IN_1X1=false"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("convert_weights.py: error: ")
    assert "MODEL.BACKBONE.STRIDE_IN_1X1" in result.stderr
    assert "MODEL.PIXEL_MEAN" in result.stdout
