"""engine.export: the TorchScript trace and the ONNX model (run in onnxruntime) of a tiny detector give its eager
detections on images of other sizes than the export example's, including one with fewer anchors than the RPN's
pre-NMS top-k; global context, BGR trunks and RoIPool; no detections; the settings that are refused, by name.

Tolerance (float32 on the CPU): the same number of detections with the same labels in the same order, boxes within
1e-3 px and scores within 1e-5 (measured: 3e-5 px and 1e-6 for TorchScript, whose RoIAlign is torchvision's kernel
instead of the eager CPU model's embedding-bag one; 3e-4 px and 3e-6 for onnxruntime's kernels).
"""

import warnings
from pathlib import Path

import pytest
import torch
from conftest import spread_detector_outputs

from detectron_res.config import load_config
from detectron_res.engine.export import (
    ExportableDetector,
    check_exportable,
    compare_detections,
    eager_detections,
    export_blockers,
    export_onnx,
    export_torchscript,
    onnx_runner,
)
from detectron_res.modeling import build_model, compile_for_inference

CONFIG = str(Path(__file__).resolve().parents[2] / "configs/shapes_r18.yaml")
BOX_TOL = 1e-3  # pixels
SCORE_TOL = 1e-5
# (height, width): the export example, then other sizes. With PRE_NMS_TOPK_TEST = 500 the example (an 8 x 10 res4
# map, 720 anchors) and 96 x 200 (6 x 13, 702) keep 500 anchors, but 40 x 56 pads to 48 x 64, a 3 x 4 map with
# 3 * 4 * 9 = 108 anchors: the top-k count must follow the image, not stay the example's
EXAMPLE_SIZE = (128, 160)
OTHER_SIZES = [(96, 200), (40, 56)]


def tiny_detector(*overrides: str) -> torch.nn.Module:
    """shapes_r18 (ResNet-18 of width 16) with random weights whose RPN and box predictor outputs are spread out
    (the default initialisation makes them all nearly equal, so that their order would be decided by rounding):
    about 100 detections per image, scores from 0.05 to 0.55, all three classes."""
    cfg = load_config(
        CONFIG, ["MODEL.DEVICE=cpu", "MODEL.RPN.PRE_NMS_TOPK_TEST=500", "MODEL.RPN.POST_NMS_TOPK_TEST=50", *overrides]
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    spread_detector_outputs(model)
    return model.eval()


def random_image(size: tuple[int, int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=generator)


def assert_same_detections(reference, exported, *, nonempty: bool = True) -> None:
    comparison = compare_detections(reference, exported)
    assert comparison["same_labels"], comparison
    if nonempty:
        assert comparison["reference_detections"] > 0  # the comparison cannot pass vacuously
    assert comparison["max_box_diff"] <= BOX_TOL, comparison
    assert comparison["max_score_diff"] <= SCORE_TOL, comparison
    boxes, scores, labels = exported
    assert boxes.dtype == scores.dtype == torch.float32 and labels.dtype == torch.int64


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny model, the images (example first) and its TorchScript and ONNX files."""
    folder = tmp_path_factory.mktemp("export")
    model = tiny_detector()
    images = [random_image(size, seed) for seed, size in enumerate([EXAMPLE_SIZE, *OTHER_SIZES])]
    detector = ExportableDetector(model=model)
    export_torchscript(detector, folder / "model.ts", example=images[0])
    export_onnx(detector, folder / "model.onnx", example=images[0])
    return model, images, folder / "model.ts", folder / "model.onnx"


def export_both(model, example, folder):
    """(the traced TorchScript module, an onnxruntime runner) of `model` exported on `example` into `folder`."""
    detector = ExportableDetector(model=model)
    traced = export_torchscript(detector, folder / "model.ts", example=example)
    export_onnx(detector, folder / "model.onnx", example=example)
    return traced, onnx_runner(folder / "model.onnx")


def load_torchscript(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        return torch.jit.load(str(path))


def test_the_wrapper_runs_the_models_inference_path(exported):
    model, images, _, _ = exported
    detector = ExportableDetector(model=model)
    counts = []
    for image in images:
        reference = eager_detections(model, image)
        with torch.no_grad():
            assert_same_detections(reference, detector(image))
        counts.append(len(reference[0]))
    assert min(counts) >= 10 and max(counts) <= 100  # DETECTIONS_PER_IMAGE
    # the model itself is left as it was: its CPU kernel, its gradients
    assert model.roi_heads.pooler.roi_align_kernel == "auto"
    assert detector.model.roi_heads.pooler.roi_align_kernel == "torchvision"
    assert all(p.requires_grad for p in model.parameters())


def test_the_wrapper_gives_the_trunk_the_eager_models_layout(exported):
    """Channels-last images on the CPU, as the eager model's (a trace records the layout of its device; on cuda
    the images stay NCHW: tests/engine/test_fake_cuda_engine.py)."""
    model, images, _, _ = exported
    detector = ExportableDetector(model=model)
    strides = []
    detector.model.backbone.register_forward_pre_hook(lambda module, args: strides.append(args[0].stride()))
    with torch.no_grad():
        detector(images[0])
    assert strides == [(3 * 128 * 160, 1, 160 * 3, 3)]  # the 128 x 160 example, a multiple of 16: no padding


def test_torchscript_gives_the_eager_detections_on_other_sizes(exported):
    model, images, path, _ = exported
    traced = load_torchscript(path)
    for image in images:
        reference = eager_detections(model, image)
        assert_same_detections(reference, traced(image))
        assert_same_detections(reference, traced(image.float()))  # a float image in 0..255 too
    boxes, _, _ = traced(images[1])
    assert not boxes.requires_grad
    # clipped to this image's 96 x 200 pixels, not to the example's 128 x 160
    assert (boxes[:, 2] <= OTHER_SIZES[0][1]).all() and (boxes[:, 2] > EXAMPLE_SIZE[1]).any()
    assert (boxes[:, 3] <= OTHER_SIZES[0][0]).all() and (boxes[:, 3] == OTHER_SIZES[0][0]).any()


def test_onnx_in_onnxruntime_gives_the_eager_detections_on_other_sizes(exported):
    onnx = pytest.importorskip("onnx")
    model, images, _, path = exported
    graph = onnx.load(str(path)).graph
    (image_input,) = graph.input
    dims = image_input.type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in dims] == [3, "height", "width"]
    assert {"RoiAlign", "NonMaxSuppression", "TopK"} <= {node.op_type for node in graph.node}
    run = onnx_runner(path)
    for image in images:
        assert_same_detections(eager_detections(model, image), run(image))


@pytest.mark.parametrize(
    "option", ["MODEL.ROI_HEADS.GLOBAL_CONTEXT=true", "INPUT.FORMAT=BGR", "MODEL.ROI_HEADS.POOLER=ROIPool"]
)
def test_model_options_carry_over(option, tmp_path):
    model = tiny_detector(option)
    example, other = random_image(EXAMPLE_SIZE, 0), random_image(OTHER_SIZES[0], 1)
    traced, run = export_both(model, example, tmp_path)
    for image in (example, other):
        reference = eager_detections(model, image)
        assert_same_detections(reference, traced(image))
        assert_same_detections(reference, run(image))


def test_no_detections_give_empty_outputs(tmp_path):
    model = tiny_detector("MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.99")
    example, other = random_image(EXAMPLE_SIZE, 0), random_image(OTHER_SIZES[0], 1)
    traced, run = export_both(model, example, tmp_path)
    for image in (example, other):
        for boxes, scores, labels in (traced(image), run(image)):
            assert boxes.shape == (0, 4) and scores.shape == (0,) and labels.shape == (0,)


def test_an_example_without_proposals_or_of_another_shape_is_refused(tmp_path):
    detector = ExportableDetector(model=tiny_detector())
    with pytest.raises(ValueError, match=r"one \(3, h, w\) image, got shape \(1, 3, 64, 64\)"):
        export_torchscript(detector, tmp_path / "model.ts", example=random_image((64, 64), 0)[None])
    detector.model.rpn.min_size = 1e6  # every proposal too small
    with pytest.raises(ValueError, match="no box on the export example"):
        export_onnx(detector, tmp_path / "model.onnx", example=random_image((64, 64), 0))
    assert not (tmp_path / "model.ts").exists() and not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["TEST.MULTI_SCALE.ENABLED=true"], "TEST.MULTI_SCALE.ENABLED"),
        (["TEST.FLIP=true"], "TEST.FLIP"),
        (["TEST.BOX_REFINEMENT.ENABLED=true"], "TEST.BOX_REFINEMENT.ENABLED"),
        (["TEST.BOX_VOTING.ENABLED=true"], "TEST.BOX_VOTING.ENABLED"),
        (["TEST.AMP.ENABLED=true", "TEST.AMP.DTYPE=bfloat16"], "TEST.AMP.ENABLED"),
    ],
)
def test_the_test_time_add_ons_and_amp_are_refused_by_name(overrides, key):
    model = build_model(load_config(CONFIG, ["MODEL.DEVICE=cpu", "MODEL.BACKBONE.WIDTH=8", *overrides]))
    assert export_blockers(model) == [key]
    with pytest.raises(ValueError, match=rf"this model has {key} on: export it with {key}=false"):
        ExportableDetector(model=model)


def test_several_blockers_and_compiled_modules_are_named_together():
    overrides = ["MODEL.DEVICE=cpu", "MODEL.BACKBONE.WIDTH=8", "TEST.FLIP=true", "TEST.BOX_VOTING.ENABLED=true"]
    cfg = load_config(CONFIG, overrides)
    model = compile_for_inference(build_model(cfg))  # compiled lazily: nothing runs here
    assert export_blockers(model) == ["TEST.FLIP", "TEST.BOX_VOTING.ENABLED", "TEST.COMPILE"]
    with pytest.raises(ValueError, match="TEST.FLIP=false TEST.BOX_VOTING.ENABLED=false TEST.COMPILE=false"):
        check_exportable(model)
    check_exportable(build_model(load_config(CONFIG, ["MODEL.DEVICE=cpu", "MODEL.BACKBONE.WIDTH=8"])))
