"""Loading ImageNet ResNet weights in torchvision's state_dict format into the trunk and res5.

torchvision names map by prefix: `conv1.*`, `bn1.*`, `layer1..3.*` -> the trunk; `layer4.*` -> res5;
`fc.*` (the ImageNet classifier) is not used. Shapes must agree exactly; every missing and unused key is reported.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

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


def read_resnet_state_dict(source: str, *, depth: int) -> dict[str, Tensor]:
    """Reads a torchvision-format ResNet state_dict.

    Args:
        source: a local file (`torch.save` of a state_dict, or of a dict holding it under "state_dict" or
            "model"), or "torchvision://WEIGHTS" (e.g. "torchvision://IMAGENET1K_V2") to go through torchvision's
            weights API, which uses its download cache and needs the network only when the cache is empty.
        depth: the ResNet depth, to pick torchvision's weights enum.
    """
    if source.startswith(TORCHVISION_SCHEME):
        from torchvision.models import get_weight

        weights_name = f"ResNet{depth}_Weights.{source[len(TORCHVISION_SCHEME):]}"
        try:
            weights = get_weight(weights_name)
        except (ValueError, KeyError) as e:
            raise ValueError(f"Unknown torchvision weights {weights_name!r} (from {source!r})") from e
        return weights.get_state_dict(progress=False)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"ResNet weights file not found: {source}")
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, ...
        raise ValueError(f"Could not read ResNet weights from {source}: {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{source} does not hold a state_dict of tensors")
    return dict(state)


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
