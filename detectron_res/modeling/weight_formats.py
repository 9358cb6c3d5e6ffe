"""Weights from other toolkits, renamed to detectron_res's modules (`tools/convert_weights.py`, and read directly by
MODEL.BACKBONE.WEIGHTS / MODEL.WEIGHTS).

- torchvision ResNet state_dicts: the trunk and res5 keep torchvision's names, so nothing is renamed (`fc.*`, the
  ImageNet classifier, is not used by the detector).
- The MSRA ResNet-50/101 ImageNet weights as Detectron and detectron2 distribute them (`R-50.pkl`, `R-101.pkl`): a
  pickled dict of numpy arrays with Caffe2 names, made from MSRA's Caffe models by Detectron's
  `pickle_caffe_blobs.py`: `conv1_w`, `res_conv1_bn_s` / `_b` (each BatchNorm with its Scale layer already folded
  into a per-channel affine), `res<stage>_<block>_branch{1,2a,2b,2c}_w` and `_bn_s` / `_bn_b`, a bias `_b` per
  convolution, and the classifier `fc1000_w` / `_b` (or `pred_w` / `_b`). They become torchvision's names; each
  affine becomes a FrozenBN with zero mean and variance 1 - eps (so that it multiplies by exactly its scale), and a
  convolution's bias is folded into the affine after it (s * (conv + b) + t = s * conv + (t + s * b)). These networks
  take BGR pixels minus the mean pixel (std 1) and stride in a stage's first 1x1 convolution: `MSRA_SETTINGS`.
- detectron2's C4 detectors (GeneralizedRCNN with Res5ROIHeads, e.g. the model zoo's faster_rcnn_R_50_C4_3x): their
  `backbone.stem` / `backbone.res2..4`, `roi_heads.res5`, `roi_heads.box_predictor` and `proposal_generator.rpn_head`
  become our `backbone`, `roi_heads.res5`, `roi_heads.predictor` and `rpn.head`. The layouts are the same: anchors
  in (H, W, A) order with sizes outer and aspect ratios inner, deltas (dx, dy, dw, dh) per anchor, classes
  0..K-1 with background last (K), class-specific boxes (4K). detectron2's COCO classes are the 80 categories in
  the order of their COCO ids, which is how detectron_res numbers a COCO json's categories too, so the classes map
  one to one.

Every conversion is complete or an error: a source key that has no place, or a place that no source key fills, is
named. Pickle files are read with an unpickler that only builds numpy arrays and plain containers.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..utils.io import UnreadableFileError, file_kind_problem, read_torch_file

logger = logging.getLogger(__name__)

FORMATS = ("torchvision", "msra", "detectron2")

# The config values MSRA's weights were trained with (detectron2's defaults). A model built otherwise computes
# something else with them.
MSRA_PIXEL_MEAN = [103.53, 116.28, 123.675]
MSRA_SETTINGS: dict[str, Any] = {
    "MODEL.BACKBONE.STRIDE_IN_1X1": True,
    "INPUT.FORMAT": "BGR",
    "MODEL.PIXEL_MEAN": MSRA_PIXEL_MEAN,
    "MODEL.PIXEL_STD": [1.0, 1.0, 1.0],
}
TORCHVISION_SETTINGS: dict[str, Any] = {
    "MODEL.BACKBONE.STRIDE_IN_1X1": False,
    "INPUT.FORMAT": "RGB",
    "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
    "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
}
# detectron2's model-zoo C4 detectors start from MSRA's weights; configs/d2_r50_c4.yaml sets the rest of theirs
DETECTRON2_SETTINGS: dict[str, Any] = dict(MSRA_SETTINGS)

FROZEN_BN_EPS = 1e-5  # torchvision's FrozenBatchNorm2d


class ConvertedWeights(NamedTuple):
    """Weights in detectron_res's names, what the source was and what it needs of the config."""

    format: str  # "torchvision", "msra" or "detectron2"
    state_dict: dict[str, Tensor]  # torchvision ResNet names (backbone formats) or FasterRCNN names (detectron2)
    settings: dict[str, Any]  # dotted config keys -> the values the weights were trained with
    dropped: list[str]  # source keys with no weight in them (optimizer momenta, anchors, pixel statistics)


# -- reading files -------------------------------------------------------------------------------------------------
class _ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays, numpy scalars and plain Python containers only (Detectron's and detectron2's .pkl files
    hold nothing else); any other class is refused, so reading a file runs no code from it."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),
        *((builtins, name) for builtins in ("builtins", "__builtin__") for name in ("set", "frozenset", "slice")),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: only numpy arrays and plain containers are read, since loading "
            "anything else could run code from the file"
        )


def read_pickled_arrays(path: str | os.PathLike) -> dict:
    """A Detectron / detectron2 `.pkl` file: its top-level dict (Python 2 pickles decoded as latin-1).

    Raises:
        ValueError: one line naming the file and why it cannot be read: empty, text, a zip archive (a PyTorch
            file), truncated, or holding a class other than numpy's arrays and plain containers (refused unbuilt).
    """
    problem = file_kind_problem(path, expected="pickle")
    if problem is None and _starts_with(path, b"PK\x03\x04"):
        problem = "a zip archive (a PyTorch file?), not a pickle: name it .pth"
    if problem is None:
        try:
            with open(path, "rb") as handle:
                data = _ArrayUnpickler(handle, encoding="latin1").load()
        except (EOFError, pickle.UnpicklingError) as error:
            truncated = isinstance(error, EOFError) or "truncated" in str(error)
            problem = f"a truncated pickle ({os.path.getsize(path):,} bytes)" if truncated else str(error)
        except (ValueError, TypeError, AttributeError, ImportError) as error:
            problem = f"{type(error).__name__}: {error}"
    if problem is not None:
        raise UnreadableFileError(f"Could not read {path} as a pickle of numpy arrays: {problem}")
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a pickled {type(data).__name__}, not a dict of arrays")
    return data


def _starts_with(path: str | os.PathLike, prefix: bytes) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(prefix)) == prefix


def read_weights_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors of a weights file and the container's other entries.

    `.pkl`: a pickle of numpy arrays, bare (MSRA's R-50.pkl), under "blobs" (Detectron's detectors) or under "model"
    (detectron2's model zoo, with "__author__"). Any other name: `torch.load` (weights only) of a state_dict, bare or
    under "model" or "state_dict" (torchvision, detectron2 and detectron_res checkpoints)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file not found: {path}")
    if path.suffix == ".pkl":
        data = read_pickled_arrays(path)
    else:
        data = read_torch_file(path, what="weights file")
        if not isinstance(data, Mapping):
            raise ValueError(f"{path} holds a {type(data).__name__}, not a state_dict")
    container: dict[str, Any] = {}
    for key in ("model", "state_dict", "blobs"):
        if isinstance(data.get(key), Mapping):
            container = {k: v for k, v in data.items() if k != key}
            data = data[key]
            break
    tensors, not_arrays = {}, []
    for key, value in data.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, Tensor):
            tensors[str(key)] = value
        else:
            not_arrays.append(str(key))
    if not tensors:
        raise ValueError(f"{path} holds no weight tensors")
    if not_arrays:
        logger.info("Entries of %s that are not arrays, ignored: %s", path, ", ".join(not_arrays[:10]))
    return tensors, container


def detect_format(keys) -> str | None:
    """Which toolkit's names `keys` are in: "msra", "detectron2", "torchvision" (a ResNet), "detectron_res" (a
    detector of ours), or None."""
    keys = set(keys)
    if "conv1_w" in keys or "res_conv1_bn_s" in keys:
        return "msra"
    if any(k.startswith(("backbone.stem.", "backbone.res2.", "proposal_generator.", "roi_heads.box_predictor."))
           for k in keys):
        return "detectron2"
    if any(k.startswith(("backbone.layer", "rpn.head.", "roi_heads.predictor.")) for k in keys):
        return "detectron_res"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "torchvision"
    return None


# -- MSRA / Caffe2 -> torchvision ----------------------------------------------------------------------------------
_MSRA_BRANCH = {"branch2a": ("conv1", "bn1"), "branch2b": ("conv2", "bn2"), "branch2c": ("conv3", "bn3"),
                "branch1": ("downsample.0", "downsample.1")}
_MSRA_KEY = re.compile(r"res(\d)_(\d+)_(branch1|branch2a|branch2b|branch2c)_(w|b|bn_s|bn_b|bn_rm|bn_riv)")


def _msra_places(key: str) -> tuple[str, str, str] | None:
    """A Caffe2 blob name -> (conv name, norm name, which tensor) in torchvision's names, or None."""
    if key in ("conv1_w", "conv1_b"):
        return "conv1", "bn1", key[-1]
    if key.startswith("res_conv1_bn_"):
        return "conv1", "bn1", "bn_" + key.rsplit("_", 1)[1]
    match = _MSRA_KEY.fullmatch(key)
    if match is None:
        return None
    stage, block, branch, which = match.groups()
    if not 2 <= int(stage) <= 5:
        return None
    conv, norm = _MSRA_BRANCH[branch]
    prefix = f"layer{int(stage) - 1}.{block}."
    return prefix + conv, prefix + norm, which


def msra_to_torchvision(blobs: Mapping[str, Tensor], *, eps: float = FROZEN_BN_EPS) -> ConvertedWeights:
    """MSRA's Caffe2 ResNet blobs -> a torchvision ResNet state_dict (see the module docstring).

    Raises:
        ValueError: a blob that belongs nowhere, or a convolution without its affine (or the reverse).
    """
    convs: dict[str, dict[str, Tensor]] = {}  # conv name -> its blobs by kind ("w", "b", "bn_s", ...)
    norm_of: dict[str, str] = {}  # conv name -> the name of the norm after it
    state: dict[str, Tensor] = {}
    dropped, unknown = [], []
    for key, value in blobs.items():
        if key.endswith("_momentum"):  # SGD momenta saved by Caffe2 training
            dropped.append(key)
            continue
        if key in ("fc1000_w", "pred_w", "fc1000_b", "pred_b"):
            state["fc." + ("weight" if key.endswith("_w") else "bias")] = value.float()
            continue
        places = _msra_places(key)
        if places is None:
            unknown.append(key)
            continue
        conv, norm, which = places
        convs.setdefault(conv, {})[which] = value.float()
        norm_of[conv] = norm
    if unknown:
        names = ", ".join(sorted(unknown)[:10])
        raise ValueError(f"MSRA weights: {len(unknown)} blobs have no place in a ResNet: {names}")
    for conv, parts in sorted(convs.items()):
        norm = norm_of[conv]
        missing = [which for which in ("w", "bn_s", "bn_b") if which not in parts]
        if missing:
            raise ValueError(f"MSRA weights: {conv} ({norm}) lacks its {', '.join(missing)} blob")
        weight, scale, shift = parts["w"], parts["bn_s"], parts["bn_b"]
        mean = parts.get("bn_rm", torch.zeros_like(scale))
        var = parts.get("bn_riv", torch.full_like(scale, 1.0 - eps))
        if "b" in parts:  # conv bias b: norm(conv + b) = norm(conv) + b * scale / sqrt(var + eps)
            bias = parts["b"]
            if bool(bias.ne(0).any()):
                logger.info("MSRA weights: folding %s's bias into %s", conv, norm)
            shift = shift + bias * scale * torch.rsqrt(var + eps)
        state[f"{conv}.weight"] = weight
        state[f"{norm}.weight"] = scale
        state[f"{norm}.bias"] = shift
        state[f"{norm}.running_mean"] = mean
        state[f"{norm}.running_var"] = var
    return ConvertedWeights("msra", state, dict(MSRA_SETTINGS), dropped)


# -- detectron2 -> detectron_res -----------------------------------------------------------------------------------
_D2_BLOCK = re.compile(r"(backbone\.res(\d)|roi_heads\.res5)\.(\d+)\.(conv1|conv2|conv3|shortcut)(\.norm)?\.(\w+)")
_D2_NORM = {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3", "shortcut": "downsample.1"}
_D2_RENAMES = {
    "backbone.stem.conv1.weight": "backbone.conv1.weight",
    "proposal_generator.rpn_head.": "rpn.head.",
    "roi_heads.box_predictor.": "roi_heads.predictor.",
}
# buffers of older detectron2 checkpoints that hold no weight: pixel statistics (from the config) and cell anchors
_D2_NOT_WEIGHTS = re.compile(r"pixel_mean|pixel_std|proposal_generator\.anchor_generator\.cell_anchors\.\d+")


def detectron2_name(key: str) -> str | None:
    """One detectron2 C4 state_dict key -> ours, or None when it has no place in a C4 FasterRCNN."""
    if key.startswith("backbone.stem.conv1.norm."):
        return "backbone.bn1." + key[len("backbone.stem.conv1.norm."):]
    for theirs, ours in _D2_RENAMES.items():
        if key == theirs or (theirs.endswith(".") and key.startswith(theirs)):
            return ours + key[len(theirs):] if theirs.endswith(".") else ours
    match = _D2_BLOCK.fullmatch(key)
    if match is None:
        return None
    module, stage, block, conv, norm, tensor = match.groups()
    if stage is not None and not 2 <= int(stage) <= 4:
        return None
    prefix = f"backbone.layer{int(stage) - 1}" if stage is not None else "roi_heads.res5"
    if norm:
        return f"{prefix}.{block}.{_D2_NORM[conv]}.{tensor}"
    return f"{prefix}.{block}.{'downsample.0' if conv == 'shortcut' else conv}.{tensor}"


def detectron2_to_detectron_res(state: Mapping[str, Tensor], *, eps: float = FROZEN_BN_EPS) -> ConvertedWeights:
    """A detectron2 C4 detector's state_dict -> a FasterRCNN state_dict of ours (see the module docstring).

    FrozenBN statistics absent from old checkpoints become mean 0 and variance 1 - eps.

    Raises:
        ValueError: keys that have no place in a C4 FasterRCNN (an FPN or mask head, for example), named.
    """
    converted: dict[str, Tensor] = {}
    dropped, unknown = [], []
    for key, value in state.items():
        if _D2_NOT_WEIGHTS.fullmatch(key) or key.endswith("num_batches_tracked"):
            dropped.append(key)
            continue
        name = detectron2_name(key)
        if name is None:
            unknown.append(key)
        else:
            converted[name] = value.float() if value.is_floating_point() else value
    if unknown:
        raise ValueError(
            f"detectron2 weights: {len(unknown)} keys have no place in a C4 Faster R-CNN (is it an FPN or Mask "
            f"R-CNN model?): {', '.join(sorted(unknown)[:10])}"
        )
    for key in [k for k in converted if k.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight"))]:
        stem = key[: -len("weight")]
        converted.setdefault(stem + "running_mean", torch.zeros_like(converted[key]))
        converted.setdefault(stem + "running_var", torch.full_like(converted[key], 1.0 - eps))
    return ConvertedWeights("detectron2", converted, dict(DETECTRON2_SETTINGS), dropped)


# -- torchvision ---------------------------------------------------------------------------------------------------
_TORCHVISION_KEY = re.compile(r"(conv1|bn1)\.\w+|layer[1-4]\.\d+\.(conv[1-3]|bn[1-3]|downsample\.[01])\.\w+|fc\.\w+")


def torchvision_resnet(state: Mapping[str, Tensor]) -> ConvertedWeights:
    """A torchvision ResNet state_dict, checked to hold ResNet keys only (a "module." prefix from DataParallel is
    removed). Its settings are torchvision's ImageNet preprocessing and stride placement.

    Raises:
        ValueError: keys that are not a torchvision ResNet's, named.
    """
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    unknown = sorted(k for k in state if not _TORCHVISION_KEY.fullmatch(k))
    if unknown:
        raise ValueError(f"torchvision weights: {len(unknown)} keys are not a ResNet's: {', '.join(unknown[:10])}")
    dropped = [k for k in state if k.endswith("num_batches_tracked")]
    kept = {k: v for k, v in state.items() if k not in dropped}
    return ConvertedWeights("torchvision", kept, dict(TORCHVISION_SETTINGS), dropped)


def convert_weights(tensors: Mapping[str, Tensor], *, source_format: str) -> ConvertedWeights:
    """`tensors` in `source_format`'s names ("torchvision", "msra" or "detectron2") -> ours."""
    if source_format == "msra":
        return msra_to_torchvision(tensors)
    if source_format == "detectron2":
        return detectron2_to_detectron_res(tensors)
    if source_format == "torchvision":
        return torchvision_resnet(tensors)
    raise ValueError(f"Unknown weights format {source_format!r}; expected one of {FORMATS}")


def settings_problems(config_values: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    """`KEY=config value (the weights need VALUE)` for each of `settings` the config disagrees with; numbers are
    compared to 1e-3."""
    problems = []
    for key, needed in settings.items():
        value = config_values[key]
        if isinstance(needed, (list, tuple)):
            same = len(value) == len(needed) and all(abs(float(a) - float(b)) <= 1e-3 for a, b in zip(value, needed))
        else:
            same = value == needed
        if not same:
            problems.append(f"{key}={_show(value)} (the weights need {_show(needed)})")
    return problems


def describe_settings(settings: Mapping[str, Any]) -> str:
    """`KEY=VALUE, ...` in the config's spelling (true/false, [a, b, c])."""
    return ", ".join(f"{key}={_show(value)}" for key, value in settings.items())


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + "]"
    return str(value)


def convert_file(source: str | os.PathLike, *, source_format: str) -> ConvertedWeights:
    """Reads a weights file of `source_format` and converts it (see `convert_weights`).

    Raises:
        ValueError: the file's names are another toolkit's than `source_format` says.
    """
    tensors, _ = read_weights_file(source)
    found = detect_format(tensors)
    if found is not None and found != source_format:
        raise ValueError(f"{source} holds {found} names, not {source_format}'s: pass --from {found}"
                         if found in FORMATS else f"{source} is already in detectron_res's names")
    return convert_weights(tensors, source_format=source_format)


def save_converted(converted: ConvertedWeights, path: str | os.PathLike, *, source: str) -> None:
    """Writes `converted` where detectron_res reads it, atomically: backbone formats as {"state_dict"} for
    MODEL.BACKBONE.WEIGHTS, detectron2 detectors as {"model"} for MODEL.WEIGHTS; both with "format", "settings"
    (checked against the config when loaded) and "source"."""
    from ..utils import atomic_write

    key = "model" if converted.format == "detectron2" else "state_dict"
    payload = {key: converted.state_dict, "format": converted.format, "settings": converted.settings,
               "source": str(source)}
    atomic_write(path, lambda stream: torch.save(payload, stream))
