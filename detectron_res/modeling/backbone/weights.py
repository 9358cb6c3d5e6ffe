"""Loading ImageNet ResNet weights into the trunk and res5.

The weights are read in torchvision's state_dict format, or converted to it (MSRA's Caffe2 `R-50.pkl` /
`R-101.pkl`, `tools/convert_weights.py` outputs; see `modeling/weight_formats.py`). torchvision names map by
prefix: `conv1.*`, `bn1.*`, `layer1..3.*` -> the trunk; `layer4.*` -> res5; `fc.*` (the ImageNet classifier) is not
used. Shapes must agree exactly; every missing and unused key is reported.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..weight_formats import (
    TORCHVISION_SETTINGS,
    ConvertedWeights,
    detect_format,
    msra_to_torchvision,
    read_weights_file,
    torchvision_resnet,
)

logger = logging.getLogger(__name__)

TORCHVISION_SCHEME = "torchvision://"
# torchvision keys that carry no weight of ours: BN's step counter, and the ImageNet classifier
IGNORED_SUFFIXES = ("num_batches_tracked",)
CLASSIFIER_PREFIX = "fc."


@dataclass
class WeightLoadReport:
    """What `load_resnet_weights` did: keys loaded, ours left at their initial value, theirs left unused."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def read_resnet_weights(source: str, *, depth: int) -> ConvertedWeights:
    """Reads ImageNet ResNet weights as a torchvision-format state_dict, with the config settings they need.

    Args:
        source: a local file: a torchvision state_dict (`torch.save` of it, bare or under "state_dict" or "model"),
            MSRA's Caffe2 blobs (`R-50.pkl`, `R-101.pkl`; converted here), or a `tools/convert_weights.py` output;
            or "torchvision://WEIGHTS" (e.g. "torchvision://IMAGENET1K_V2") to go through torchvision's weights
            API, which uses its download cache and needs the network only when the cache is empty.
        depth: the ResNet depth, to pick torchvision's weights enum.
    Returns:
        `ConvertedWeights`; its `settings` are the config values the weights need (empty for a bare torchvision
        state_dict file, whose preprocessing the file does not say).
    """
    if source.startswith(TORCHVISION_SCHEME):
        from torchvision.models import get_weight

        weights_name = f"ResNet{depth}_Weights.{source[len(TORCHVISION_SCHEME):]}"
        try:
            weights = get_weight(weights_name)
        except (ValueError, KeyError) as e:
            raise ValueError(f"Unknown torchvision weights {weights_name!r} (from {source!r})") from e
        return ConvertedWeights("torchvision", weights.get_state_dict(progress=False), dict(TORCHVISION_SETTINGS), [])
    if not os.path.isfile(source):
        raise FileNotFoundError(f"ResNet weights file not found: {source}")
    state, container = read_weights_file(source)
    found = detect_format(state)
    if found == "msra":
        return msra_to_torchvision(state)
    if found in ("detectron2", "detectron_res"):
        raise ValueError(
            f"{source} holds a whole {found} detector, not ImageNet ResNet weights: give it to MODEL.WEIGHTS, "
            "not MODEL.BACKBONE.WEIGHTS"
        )
    if found != "torchvision":
        raise ValueError(
            f"{source} is not a ResNet state_dict in torchvision's names, nor MSRA's Caffe2 blobs (its keys start "
            f"{', '.join(list(state)[:5])}); see tools/convert_weights.py"
        )
    converted = torchvision_resnet(state)
    settings = container.get("settings") if isinstance(container.get("settings"), Mapping) else {}
    return converted._replace(format=container.get("format", "torchvision"), settings=dict(settings))


def read_resnet_state_dict(source: str, *, depth: int) -> dict[str, Tensor]:
    """The torchvision-format state_dict of `read_resnet_weights`."""
    return read_resnet_weights(source, depth=depth).state_dict


def split_torchvision_keys(state_dict: Mapping[str, Tensor]) -> tuple[dict, dict, list[str]]:
    """torchvision ResNet keys -> (trunk state, res5 state, keys we do not use)."""
    trunk, res5, unused = {}, {}, []
    for key, value in state_dict.items():
        if key.startswith("layer4."):
            res5[key[len("layer4."):]] = value
        elif key.startswith(CLASSIFIER_PREFIX):
            unused.append(key)
        else:
            trunk[key] = value
    return trunk, res5, unused


def _load_into(module: nn.Module, state: dict[str, Tensor], prefix: str, source: str) -> tuple[list, list, list]:
    """Loads `state` into `module` after checking every shape; returns (loaded, missing, unexpected) full keys."""
    own = module.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(
                f"Shape mismatch for {prefix}{key} loading {source}: checkpoint {tuple(value.shape)}, "
                f"model {tuple(own[key].shape)} (is MODEL.BACKBONE.DEPTH/WIDTH right for these weights?)"
            )
    result = module.load_state_dict(state, strict=False)
    missing = [prefix + k for k in result.missing_keys if not k.endswith(IGNORED_SUFFIXES)]
    unexpected = [prefix + k for k in result.unexpected_keys if not k.endswith(IGNORED_SUFFIXES)]
    loaded = [prefix + k for k in state if k in own]
    return loaded, missing, unexpected


def load_resnet_weights(
    *, trunk: nn.Module, res5: nn.Module, state_dict: Mapping[str, Tensor], source: str = "state_dict"
) -> WeightLoadReport:
    """Copies a torchvision ResNet state_dict into the trunk and res5, reporting missing and unused keys.

    Raises ValueError on a shape mismatch. `source` only names the weights in messages.
    """
    trunk_state, res5_state, unused = split_torchvision_keys(state_dict)
    report = WeightLoadReport(unexpected=list(unused))
    for module, state, prefix in ((trunk, trunk_state, ""), (res5, res5_state, "layer4.")):
        loaded, missing, unexpected = _load_into(module, state, prefix, source)
        report.loaded += loaded
        report.missing += missing
        report.unexpected += unexpected
    logger.info("Loaded %d ResNet tensors from %s", len(report.loaded), source)
    if report.missing:
        logger.warning("Weights missing from %s (left at their initialisation): %s", source, ", ".join(report.missing))
    if report.unexpected:
        logger.info("Keys of %s not used by the detector: %s", source, ", ".join(report.unexpected))
    return report
