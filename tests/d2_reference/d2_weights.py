"""Seeded "random but realistic" R50-C4 weights in detectron2's model-zoo names and `.pkl` form, the weights both
toolkits ran on to record (make_fixtures.py) and to check (test_d2_reference.py) the fixtures of this folder.

Pure numpy from one seed, so that CI regenerates the same float32 values everywhere (no 130 MB file committed):
- every conv He-initialised; every FrozenBN given running statistics of the scale of its input (the stem's are in
  the 0-255 pixel units, as in MSRA's weights) with weight and bias chosen so that the affine map it computes keeps
  activations of order 1 through res4 and res5 (the last norm of a block small, the residual stream grows slowly);
- the RPN's objectness and deltas and the box predictor's scores and deltas drawn wide enough that proposals and
  detections are spread (logits of a few units across anchors and RoIs), so that their order is not decided by
  float rounding.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np

SEED = 2202
FROZEN_BN_EPS = 1e-5
BLOCKS = (3, 4, 6, 3)  # R50: res2..res5
# scale of the stem conv's output on MSRA/Caffe input (BGR minus the mean pixel, std 1): about 85 per channel
STEM_OUTPUT_STD = 85.0
# the box classifier's weights are wide (logits spread across RoIs by about 1.5); its bias cancels what they give on
# the mean pooled res5 feature of the RoIs of the fixture images (measured once, rounded), so that no class wins on
# every RoI only through that common part
CLS_STD = 1.0
CLS_CENTRE = [
    -19.12, 6.53, -7.01, 14.41, -8.04, -3.66, -12.69, 0.73, 0.98, 2.52, 3.87, -0.0, 6.33, -4.17,
    -9.25, 3.31, 6.23, 6.72, -13.51, -8.06, 2.09, -11.31, -11.91, 14.98, 4.35, 6.62, 8.89, -11.76,
    16.19, 1.95, 26.91, -21.69, 9.07, 12.4, -2.55, -6.07, 8.04, 14.06, -2.66, -11.53, 4.56, 2.14,
    -5.88, -9.03, -12.47, -7.95, -29.57, -12.3, 4.4, -20.6, -17.4, 11.43, -9.84, 12.43, -1.51, 7.36,
    -7.12, 3.71, -9.83, -9.83, -6.67, -5.51, 1.72, -6.73, 15.31, 8.94, -12.17, 3.45, -4.89, 2.65,
    6.51, 5.66, 11.92, -6.07, -1.05, 11.4, -5.97, 8.63, 0.97, -4.05, -6.86,
]


def detectron2_r50_c4_state(*, seed: int = SEED, num_classes: int = 80) -> dict[str, np.ndarray]:
    """detectron2's GeneralizedRCNN R50-C4 state_dict (model-zoo names, float32 numpy arrays) drawn from `seed`."""
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}

    def frozen_bn(name: str, channels: int, *, input_std: float, scale: tuple[float, float]) -> None:
        """A FrozenBN whose running statistics describe an input of about `input_std` and whose map is
        y = (x - mean) / sqrt(var + eps) * weight + bias = x * s + t, s ~ U(scale) / input_std, t ~ U(-0.1, 0.1)."""
        s = rng.uniform(*scale, channels) / input_std
        t = rng.uniform(-0.1, 0.1, channels)
        var = (input_std * rng.uniform(0.7, 1.4, channels)) ** 2
        mean = rng.normal(0.0, 0.2 * input_std, channels)
        state[f"{name}.norm.running_mean"] = mean.astype(np.float32)
        state[f"{name}.norm.running_var"] = var.astype(np.float32)
        state[f"{name}.norm.weight"] = (s * np.sqrt(var + FROZEN_BN_EPS)).astype(np.float32)
        state[f"{name}.norm.bias"] = (t + mean * s).astype(np.float32)

    def conv(name: str, out_channels: int, in_channels: int, k: int, *, input_std: float = 1.0,
             scale: tuple[float, float] = (0.6, 1.0)) -> None:
        """A bias-free conv, He-initialised, and its FrozenBN."""
        fan_in = in_channels * k * k
        weight = rng.normal(0.0, np.sqrt(2.0 / fan_in), (out_channels, in_channels, k, k))
        state[f"{name}.weight"] = weight.astype(np.float32)
        frozen_bn(name, out_channels, input_std=input_std, scale=scale)

    conv("backbone.stem.conv1", 64, 3, 7, input_std=STEM_OUTPUT_STD)
    in_channels = 64
    for stage, count in zip(range(2, 6), BLOCKS):
        planes = 64 * 2 ** (stage - 2)
        prefix = f"backbone.res{stage}" if stage < 5 else "roi_heads.res5"
        for block in range(count):
            name = f"{prefix}.{block}"
            if block == 0:
                conv(f"{name}.shortcut", planes * 4, in_channels, 1, scale=(0.5, 0.8))
            conv(f"{name}.conv1", planes, in_channels, 1)
            conv(f"{name}.conv2", planes, planes, 3)
            conv(f"{name}.conv3", planes * 4, planes, 1, scale=(0.15, 0.35))
            in_channels = planes * 4

    def layer(name: str, shape: tuple[int, ...], *, std: float, bias_std: float, bias_mean: float = 0.0) -> None:
        state[f"{name}.weight"] = rng.normal(0.0, std, shape).astype(np.float32)
        state[f"{name}.bias"] = rng.normal(bias_mean, bias_std, shape[0]).astype(np.float32)

    anchors = 15  # 5 sizes x 3 aspect ratios
    layer("proposal_generator.rpn_head.conv", (1024, 1024, 3, 3), std=np.sqrt(2.0 / (1024 * 9)), bias_std=0.05)
    layer("proposal_generator.rpn_head.objectness_logits", (anchors, 1024, 1, 1), std=0.2, bias_std=0.5,
          bias_mean=-2.0)
    layer("proposal_generator.rpn_head.anchor_deltas", (anchors * 4, 1024, 1, 1), std=0.02, bias_std=0.05)
    layer("roi_heads.box_predictor.cls_score", (num_classes + 1, 2048), std=CLS_STD, bias_std=0.5)
    if num_classes == 80:  # centred on the pooled res5 feature of typical RoIs (see CLS_CENTRE)
        state["roi_heads.box_predictor.cls_score.bias"] += np.asarray(CLS_CENTRE, np.float32)
    layer("roi_heads.box_predictor.bbox_pred", (num_classes * 4, 2048), std=0.1, bias_std=0.1)
    return state


def state_digest(state: dict[str, np.ndarray]) -> str:
    """sha256 over the names, shapes and bytes of `state`'s arrays in name order: the same on every machine that
    draws the same values (a numpy whose generator changed would give other weights, and other fixtures)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        array = np.ascontiguousarray(state[name])
        digest.update(f"{name}{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def write_detectron2_pkl(
    path: str | Path, *, seed: int = SEED, state: dict[str, np.ndarray] | None = None
) -> Path:
    """Writes the weights of `seed` (or `state`, drawn already) as detectron2's model zoo does (a pickle of
    {"model": name -> numpy array, "__author__": ...}) to `path` (about 130 MB) and returns it."""
    path = Path(path)
    state = detectron2_r50_c4_state(seed=seed) if state is None else state
    data = {"model": state, "__author__": "detectron_res tests/d2_reference"}
    with open(path, "wb") as handle:
        pickle.dump(data, handle, protocol=4)
    return path
