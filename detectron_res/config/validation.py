"""Value rules of the config: a table of small checks run after merging, before any work starts.

A *check* takes one value and returns why it is wrong (``"must be > 0"``) or None. ``VALUE_RULES`` pairs dotted keys
with checks; ``CROSS_KEY_RULES`` holds checks over several keys. To cover a new key, add a line to a table using
the check builders below (``at_least``, ``between``, ``one_of``, ``each``, ...).
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from detectron_res.config.node import ConfigError

__all__ = [
    "CROSS_KEY_RULES",
    "VALUE_RULES",
    "Check",
    "ConfigProblem",
    "CrossKeyRule",
    "all_of",
    "at_least",
    "between",
    "divides",
    "each",
    "find_problems",
    "format_problems",
    "greater_than",
    "key_at_most",
    "lookup",
    "matches",
    "non_empty",
    "of_length",
    "one_of",
    "strictly_increasing",
    "validate_config",
]

Check = Callable[[Any], "str | None"]
"""Returns a reason the value is invalid (completing "KEY=VALUE ..."), or None when it is fine."""


@dataclass(frozen=True)
class ConfigProblem:
    """One failed rule: the keys involved and a message naming them and their values."""

    keys: tuple[str, ...]
    message: str


CrossKeyRule = Callable[[Mapping[str, Any]], "ConfigProblem | None"]
"""A rule over several keys of the whole config; returns the problem or None."""


# -- check builders --------------------------------------------------------------------------------------------
def _compare(predicate: Callable[[Any], bool], reason: str) -> Check:
    def check(value: Any) -> str | None:
        try:
            return None if predicate(value) else reason
        except TypeError:
            return f"{reason} (and be a number)"

    return check


def greater_than(bound: float) -> Check:
    return _compare(lambda value: value > bound, f"must be > {bound}")


def at_least(bound: float) -> Check:
    return _compare(lambda value: value >= bound, f"must be >= {bound}")


def between(low: float, high: float, *, include_low: bool = True, include_high: bool = True) -> Check:
    """``low <= value <= high``; either end may be open (``include_low=False`` means ``low < value``)."""

    def inside(value: Any) -> bool:
        above = value >= low if include_low else value > low
        below = value <= high if include_high else value < high
        return above and below

    interval = f"{'[' if include_low else '('}{low}, {high}{']' if include_high else ')'}"
    return _compare(inside, f"must be in {interval}")


def one_of(*allowed: Any) -> Check:
    listing = ", ".join(repr(item) if isinstance(item, str) else str(item) for item in allowed)
    return lambda value: None if value in allowed else f"must be one of {listing}"


def matches(pattern: str, description: str) -> Check:
    """The whole (string) value matches the regular expression; ``description`` says what is accepted."""
    compiled = re.compile(pattern)
    return lambda value: None if isinstance(value, str) and compiled.fullmatch(value) else f"must be {description}"


def non_empty() -> Check:
    return lambda value: None if len(value) > 0 else "must not be empty"


def of_length(length: int) -> Check:
    return lambda value: None if len(value) == length else f"must have {length} elements, not {len(value)}"


def strictly_increasing() -> Check:
    def check(value: Sequence[Any]) -> str | None:
        ordered = all(earlier < later for earlier, later in itertools.pairwise(value))
        return None if ordered else "must be strictly increasing"

    return check


def divides(divisor: int) -> Check:
    return _compare(lambda value: value % divisor == 0, f"must be divisible by {divisor}")


def each(element_check: Check) -> Check:
    """Applies ``element_check`` to every element of a list value; names the first failing element."""

    def check(value: Iterable[Any]) -> str | None:
        for index, element in enumerate(value):
            reason = element_check(element)
            if reason is not None:
                return f"has element [{index}]={element!r} that {reason}"
        return None

    return check


def all_of(*checks: Check) -> Check:
    """The first failing reason among ``checks``."""

    def check(value: Any) -> str | None:
        for single in checks:
            reason = single(value)
            if reason is not None:
                return reason
        return None

    return check


# -- cross-key rule builders -------------------------------------------------------------------------------------
def lookup(cfg: Mapping[str, Any], dotted_key: str) -> Any:
    """The value at ``A.B.C``; a ConfigError names the key when it is missing."""
    node: Any = cfg
    for part in dotted_key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"Config has no key '{dotted_key}' (needed by a validation rule)")
        node = node[part]
    return node


def key_at_most(key: str, bound_key: str) -> CrossKeyRule:
    """Value of ``key`` (or each element, for a list) <= value of ``bound_key``."""

    def rule(cfg: Mapping[str, Any]) -> ConfigProblem | None:
        value, bound = lookup(cfg, key), lookup(cfg, bound_key)
        place = f"{bound_key}={bound!r}"
        if not isinstance(value, (list, tuple)):
            return None if value <= bound else ConfigProblem((key, bound_key), f"{key}={value!r} must be <= {place}")
        too_large = [element for element in value if element > bound]
        if not too_large:
            return None
        return ConfigProblem((key, bound_key), f"{key}={_show(value)} has values above {place}: {too_large}")

    return rule


def _loc_crop_fits_scales(cfg: Mapping[str, Any]) -> ConfigProblem | None:
    crop, scales = lookup(cfg, "LOC.CROP_SIZE"), lookup(cfg, "LOC.SCALE_RANGE")
    if len(scales) != 2 or crop <= scales[0] <= scales[1]:  # a wrong length is reported by the value rule
        return None
    return ConfigProblem(
        ("LOC.CROP_SIZE", "LOC.SCALE_RANGE"),
        f"LOC.SCALE_RANGE={_show(scales)} must be [low, high] with LOC.CROP_SIZE={crop!r} <= low <= high: the "
        "crop is taken from the image rescaled to a shorter side in that range",
    )


def _loc_center_crop_fits_test_size(cfg: Mapping[str, Any]) -> ConfigProblem | None:
    if lookup(cfg, "LOC.TEST_MODE") != "center_crop":
        return None
    crop, size = lookup(cfg, "LOC.CROP_SIZE"), lookup(cfg, "INPUT.MIN_SIZE_TEST")
    if crop <= size:
        return None
    return ConfigProblem(
        ("LOC.CROP_SIZE", "INPUT.MIN_SIZE_TEST"),
        f"LOC.TEST_MODE='center_crop' takes a LOC.CROP_SIZE={crop!r} square from the image at "
        f"INPUT.MIN_SIZE_TEST={size!r}: the crop must be <= that size",
    )


def _localization_multi_scale_is_loc_test_mode(cfg: Mapping[str, Any]) -> ConfigProblem | None:
    if lookup(cfg, "MODEL.META_ARCHITECTURE") != "LocalizationRPN" or not lookup(cfg, "TEST.MULTI_SCALE.ENABLED"):
        return None
    return ConfigProblem(
        ("TEST.MULTI_SCALE.ENABLED", "LOC.TEST_MODE"),
        "TEST.MULTI_SCALE.ENABLED=true is the detector's multi-scale test; a LocalizationRPN config tests at several "
        "scales with LOC.TEST_MODE=dense_multiscale (its scales: LOC.TEST_SCALES)",
    )


def _gn_groups_divide_width(cfg: Mapping[str, Any]) -> ConfigProblem | None:
    if lookup(cfg, "MODEL.BACKBONE.NORM") != "GN":
        return None
    width, groups = lookup(cfg, "MODEL.BACKBONE.WIDTH"), lookup(cfg, "MODEL.BACKBONE.GN_GROUPS")
    if groups < 1:  # reported by the GN_GROUPS value rule
        return None
    reason = divides(groups)(width)
    if reason is None:
        return None
    return ConfigProblem(
        ("MODEL.BACKBONE.WIDTH", "MODEL.BACKBONE.GN_GROUPS"),
        f"MODEL.BACKBONE.WIDTH={width} {reason} (MODEL.BACKBONE.GN_GROUPS) when MODEL.BACKBONE.NORM='GN'",
    )


def _stride_in_1x1_needs_bottlenecks(cfg: Mapping[str, Any]) -> ConfigProblem | None:
    depth = lookup(cfg, "MODEL.BACKBONE.DEPTH")
    if not lookup(cfg, "MODEL.BACKBONE.STRIDE_IN_1X1") or depth >= 50:
        return None
    return ConfigProblem(
        ("MODEL.BACKBONE.STRIDE_IN_1X1", "MODEL.BACKBONE.DEPTH"),
        f"MODEL.BACKBONE.STRIDE_IN_1X1=true needs bottleneck blocks (MODEL.BACKBONE.DEPTH 50, 101 or 152); "
        f"ResNet-{depth}'s basic blocks have no 1x1 conv to stride in",
    )


# -- the tables ----------------------------------------------------------------------------------------------
_IOU = between(0.0, 1.0)
_POSITIVE_LIST = all_of(non_empty(), each(greater_than(0)))
_FRACTION = between(0.0, 1.0, include_low=False)

def _coco_backend_installed(backend: Any) -> str | None:
    """TEST.COCO_BACKEND=faster_coco_eval needs its optional package; refused at load time, not after inference."""
    if backend == "faster_coco_eval" and importlib.util.find_spec("faster_coco_eval") is None:
        return ("needs the faster-coco-eval package: pip install faster-coco-eval "
                "(or pip install 'detectron_res[fast-eval]')")
    return None


VALUE_RULES: tuple[tuple[str, Check], ...] = (
    ("MODEL.META_ARCHITECTURE", one_of("FasterRCNN", "LocalizationRPN")),
    ("MODEL.DEVICE", matches(r"|cpu|cuda(:\d+)?", '"", "cpu", "cuda" or "cuda:N"')),
    ("MODEL.NUM_CLASSES", at_least(1)),
    ("MODEL.PIXEL_MEAN", of_length(3)),
    ("MODEL.PIXEL_STD", all_of(of_length(3), each(greater_than(0)))),
    ("MODEL.BACKBONE.DEPTH", one_of(18, 34, 50, 101, 152)),
    ("MODEL.BACKBONE.WIDTH", greater_than(0)),
    ("MODEL.BACKBONE.NORM", one_of("FrozenBN", "BN", "SyncBN", "GN")),
    ("MODEL.BACKBONE.GN_GROUPS", at_least(1)),
    ("MODEL.BACKBONE.FREEZE_AT", between(0, 4)),
    ("MODEL.RPN.ANCHOR_OFFSET", between(0.0, 1.0)),
    ("MODEL.RPN.ANCHOR_SIZES", _POSITIVE_LIST),
    ("MODEL.RPN.ASPECT_RATIOS", _POSITIVE_LIST),
    ("MODEL.RPN.HEAD_CHANNELS", at_least(0)),
    ("MODEL.RPN.POSITIVE_IOU", _IOU),
    ("MODEL.RPN.NEGATIVE_IOU", _IOU),
    ("MODEL.RPN.BATCH_SIZE_PER_IMAGE", at_least(1)),
    ("MODEL.RPN.POSITIVE_FRACTION", _FRACTION),
    ("MODEL.RPN.BOUNDARY_THRESH", at_least(-1)),
    ("MODEL.RPN.PRE_NMS_TOPK_TRAIN", at_least(1)),
    ("MODEL.RPN.POST_NMS_TOPK_TRAIN", at_least(1)),
    ("MODEL.RPN.PRE_NMS_TOPK_TEST", at_least(1)),
    ("MODEL.RPN.POST_NMS_TOPK_TEST", at_least(1)),
    ("MODEL.RPN.NMS_THRESH", _IOU),
    ("MODEL.RPN.MIN_SIZE", at_least(0)),
    ("MODEL.RPN.BBOX_REG_WEIGHTS", all_of(of_length(4), each(greater_than(0)))),
    ("MODEL.RPN.SMOOTH_L1_BETA", at_least(0)),
    ("MODEL.RPN.LOSS_WEIGHT", at_least(0)),
    ("MODEL.ROI_HEADS.POOLER", one_of("ROIAlign", "ROIPool")),
    ("MODEL.ROI_HEADS.POOLER_RESOLUTION", at_least(1)),
    ("MODEL.ROI_HEADS.POOLER_SAMPLING_RATIO", at_least(0)),
    ("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", at_least(1)),
    ("MODEL.ROI_HEADS.POSITIVE_FRACTION", _FRACTION),
    ("MODEL.ROI_HEADS.FG_IOU_THRESH", _IOU),
    ("MODEL.ROI_HEADS.BG_IOU_THRESH_LO", _IOU),
    ("MODEL.ROI_HEADS.BBOX_REG_WEIGHTS", all_of(of_length(4), each(greater_than(0)))),
    ("MODEL.ROI_HEADS.SMOOTH_L1_BETA", at_least(0)),
    ("MODEL.ROI_HEADS.SCORE_THRESH_TEST", between(0.0, 1.0)),
    ("MODEL.ROI_HEADS.NMS_THRESH_TEST", _IOU),
    ("MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", at_least(1)),
    ("MODEL.ROI_HEADS.EMPTY_BOXES", one_of("before_nms", "after_rescale")),  # postprocess.EMPTY_BOX_RULES
    ("INPUT.MIN_SIZE_TRAIN", _POSITIVE_LIST),
    ("INPUT.MAX_SIZE_TRAIN", greater_than(0)),
    ("INPUT.MIN_SIZE_TEST", greater_than(0)),
    ("INPUT.MAX_SIZE_TEST", greater_than(0)),
    ("INPUT.HFLIP_PROB", between(0.0, 1.0)),
    ("INPUT.SIZE_DIVISIBILITY", at_least(1)),
    ("INPUT.FORMAT", one_of("RGB", "BGR")),
    ("INPUT.RESIZE_BACKEND", one_of("opencv", "pil")),  # data.mapper.RESIZE_BACKENDS
    ("DATASETS.TRAIN", non_empty()),
    ("DATALOADER.NUM_WORKERS", at_least(0)),
    ("DATALOADER.ON_BAD_IMAGE", one_of("error", "skip")),
    ("DATALOADER.TIMEOUT", at_least(0)),
    ("LOC.CROP_SIZE", at_least(16)),
    ("LOC.SCALE_RANGE", all_of(of_length(2), each(at_least(16)))),
    ("LOC.MIN_VISIBLE", between(0.0, 1.0, include_low=False)),
    ("LOC.CLASSES_PER_IMAGE", between(1, 5)),
    ("LOC.CANDIDATE_CLASSES", at_least(1)),
    ("LOC.CLASSIFIER.RESIZE", at_least(16)),
    ("LOC.TEST_MODE", one_of("center_crop", "dense", "dense_multiscale")),  # localization.build.LOC_TEST_MODES
    ("LOC.TEST_SCALES", all_of(_POSITIVE_LIST, strictly_increasing())),
    ("LOC.CLASSIFIER.TEST_CROP", one_of("center", "10crop", "dense")),  # class_predictions.CLASSIFIER_TESTS
    ("LOC.CLASSIFIER.DENSE_SCALES", all_of(_POSITIVE_LIST, strictly_increasing(), each(at_least(16)))),
    ("LOC.RCNN.CLS_LOSS", one_of("sigmoid", "softmax")),  # localization.rcnn_stage.CLS_LOSSES
    ("LOC.RCNN.CROP_SIZE", at_least(16)),
    ("LOC.RCNN.SAMPLING_RATIO", at_least(0)),
    ("LOC.RCNN.FG_IOU_THRESH", _IOU),
    ("LOC.RCNN.FG_FRACTION", between(0.0, 1.0, include_high=False)),
    ("LOC.RCNN.CROPS_PER_FORWARD", at_least(1)),
    ("LOC.RCNN.IMS_PER_BATCH", at_least(1)),
    ("LOC.RCNN.BASE_LR", greater_than(0)),
    ("LOC.RCNN.MAX_ITER", at_least(0)),
    ("LOC.RCNN.STEPS", all_of(each(at_least(0)), strictly_increasing())),
    ("LOC.RCNN.WARMUP_ITERS", at_least(0)),
    ("SOLVER.IMS_PER_BATCH", at_least(1)),
    ("SOLVER.ACCUMULATE", at_least(1)),
    ("SOLVER.BASE_LR", greater_than(0)),
    ("SOLVER.MOMENTUM", between(0.0, 1.0, include_high=False)),
    ("SOLVER.WEIGHT_DECAY", at_least(0)),
    ("SOLVER.WEIGHT_DECAY_NORM", at_least(0)),
    ("SOLVER.BIAS_LR_FACTOR", at_least(0)),
    ("SOLVER.MAX_ITER", at_least(0)),
    ("SOLVER.STEPS", all_of(each(at_least(0)), strictly_increasing())),
    ("SOLVER.GAMMA", greater_than(0)),
    ("SOLVER.WARMUP_ITERS", at_least(0)),
    ("SOLVER.WARMUP_FACTOR", between(0.0, 1.0, include_low=False)),
    ("SOLVER.CHECKPOINT_PERIOD", at_least(1)),
    ("SOLVER.CLIP_GRAD_NORM", at_least(0)),
    ("SOLVER.REFERENCE_WORLD_SIZE", at_least(0)),
    ("SOLVER.AMP.DTYPE", one_of("bfloat16", "float16")),
    ("TEST.AMP.DTYPE", one_of("bfloat16", "float16")),
    ("DISTRIBUTED.BACKEND", one_of("", "gloo", "nccl")),
    ("DISTRIBUTED.TIMEOUT", greater_than(0)),
    ("TEST.EVAL_PERIOD", at_least(0)),
    ("TEST.COCO_BACKEND", all_of(one_of("auto", "pycocotools", "faster_coco_eval"), _coco_backend_installed)),
    ("TEST.BOX_REFINEMENT.NMS_THRESH", _IOU),
    ("TEST.BOX_VOTING.IOU_THRESH", _IOU),
    ("TEST.MULTI_SCALE.SCALES", all_of(_POSITIVE_LIST, strictly_increasing())),
    ("TEST.MULTI_SCALE.REFERENCE_SIZE", greater_than(0)),
    ("SEED", between(0, 2**32 - 1)),
    ("LOG_PERIOD", at_least(1)),
)

CROSS_KEY_RULES: tuple[CrossKeyRule, ...] = (
    key_at_most("MODEL.RPN.NEGATIVE_IOU", "MODEL.RPN.POSITIVE_IOU"),
    key_at_most("MODEL.ROI_HEADS.BG_IOU_THRESH_LO", "MODEL.ROI_HEADS.FG_IOU_THRESH"),
    key_at_most("SOLVER.STEPS", "SOLVER.MAX_ITER"),
    key_at_most("LOC.RCNN.STEPS", "LOC.RCNN.MAX_ITER"),
    key_at_most("LOC.CROP_SIZE", "LOC.CLASSIFIER.RESIZE"),
    _loc_crop_fits_scales,
    _loc_center_crop_fits_test_size,
    _localization_multi_scale_is_loc_test_mode,
    key_at_most("INPUT.MIN_SIZE_TRAIN", "INPUT.MAX_SIZE_TRAIN"),
    key_at_most("INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST"),
    _gn_groups_divide_width,
    _stride_in_1x1_needs_bottlenecks,
)


# -- running them ------------------------------------------------------------------------------------------------
def _show(value: Any) -> str:
    return repr(list(value)) if isinstance(value, (list, tuple)) else repr(value)


def non_finite_values(cfg: Mapping[str, Any], prefix: str = "") -> list[ConfigProblem]:
    """Every number of the config that is NaN or infinite (``SOLVER.BASE_LR=.inf`` passes "> 0")."""
    problems = []
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            problems += non_finite_values(value, f"{dotted}.")
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(item, float) and not math.isfinite(item) for item in values):
            problems.append(ConfigProblem((dotted,), f"{dotted}={_show(value)} must be finite"))
    return problems


def find_problems(
    cfg: Mapping[str, Any],
    *,
    value_rules: Iterable[tuple[str, Check]] = VALUE_RULES,
    cross_key_rules: Iterable[CrossKeyRule] = CROSS_KEY_RULES,
) -> list[ConfigProblem]:
    """Every rule that ``cfg`` breaks: non-finite numbers, then the value rules in table order, then the cross-key
    rules. A key with a non-finite number is not checked further."""
    problems = non_finite_values(cfg)
    broken = {key for problem in problems for key in problem.keys}
    value_rules = [(key, check) for key, check in value_rules if key not in broken]
    for key, check in value_rules:
        value = lookup(cfg, key)
        reason = check(value)
        if reason is not None:
            problems.append(ConfigProblem((key,), f"{key}={_show(value)} {reason}"))
    for rule in cross_key_rules:
        problem = rule(cfg)
        if problem is not None:
            problems.append(problem)
    return problems


def format_problems(problems: Sequence[ConfigProblem], origins: Mapping[str, str] | None = None) -> str:
    """One message for all problems; ``origins`` maps dotted keys to where they were set ("in x.yaml")."""
    lines = []
    for problem in problems:
        places = [f"{key} set {origins[key]}" for key in problem.keys if origins and key in origins]
        lines.append(problem.message + (f" ({'; '.join(places)})" if places else ""))
    if len(lines) == 1:
        return f"Invalid config value: {lines[0]}"
    return "Invalid config values:\n" + "\n".join(f"  - {line}" for line in lines)


def validate_config(
    cfg: Mapping[str, Any],
    *,
    value_rules: Iterable[tuple[str, Check]] = VALUE_RULES,
    cross_key_rules: Iterable[CrossKeyRule] = CROSS_KEY_RULES,
) -> None:
    """Raise a ConfigError listing every broken rule (key, value and reason), or return None."""
    problems = find_problems(cfg, value_rules=value_rules, cross_key_rules=cross_key_rules)
    if problems:
        raise ConfigError(format_problems(problems))
