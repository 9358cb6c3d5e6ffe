"""detectron_res against detectron2's own recorded outputs (fixtures.json, fixtures.npz; README.md says how
make_fixtures.py recorded them with detectron2 02b5c4e2 on the CPU), on the seeded R50-C4 weights of d2_weights.py
loaded from detectron2's .pkl form into configs/d2_r50_c4.yaml. detectron2 is not needed here.

- Inference (issue 22, acceptance 1): from the original photo, through detectron_res's test mapper and model with the
  d2 config, the resized input is detectron2's to the byte, res4 and the RPN's proposals agree, and >= 99 % of the
  detections match detectron2's at IoU > 0.99 with the same class and a score within 1e-3, on every image.
- Training (acceptance 2): one step on a fixed batch, with the same fixed proposals and the same sampling rule fed to
  both (d2_sampling.py), through detectron_res's real matching and loss code: the RPN's and Fast R-CNN's losses within
  1e-4 relative and the gradient norms within 1e-3 relative of detectron2's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from d2_sampling import FixedOrderSampler
from d2_weights import detectron2_r50_c4_state, state_digest, write_detectron2_pkl
from detectron_res.config import load_config
from detectron_res.data.build import build_test_mapper, build_train_mapper
from detectron_res.engine.runner import load_for_inference
from detectron_res.modeling.weight_formats import detectron2_name

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
META = json.loads((HERE / "fixtures.json").read_text())
ARRAYS = dict(np.load(HERE / "fixtures.npz"))
INFERENCE_IMAGES = sorted(META["inference"]["images"])


def digest(array: np.ndarray) -> str:
    """make_fixtures.digest: the sha256 of an array's bytes, with its shape and dtype."""
    array = np.ascontiguousarray(array)
    return f"{array.dtype}{list(array.shape)}:" + hashlib.sha256(array.tobytes()).hexdigest()


def config(tmp_path: Path, weights: Path, overrides: list[str] = ()):
    """configs/d2_r50_c4.yaml on the CPU with the seeded weights."""
    return load_config(
        str(REPO / "configs" / "d2_r50_c4.yaml"),
        ["MODEL.DEVICE=cpu", f"MODEL.WEIGHTS={weights}", f"OUTPUT_DIR={tmp_path / 'output'}", *overrides],
    )


@pytest.fixture(scope="module")
def state() -> dict[str, np.ndarray]:
    """The seeded weights, detectron2's names -> numpy arrays, regenerated from the seed."""
    return detectron2_r50_c4_state(seed=META["weights"]["seed"])


@pytest.fixture(scope="module")
def weights(state, tmp_path_factory) -> Path:
    """The seeded weights in detectron2's model-zoo .pkl form (about 130 MB)."""
    return write_detectron2_pkl(tmp_path_factory.mktemp("d2_weights") / "d2_r50_c4_seeded.pkl", state=state)


def test_the_weights_are_those_the_fixtures_were_recorded_on(state):
    """Regenerated here, the weights are detectron2's R50-C4 (275 tensors, 33.9 M values) and bit for bit the ones
    make_fixtures.py gave detectron2; were numpy's generator to change, this says so before the comparisons fail."""
    assert len(state) == META["weights"]["tensors"] == 275
    assert sum(array.size for array in state.values()) == 33_897_884
    assert state_digest(state) == META["weights"]["sha256"]


def match_fraction(
    ours: tuple[torch.Tensor, ...], theirs: tuple[torch.Tensor, ...], *, iou: float, score_tol: float | None
) -> float:
    """One-to-one greedy matching of detections (boxes (D, 4), then optionally scores (D,) and classes (D,)): each of
    theirs, in order, takes the unmatched one of ours with the highest IoU above `iou` (same class, score within
    `score_tol`); the matched count over the larger of the two counts."""
    our_boxes, their_boxes = ours[0], theirs[0]
    if len(our_boxes) == 0 or len(their_boxes) == 0:
        return float(len(our_boxes) == len(their_boxes))
    overlap = box_iou(their_boxes, our_boxes)  # (T, O)
    allowed = overlap > iou
    if score_tol is not None:
        allowed &= (theirs[1][:, None] - ours[1][None, :]).abs() <= score_tol
        allowed &= theirs[2][:, None] == ours[2][None, :]
    taken = torch.zeros(len(our_boxes), dtype=torch.bool)
    matched = 0
    for row in range(len(their_boxes)):
        candidates = torch.where(allowed[row] & ~taken, overlap[row], torch.tensor(-1.0))
        best = int(candidates.argmax())
        if candidates[best] > 0:
            taken[best] = True
            matched += 1
    return matched / max(len(our_boxes), len(their_boxes))


@pytest.fixture(scope="module")
def inference_results(weights, tmp_path_factory) -> dict:
    """detectron_res's res4, proposals and detections for each fixture image, from the original photo through the
    d2 config's test mapper and model."""
    cfg = config(tmp_path_factory.mktemp("d2_inference"), weights)
    model, _ = load_for_inference(cfg)
    mapper = build_test_mapper(cfg)
    seen: dict = {}
    model.backbone.register_forward_hook(lambda module, inputs, output: seen.__setitem__("res4", output))
    model.rpn.register_forward_hook(lambda module, inputs, output: seen.__setitem__("proposals", output[0]))
    results = {}
    for name in INFERENCE_IMAGES:
        record = META["inference"]["images"][name]
        height, width = record["original_hw"]
        x = mapper({"file_name": str(HERE / "images" / name), "image_id": 0, "height": height, "width": width})
        with torch.no_grad():
            (detections,) = model([x])
        results[name] = {"input": x["image"], "res4": seen["res4"][0], "proposals": seen["proposals"][0], **detections}
    return results


@pytest.mark.parametrize("name", INFERENCE_IMAGES)
def test_inference_from_the_original_photo_equals_detectron2(name, inference_results):
    """Every figure is compared before the test fails, so that its message says which of them differ."""
    record = META["inference"]["images"][name]
    ours = inference_results[name]
    key = name.removesuffix(".jpg")
    problems = []
    # the resize: detectron2's input pixels to the byte (PIL bilinear, its rounding of the size)
    if list(ours["input"].shape[1:]) != record["input_hw"]:
        problems.append(f"input size {list(ours['input'].shape[1:])} != detectron2's {record['input_hw']}")
    elif digest(ours["input"].permute(1, 2, 0).numpy()) != record["input_rgb"]:
        problems.append("input pixels differ from detectron2's")
    # res4: the trunk on that input
    res4 = ours["res4"]
    if list(res4.shape) != record["res4_shape"]:
        problems.append(f"res4 shape {list(res4.shape)} != {record['res4_shape']}")
    else:
        for stat, value in (("mean", float(res4.mean())), ("std", float(res4.std()))):
            if abs(value - record[f"res4_{stat}"]) > 1e-4 * record[f"res4_{stat}"]:
                problems.append(f"res4 {stat} {value:.6g} != {record[f'res4_{stat}']:.6g}")
        channel_mean = res4.mean(dim=(1, 2)).numpy()
        if not np.allclose(channel_mean, ARRAYS[f"{key}/res4_channel_mean"], rtol=1e-3, atol=1e-5):
            problems.append("res4 per-channel means differ")
    # the RPN's 1000 proposals (input pixels)
    their_proposals = torch.from_numpy(ARRAYS[f"{key}/proposals"])
    assert len(their_proposals) == record["proposals"] == 1000
    fraction = match_fraction((ours["proposals"],), (their_proposals,), iou=0.99, score_tol=None)
    if len(ours["proposals"]) != 1000 or fraction < 0.99:
        problems.append(f"{len(ours['proposals'])} proposals, {fraction:.1%} matched at IoU > 0.99")
    # the final detections (original pixels)
    theirs = tuple(torch.from_numpy(ARRAYS[f"{key}/{field}"]) for field in ("boxes", "scores", "classes"))
    assert len(theirs[0]) == record["detections"] == 100
    fraction = match_fraction((ours["boxes"], ours["scores"], ours["labels"]), theirs, iou=0.99, score_tol=1e-3)
    if len(ours["boxes"]) != 100 or fraction < 0.99:
        problems.append(f"{len(ours['boxes'])} detections, {fraction:.1%} matched (IoU > 0.99, class, score 1e-3)")
    assert not problems, f"{name}: " + "; ".join(problems)


# -- training -------------------------------------------------------------------------------------------------------
TRAIN = META["training"]


def training_overrides() -> list[str]:
    """The d2 config's keys that make_fixtures.py overrode in detectron2's (its INPUT.MIN_SIZE_TRAIN, RANDOM_FLIP
    none, MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE) in detectron_res's names."""
    values = dict(zip(TRAIN["overrides"][::2], TRAIN["overrides"][1::2]))
    short_side = int(values["INPUT.MIN_SIZE_TRAIN"].strip("(,)"))
    assert values["INPUT.RANDOM_FLIP"] == "none"
    rois = int(values["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE"])
    return [
        f"INPUT.MIN_SIZE_TRAIN=[{short_side}]", "INPUT.HFLIP_PROB=0.0", f"MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE={rois}"
    ]


@pytest.fixture(scope="module")
def training_step(weights, tmp_path_factory) -> dict:
    """One training step of detectron_res's d2 model on the fixture batch: the batch, the sampled anchors and RoIs,
    the losses and the model with its gradients."""
    cfg = config(tmp_path_factory.mktemp("d2_training"), weights, training_overrides())
    model, _ = load_for_inference(cfg)
    model.train()
    mapper = build_train_mapper(cfg)
    batch = [mapper({**r, "file_name": str(HERE / "images" / r["file_name"])}) for r in TRAIN["records"]]
    # the same sampling rule as detectron2's in make_fixtures.py, and the same fixed proposals instead of the RPN's
    model.rpn.sampler = FixedOrderSampler(cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE, cfg.MODEL.RPN.POSITIVE_FRACTION)
    model.roi_heads.sampler = FixedOrderSampler(
        cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE, cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION
    )
    fixed = [torch.from_numpy(ARRAYS[f"train/{index}/proposals"]) for index in range(len(batch))]
    rpn_forward = model.rpn.forward
    model.rpn.forward = lambda *args, **kwargs: (fixed, rpn_forward(*args, **kwargs)[1])
    seen: dict = {}
    label_anchors = model.rpn.label_and_sample_anchors
    model.rpn.label_and_sample_anchors = lambda *a, **k: seen.setdefault("anchors", label_anchors(*a, **k))
    sample_rois = model.roi_heads.label_and_sample_proposals
    model.roi_heads.label_and_sample_proposals = lambda *a, **k: seen.setdefault("rois", sample_rois(*a, **k))
    losses = model(batch)
    sum(losses.values()).backward()
    return {"batch": batch, "losses": losses, "model": model, **seen}


def test_training_batch_is_detectron2s(training_step):
    for index, x in enumerate(training_step["batch"]):
        assert list(x["image"].shape[1:]) == TRAIN["input_hw"][index]
        assert digest(x["image"].permute(1, 2, 0).numpy()) == TRAIN["inputs_rgb"][index]
        np.testing.assert_allclose(x["gt_boxes"].numpy(), ARRAYS[f"train/{index}/gt_boxes"], rtol=0, atol=1e-3)
        np.testing.assert_array_equal(x["gt_classes"].numpy(), ARRAYS[f"train/{index}/gt_classes"])


def test_training_step_samples_detectron2s_anchors_and_rois(training_step):
    labels, _ = training_step["anchors"]
    rois, roi_classes, _ = training_step["rois"]
    for index in range(len(labels)):
        np.testing.assert_array_equal(torch.nonzero(labels[index] == 1).flatten().numpy(),
                                      ARRAYS[f"train/{index}/anchors_positive"])
        np.testing.assert_array_equal(torch.nonzero(labels[index] == 0).flatten().numpy(),
                                      ARRAYS[f"train/{index}/anchors_negative"])
        order = np.lexsort(rois[index].numpy().T[::-1])
        np.testing.assert_array_equal(rois[index].numpy()[order], ARRAYS[f"train/{index}/rois"])
        np.testing.assert_array_equal(roi_classes[index].numpy()[order], ARRAYS[f"train/{index}/roi_classes"])


def test_training_losses_equal_detectron2s(training_step):
    ours = {name: float(value.detach()) for name, value in training_step["losses"].items()}
    assert set(ours) == set(TRAIN["losses"]) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
    differ = {
        name: (ours[name], theirs)
        for name, theirs in TRAIN["losses"].items()
        if ours[name] != pytest.approx(theirs, rel=1e-4)
    }
    assert not differ, f"losses (ours, detectron2's) beyond 1e-4 relative: {differ}"


def test_training_gradients_equal_detectron2s(training_step):
    parameters = dict(training_step["model"].named_parameters())
    trainable = sorted(name for name, p in parameters.items() if p.requires_grad)
    assert sorted(detectron2_name(name) for name in TRAIN["trainable_parameters"]) == trainable  # 52: res3 on
    assert all(parameters[name].grad is not None for name in trainable)
    differ = {}
    for their_name, theirs in TRAIN["gradient_norms"].items():
        if their_name.endswith("*"):  # a stage's or head's parameters together
            prefix = their_name[:-1]
            names = [detectron2_name(n) for n in TRAIN["trainable_parameters"] if n.startswith(prefix)]
            ours = float(torch.stack([parameters[n].grad.double().pow(2).sum() for n in names]).sum().sqrt())
        else:
            ours = float(parameters[detectron2_name(their_name)].grad.norm())
        if ours != pytest.approx(theirs, rel=1e-3):
            differ[their_name] = (round(ours, 6), round(theirs, 6))
    assert not differ, f"{len(differ)} of {len(TRAIN['gradient_norms'])} gradient norms beyond 1e-3 relative: {differ}"
