"""Tests of detectron_res.config: defaults, _base_ merging, overrides, type checks, validation, freezing, saving."""

from __future__ import annotations

import pickle
import re
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from detectron_res.config import (
    CfgNode,
    ConfigError,
    get_default_config,
    load_config,
    merge_overrides,
    save_config,
    validate_config,
)
from detectron_res.config.node import FrozenConfigError
from detectron_res.config.validation import VALUE_RULES, one_of

# A small, valid schedule so that overrides of MAX_ITER and STEPS can be tested without the 90k defaults in the way.
SMALL_SCHEDULE = "SOLVER:\n  MAX_ITER: 100\n  STEPS: [50, 80]\n"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def small_config(tmp_path: Path) -> Path:
    return write(tmp_path, "small.yaml", SMALL_SCHEDULE)


def leaf_keys(node: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in node.items():
        if isinstance(value, dict):
            keys |= leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.add(prefix + key)
    return keys


# -- defaults ------------------------------------------------------------------------------------------------------
def test_every_default_key_has_a_one_line_comment() -> None:
    text = resources.files("detectron_res.config").joinpath("defaults.yaml").read_text(encoding="utf-8")
    key_line = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_]*):(?P<rest>.*)$")
    groups: list[tuple[int, str]] = []  # (indentation, key) of the enclosing group headers
    commented, uncommented = set(), []
    for line in text.splitlines():
        match = key_line.match(line)
        if match is None:
            continue
        indent = len(match["indent"])
        while groups and groups[-1][0] >= indent:
            groups.pop()
        dotted = ".".join([key for _, key in groups] + [match["key"]])
        rest = match["rest"].strip()
        if not rest or rest.startswith("#"):  # a group header such as "MODEL:"
            groups.append((indent, match["key"]))
        elif re.search(r"\s#\s*\S", rest):
            commented.add(dotted)
        else:
            uncommented.append(dotted)
    assert uncommented == []
    assert commented == leaf_keys(get_default_config().to_dict())
    assert {"MODEL.BACKBONE.WEIGHTS", "SEED", "MODEL.RPN.ANCHOR_SIZES"} <= commented


def test_default_config_values_types_and_validity() -> None:
    cfg = get_default_config()
    assert not cfg.is_frozen()
    assert cfg.MODEL.BACKBONE.DEPTH == 50
    assert cfg["MODEL"]["RPN"]["ANCHOR_SIZES"] == [128, 256, 512]
    assert cfg.SOLVER.STEPS == [60000, 80000]
    assert isinstance(cfg.SOLVER.BASE_LR, float) and cfg.SOLVER.BASE_LR == 0.01
    assert cfg.MODEL.ROI_HEADS.PROPOSAL_APPEND_GT is True
    top_level = [
        "MODEL", "INPUT", "DATASETS", "DATALOADER", "SOLVER", "TEST", "LOC", "DISTRIBUTED", "SEED", "OUTPUT_DIR",
        "LOG_PERIOD", "TENSORBOARD",
    ]  # fmt: skip
    assert list(cfg) == top_level
    validate_config(cfg)
    # Every value rule names an existing key.
    for key, _ in VALUE_RULES:
        assert key in leaf_keys(cfg.to_dict()), key


# -- files and _base_ ------------------------------------------------------------------------------------------------
def test_child_overrides_its_base_which_overrides_the_defaults(tmp_path: Path) -> None:
    write(
        tmp_path,
        "configs/base.yaml",
        "MODEL:\n  BACKBONE:\n    DEPTH: 101\n  NUM_CLASSES: 20\n"
        "SOLVER:\n  BASE_LR: 0.02\n  MAX_ITER: 1000\n  STEPS: [600, 800]\n",
    )
    child = write(
        tmp_path,
        "configs/voc/child.yaml",
        "_base_: ../base.yaml\nSOLVER:\n  BASE_LR: 0.005\nMODEL:\n  RPN:\n    ANCHOR_SIZES: [64, 128]\n",
    )
    cfg = load_config(child)
    assert cfg.is_frozen()
    assert cfg.SOLVER.BASE_LR == 0.005  # child wins over base
    assert cfg.SOLVER.MAX_ITER == 1000 and cfg.SOLVER.STEPS == [600, 800]  # base wins over defaults
    assert cfg.MODEL.BACKBONE.DEPTH == 101 and cfg.MODEL.NUM_CLASSES == 20
    assert cfg.MODEL.RPN.ANCHOR_SIZES == [64, 128]
    assert cfg.SOLVER.MOMENTUM == 0.9 and cfg.MODEL.BACKBONE.NORM == "FrozenBN"  # untouched defaults
    assert "_base_" not in cfg


def test_a_base_with_its_own_base_is_rejected_naming_both_files(tmp_path: Path) -> None:
    write(tmp_path, "root.yaml", "SEED: 1\n")
    base = write(tmp_path, "base.yaml", "_base_: root.yaml\nSEED: 2\n")
    child = write(tmp_path, "child.yaml", "_base_: base.yaml\nSEED: 3\n")
    with pytest.raises(ConfigError) as error:
        load_config(child)
    message = str(error.value)
    assert str(base) in message and str(child) in message and "'root.yaml'" in message
    assert "only one _base_ level" in message


def test_missing_base_and_missing_file_are_named(tmp_path: Path) -> None:
    child = write(tmp_path, "child.yaml", "_base_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"Config file not found: .*nowhere\.yaml \(the _base_ of .*child\.yaml\)"):
        load_config(child)
    with pytest.raises(ConfigError, match=r"Config file not found: .*absent\.yaml$"):
        load_config(tmp_path / "absent.yaml")


def test_a_binary_config_or_base_is_named_not_a_bare_codec_error(tmp_path: Path) -> None:
    png = tmp_path / "photo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(8))
    with pytest.raises(ConfigError) as error:
        load_config(png)
    assert str(error.value) == f"Config file {png} is not UTF-8 text (byte 0x89 at offset 0): a YAML config was expected"
    child = write(tmp_path, "child.yaml", "_base_: photo.png\n")
    with pytest.raises(ConfigError, match=r"Config file .*photo\.png \(the _base_ of .*child\.yaml\) is not UTF-8"):
        load_config(child)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("SEED: [1\n", "Cannot parse config file"),
        ("- SEED\n", "must hold a mapping of keys, not a list"),
        ("SEED: 1\nSEED: 2\n", "found duplicate key 'SEED'"),
        ("_base_: 3\n", "'_base_' in .* must name a YAML file"),
    ],
)
def test_malformed_files_are_rejected_naming_the_file(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError, match=expected) as error:
        load_config(path)
    assert str(path) in str(error.value)


def test_empty_file_and_empty_group_give_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "empty.yaml", "")) == get_default_config()
    assert load_config(write(tmp_path, "group.yaml", "TEST:\n  # EVAL_PERIOD: 5\n")) == get_default_config()


def test_exponent_without_dot_in_a_file_is_a_float(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "lr.yaml", "SOLVER:\n  BASE_LR: 1e-4\n  WEIGHT_DECAY: 5e-5\n"))
    assert isinstance(cfg.SOLVER.BASE_LR, float)
    assert abs(cfg.SOLVER.BASE_LR - 1e-4) < 1e-12
    assert abs(cfg.SOLVER.WEIGHT_DECAY - 5e-5) < 1e-12


# -- overrides -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "key", "expected", "expected_type"),
    [
        ("SOLVER.BASE_LR=0.02", "SOLVER.BASE_LR", 0.02, float),
        ("SOLVER.BASE_LR=1e-4", "SOLVER.BASE_LR", 1e-4, float),
        ("SOLVER.BASE_LR=1", "SOLVER.BASE_LR", 1.0, float),
        ("SOLVER.MAX_ITER=90", "SOLVER.MAX_ITER", 90, int),
        ("SOLVER.MAX_ITER=2e2", "SOLVER.MAX_ITER", 200, int),
        ("SOLVER.MAX_ITER=100.0", "SOLVER.MAX_ITER", 100, int),
        ("SOLVER.STEPS=[]", "SOLVER.STEPS", [], list),
        ("MODEL.RPN.ANCHOR_SIZES=[64,128]", "MODEL.RPN.ANCHOR_SIZES", [64, 128], list),
        ("MODEL.RPN.ASPECT_RATIOS=[1, 2]", "MODEL.RPN.ASPECT_RATIOS", [1.0, 2.0], list),
        ("INPUT.MIN_SIZE_TRAIN=800", "INPUT.MIN_SIZE_TRAIN", [800], list),
        ("DATASETS.TRAIN=[a,b]", "DATASETS.TRAIN", ["a", "b"], list),
        ("DATASETS.TRAIN=voc_2007_trainval", "DATASETS.TRAIN", ["voc_2007_trainval"], list),
        ("DATASETS.TEST=[ann.json:images]", "DATASETS.TEST", ["ann.json:images"], list),
        ("MODEL.WEIGHTS=", "MODEL.WEIGHTS", "", str),
        ("MODEL.BACKBONE.WEIGHTS=torchvision://X_V1", "MODEL.BACKBONE.WEIGHTS", "torchvision://X_V1", str),
        ("OUTPUT_DIR=2024", "OUTPUT_DIR", "2024", str),
        ("OUTPUT_DIR= runs/a ", "OUTPUT_DIR", "runs/a", str),
        ("DATALOADER.ASPECT_RATIO_GROUPING=false", "DATALOADER.ASPECT_RATIO_GROUPING", False, bool),
        ("MODEL.DEVICE=cuda:1", "MODEL.DEVICE", "cuda:1", str),
        ("MODEL.BACKBONE.NORM=GN", "MODEL.BACKBONE.NORM", "GN", str),
    ],
)
def test_overrides_are_parsed_and_typed(
    small_config: Path, override: str, key: str, expected: Any, expected_type: type
) -> None:
    cfg = load_config(small_config, [override])
    value: Any = cfg
    for part in key.split("."):
        value = value[part]
    assert value == (pytest.approx(expected) if isinstance(expected, float) else expected)
    assert type(value) is expected_type or (expected_type is list and isinstance(value, list))
    if isinstance(expected, list) and expected:
        assert [type(item) for item in value] == [type(item) for item in expected]


def test_overrides_apply_in_order_after_the_file(small_config: Path) -> None:
    cfg = load_config(
        small_config,
        [
            "SOLVER.MAX_ITER=300",
            "SOLVER.STEPS=[100,200]",
            "MODEL.RPN={POSITIVE_IOU: 0.8, NEGATIVE_IOU: 0.2}",
            "SEED=5",
            "SEED=6",
        ],
    )
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SEED) == (300, [100, 200], 6)
    assert (cfg.MODEL.RPN.POSITIVE_IOU, cfg.MODEL.RPN.NEGATIVE_IOU, cfg.MODEL.RPN.NMS_THRESH) == (0.8, 0.2, 0.7)


@pytest.mark.parametrize("argument", ["SOLVER.BASE_LR", "=0.1", "  "])
def test_malformed_override_is_named(small_config: Path, argument: str) -> None:
    with pytest.raises(ConfigError, match="Malformed override") as error:
        load_config(small_config, [argument])
    assert repr(argument) in str(error.value) and "KEY=VALUE" in str(error.value)


def test_overrides_given_as_one_string_are_refused(small_config: Path) -> None:
    with pytest.raises(TypeError, match="single string"):
        load_config(small_config, "SEED=1")  # type: ignore[arg-type]


# -- unknown keys ----------------------------------------------------------------------------------------------------
def test_unknown_key_in_a_file_names_key_file_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "x.yaml", "SOLVER:\n  BASE_RL: 0.1\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == f"Unknown config key 'SOLVER.BASE_RL' in {path}; did you mean 'SOLVER.BASE_LR'?"


def test_unknown_key_in_a_base_names_the_base(tmp_path: Path) -> None:
    base = write(tmp_path, "base.yaml", "MODEL:\n  RPN:\n    ANCHOR_SIZE: [32]\n")
    child = write(tmp_path, "child.yaml", "_base_: base.yaml\n")
    with pytest.raises(ConfigError) as error:
        load_config(child)
    assert str(error.value) == (
        f"Unknown config key 'MODEL.RPN.ANCHOR_SIZE' in {base}; did you mean 'MODEL.RPN.ANCHOR_SIZES'?"
    )


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("SOLVER.BASE_RL=0.1", "; did you mean 'SOLVER.BASE_LR'?"),
        ("SOLVR.BASE_LR=0.1", "; did you mean 'SOLVER.BASE_LR'?"),
        ("MODEL.BASE_LR=0.1", "; did you mean 'SOLVER.BASE_LR'?"),
        ("MODEL.BACKBONE.DEEP=50", "; did you mean 'MODEL.BACKBONE.DEPTH'?"),
        ("TEST.ZZZZZZZZZZ=1", "; valid keys under 'TEST': EVAL_PERIOD"),
        ("SOLVER.BASE_LR.X=1", ": 'SOLVER.BASE_LR' is a value, not a group of keys"),
        (
            "_base_=other.yaml",
            "; valid keys at the top level: MODEL, INPUT, DATASETS, DATALOADER, SOLVER, TEST, LOC, DISTRIBUTED, SEED, ",
        ),
    ],
)
def test_unknown_override_key_names_key_and_suggestion(small_config: Path, override: str, hint: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(small_config, [override])
    key = override.partition("=")[0]
    assert str(error.value).startswith(f"Unknown config key '{key}' on the command line{hint}")


def test_nested_base_key_is_unknown(tmp_path: Path) -> None:
    path = write(tmp_path, "x.yaml", "MODEL:\n  _base_: other.yaml\n")
    with pytest.raises(ConfigError, match=re.escape("Unknown config key 'MODEL._base_' in ")):
        load_config(path)


# -- type checking ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("SOLVER.MAX_ITER=1.5", "Config key 'SOLVER.MAX_ITER' on the command line expects int, got float 1.5"),
        ("SOLVER.BASE_LR=fast", "Config key 'SOLVER.BASE_LR' on the command line expects float, got str 'fast'"),
        ("SOLVER.BASE_LR=true", "expects float, got bool True"),
        ("MODEL.BACKBONE.DEPTH=true", "Config key 'MODEL.BACKBONE.DEPTH' on the command line expects int, got bool"),
        ("DATALOADER.ASPECT_RATIO_GROUPING=1", "expects bool (true or false), got int 1"),
        ("SOLVER.BASE_LR={a: 1}", "expects float, got dict {'a': 1}"),
        ("SOLVER.BASE_LR=[0.1]", "expects float, got list [0.1]"),
        ("SOLVER.BASE_LR=", "Override 'SOLVER.BASE_LR=' on the command line gives no value; it needs float"),
        (
            "MODEL.RPN.ANCHOR_SIZES=[64,x]",
            "Config key 'MODEL.RPN.ANCHOR_SIZES' on the command line expects a list of int, got list [64, 'x'] "
            "(element [1] is str 'x')",
        ),
        ("MODEL.RPN.ASPECT_RATIOS=[0.5,[1]]", "expects a list of float, got list [0.5, [1]] (element [1] is list [1])"),
        ("DATASETS.TRAIN=[2007]", "expects a list of str, got list [2007] (element [0] is int 2007)"),
        ("MODEL.RPN=3", "Config key 'MODEL.RPN' on the command line is a group of keys (ANCHOR_SIZES, "),
    ],
)
def test_type_errors_name_key_value_and_expected_type(small_config: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(small_config, [override])
    assert message in str(error.value)


def test_type_error_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "x.yaml", "OUTPUT_DIR: 5\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == f"Config key 'OUTPUT_DIR' in {path} expects str, got int 5"


# -- validation ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("SOLVER.BASE_LR=-0.1", "SOLVER.BASE_LR=-0.1 must be > 0"),
        ("MODEL.BACKBONE.DEPTH=42", "MODEL.BACKBONE.DEPTH=42 must be one of 18, 34, 50, 101, 152"),
        ("MODEL.BACKBONE.NORM=LN", "MODEL.BACKBONE.NORM='LN' must be one of 'FrozenBN', 'BN', 'SyncBN', 'GN'"),
        ("MODEL.BACKBONE.FREEZE_AT=5", "MODEL.BACKBONE.FREEZE_AT=5 must be in [0, 4]"),
        ("MODEL.BACKBONE.WIDTH=0", "MODEL.BACKBONE.WIDTH=0 must be > 0"),
        ("MODEL.NUM_CLASSES=0", "MODEL.NUM_CLASSES=0 must be >= 1"),
        ("MODEL.DEVICE=gpu", 'MODEL.DEVICE=\'gpu\' must be "", "cpu", "cuda" or "cuda:N"'),
        ("MODEL.DEVICE=cuda:x", 'MODEL.DEVICE=\'cuda:x\' must be "", "cpu", "cuda" or "cuda:N"'),
        ("MODEL.PIXEL_MEAN=[1,2]", "MODEL.PIXEL_MEAN=[1.0, 2.0] must have 3 elements, not 2"),
        ("MODEL.PIXEL_STD=[1,0,1]", "MODEL.PIXEL_STD=[1.0, 0.0, 1.0] has element [1]=0.0 that must be > 0"),
        ("SOLVER.MOMENTUM=1", "SOLVER.MOMENTUM=1.0 must be in [0.0, 1.0)"),
        ("SOLVER.WEIGHT_DECAY=-1e-4", "SOLVER.WEIGHT_DECAY=-0.0001 must be >= 0"),
        ("SOLVER.STEPS=[50,150]", "SOLVER.STEPS=[50, 150] has values above SOLVER.MAX_ITER=100: [150]"),
        ("SOLVER.STEPS=[80,50]", "SOLVER.STEPS=[80, 50] must be strictly increasing"),
        ("SOLVER.STEPS=[-1,50]", "SOLVER.STEPS=[-1, 50] has element [0]=-1 that must be >= 0"),
        ("SOLVER.GAMMA=0", "SOLVER.GAMMA=0.0 must be > 0"),
        ("SOLVER.WARMUP_FACTOR=0", "SOLVER.WARMUP_FACTOR=0.0 must be in (0.0, 1.0]"),
        ("SOLVER.IMS_PER_BATCH=0", "SOLVER.IMS_PER_BATCH=0 must be >= 1"),
        ("SOLVER.CHECKPOINT_PERIOD=0", "SOLVER.CHECKPOINT_PERIOD=0 must be >= 1"),
        ("LOG_PERIOD=0", "LOG_PERIOD=0 must be >= 1"),
        ("MODEL.RPN.POSITIVE_IOU=1.5", "MODEL.RPN.POSITIVE_IOU=1.5 must be in [0.0, 1.0]"),
        ("MODEL.RPN.NEGATIVE_IOU=0.8", "MODEL.RPN.NEGATIVE_IOU=0.8 must be <= MODEL.RPN.POSITIVE_IOU=0.7"),
        ("MODEL.ROI_HEADS.FG_IOU_THRESH=1.5", "MODEL.ROI_HEADS.FG_IOU_THRESH=1.5 must be in [0.0, 1.0]"),
        (
            "MODEL.ROI_HEADS.BG_IOU_THRESH_LO=0.6",
            "MODEL.ROI_HEADS.BG_IOU_THRESH_LO=0.6 must be <= MODEL.ROI_HEADS.FG_IOU_THRESH=0.5",
        ),
        ("MODEL.ROI_HEADS.POSITIVE_FRACTION=0", "MODEL.ROI_HEADS.POSITIVE_FRACTION=0.0 must be in (0.0, 1.0]"),
        ("MODEL.RPN.ANCHOR_SIZES=[]", "MODEL.RPN.ANCHOR_SIZES=[] must not be empty"),
        ("MODEL.RPN.ASPECT_RATIOS=[1,-2]", "MODEL.RPN.ASPECT_RATIOS=[1.0, -2.0] has element [1]=-2.0 that must be > 0"),
        ("MODEL.ROI_HEADS.POOLER=ROIMax", "MODEL.ROI_HEADS.POOLER='ROIMax' must be one of 'ROIAlign', 'ROIPool'"),
        ("INPUT.MIN_SIZE_TRAIN=[0]", "INPUT.MIN_SIZE_TRAIN=[0] has element [0]=0 that must be > 0"),
        (
            "INPUT.MIN_SIZE_TRAIN=[800,1200]",
            "INPUT.MIN_SIZE_TRAIN=[800, 1200] has values above INPUT.MAX_SIZE_TRAIN=1000: [1200]",
        ),
        ("INPUT.MIN_SIZE_TEST=1100", "INPUT.MIN_SIZE_TEST=1100 must be <= INPUT.MAX_SIZE_TEST=1000"),
        ("INPUT.SIZE_DIVISIBILITY=0", "INPUT.SIZE_DIVISIBILITY=0 must be >= 1"),
        ("INPUT.HFLIP_PROB=1.5", "INPUT.HFLIP_PROB=1.5 must be in [0.0, 1.0]"),
        ("DATASETS.TRAIN=[]", "DATASETS.TRAIN=[] must not be empty"),
        ("SOLVER.BASE_LR=.inf", "SOLVER.BASE_LR=inf must be finite"),  # passed "> 0" before
        ("SOLVER.CLIP_GRAD_NORM=.nan", "SOLVER.CLIP_GRAD_NORM=nan must be finite"),
        ("MODEL.RPN.ASPECT_RATIOS=[1,.inf]", "MODEL.RPN.ASPECT_RATIOS=[1.0, inf] must be finite"),
        ("DATALOADER.ON_BAD_IMAGE=ignore", "DATALOADER.ON_BAD_IMAGE='ignore' must be one of 'error', 'skip'"),
        ("DATALOADER.TIMEOUT=-1", "DATALOADER.TIMEOUT=-1.0 must be >= 0"),
        ("TEST.MULTI_SCALE.SCALES=[]", "TEST.MULTI_SCALE.SCALES=[] must not be empty"),
        ("TEST.MULTI_SCALE.SCALES=[200,0]", "TEST.MULTI_SCALE.SCALES=[200, 0] has element [1]=0 that must be > 0"),
        ("TEST.MULTI_SCALE.SCALES=[400,200]", "TEST.MULTI_SCALE.SCALES=[400, 200] must be strictly increasing"),
        ("TEST.MULTI_SCALE.REFERENCE_SIZE=0", "TEST.MULTI_SCALE.REFERENCE_SIZE=0 must be > 0"),
        ("TEST.BOX_REFINEMENT.NMS_THRESH=1.3", "TEST.BOX_REFINEMENT.NMS_THRESH=1.3 must be in [0.0, 1.0]"),
        ("TEST.BOX_VOTING.IOU_THRESH=-0.1", "TEST.BOX_VOTING.IOU_THRESH=-0.1 must be in [0.0, 1.0]"),
        ("INPUT.FORMAT=YUV", "INPUT.FORMAT='YUV' must be one of 'RGB', 'BGR'"),
        ("MODEL.RPN.ANCHOR_OFFSET=1.5", "MODEL.RPN.ANCHOR_OFFSET=1.5 must be in [0.0, 1.0]"),
        ("MODEL.BACKBONE.WIDTH=48", None),  # fine with FrozenBN ...
    ],
)
def test_validation_rules(small_config: Path, override: str, message: str | None) -> None:
    if message is None:
        assert load_config(small_config, [override]).MODEL.BACKBONE.WIDTH == 48
        return
    with pytest.raises(ConfigError) as error:
        load_config(small_config, [override])
    assert str(error.value).startswith(f"Invalid config value: {message} (")
    assert "set on the command line" in str(error.value)


def test_group_norm_needs_width_divisible_by_groups(small_config: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(small_config, ["MODEL.BACKBONE.NORM=GN", "MODEL.BACKBONE.WIDTH=48"])
    assert "MODEL.BACKBONE.WIDTH=48 must be divisible by 32 (MODEL.BACKBONE.GN_GROUPS)" in str(error.value)
    cfg = load_config(
        small_config, ["MODEL.BACKBONE.NORM=GN", "MODEL.BACKBONE.GN_GROUPS=16", "MODEL.BACKBONE.WIDTH=48"]
    )
    assert (cfg.MODEL.BACKBONE.WIDTH, cfg.MODEL.BACKBONE.GN_GROUPS) == (48, 16)


def test_stride_in_1x1_needs_bottleneck_blocks(small_config: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(small_config, ["MODEL.BACKBONE.DEPTH=34", "MODEL.BACKBONE.STRIDE_IN_1X1=true"])
    assert "MODEL.BACKBONE.STRIDE_IN_1X1=true needs bottleneck blocks" in str(error.value)
    assert load_config(small_config, ["MODEL.BACKBONE.DEPTH=50", "MODEL.BACKBONE.STRIDE_IN_1X1=true"])


def test_validation_names_the_file_that_set_a_bad_value_and_lists_all_problems(tmp_path: Path) -> None:
    path = write(tmp_path, "x.yaml", "SOLVER:\n  BASE_LR: -1.0\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, ["MODEL.BACKBONE.DEPTH=42"])
    assert str(error.value) == (
        "Invalid config values:\n"
        "  - MODEL.BACKBONE.DEPTH=42 must be one of 18, 34, 50, 101, 152"
        " (MODEL.BACKBONE.DEPTH set on the command line)\n"
        f"  - SOLVER.BASE_LR=-1.0 must be > 0 (SOLVER.BASE_LR set in {path})"
    )


def test_validate_config_on_a_node_and_with_extra_rules() -> None:
    cfg = get_default_config()
    cfg.SOLVER.BASE_LR = 0.0
    with pytest.raises(ConfigError, match=r"^Invalid config value: SOLVER.BASE_LR=0.0 must be > 0$"):
        validate_config(cfg)
    with pytest.raises(ConfigError, match=r"^Invalid config value: SEED=0 must be one of 7$"):
        validate_config(get_default_config(), value_rules=[("SEED", one_of(7))], cross_key_rules=())
    with pytest.raises(ConfigError, match=re.escape("Config has no key 'MODEL.NEW_KEY'")):
        validate_config(get_default_config(), value_rules=[("MODEL.NEW_KEY", one_of(1))], cross_key_rules=())


# -- CfgNode behaviour -------------------------------------------------------------------------------------------------
def test_frozen_config_refuses_every_modification(small_config: Path) -> None:
    cfg = load_config(small_config)
    attempts = [
        lambda: setattr(cfg.SOLVER, "BASE_LR", 1.0),
        lambda: cfg.SOLVER.__setitem__("BASE_LR", 1.0),
        lambda: setattr(cfg, "NEW", 1),
        lambda: cfg.MODEL.RPN.__delitem__("NMS_THRESH"),
        lambda: cfg.SOLVER.update({"BASE_LR": 1.0}),
        lambda: cfg.SOLVER.pop("BASE_LR"),
        lambda: cfg.SOLVER.STEPS.append(90),
        lambda: cfg.SOLVER.STEPS.__setitem__(0, 1),
    ]
    for attempt in attempts:
        with pytest.raises(FrozenConfigError, match="the config is frozen"):
            attempt()
    with pytest.raises(AttributeError, match=re.escape("Cannot modify 'SOLVER.BASE_LR'")):
        cfg.SOLVER.BASE_LR = 2.0
    assert cfg.SOLVER.BASE_LR == 0.01 and cfg.SOLVER.STEPS == [50, 80] and "NEW" not in cfg


def test_clone_is_a_modifiable_deep_copy(small_config: Path) -> None:
    cfg = load_config(small_config)
    copy = cfg.clone()
    assert copy == cfg and not copy.is_frozen()
    copy.SOLVER.BASE_LR = 0.5
    copy.SOLVER.STEPS.append(90)
    copy.MODEL.RPN.ANCHOR_SIZES[0] = 1
    assert cfg.SOLVER.BASE_LR == 0.01 and cfg.SOLVER.STEPS == [50, 80] and cfg.MODEL.RPN.ANCHOR_SIZES[0] == 128
    assert isinstance(copy.MODEL.RPN, CfgNode)


def test_attribute_access_and_to_dict() -> None:
    cfg = CfgNode(values={"A": {"B": 1, "C": [1, 2]}})
    cfg.D = {"E": "x"}
    assert cfg.A.B == 1 and cfg.D.E == "x" and isinstance(cfg.D, CfgNode)
    with pytest.raises(AttributeError, match="Config node 'A' has no key 'Z'; it has: B, C"):
        _ = cfg.A.Z
    plain = cfg.freeze().to_dict()
    assert plain == {"A": {"B": 1, "C": [1, 2]}, "D": {"E": "x"}}
    assert type(plain["A"]) is dict and type(plain["A"]["C"]) is list


def test_pickle_keeps_values_and_frozen_state(small_config: Path) -> None:
    cfg = load_config(small_config)
    restored = pickle.loads(pickle.dumps(cfg))
    assert restored == cfg and restored.is_frozen()
    with pytest.raises(FrozenConfigError):
        restored.SEED = 3


def test_dump_is_yaml_in_definition_order_with_flow_lists(small_config: Path) -> None:
    cfg = load_config(small_config, ["MODEL.RPN.ANCHOR_SIZES=[64,128]"])
    text = cfg.dump()
    assert "    ANCHOR_SIZES: [64, 128]\n" in text and "  STEPS: [50, 80]\n" in text
    assert "  DEVICE: ''\n" in text
    assert text.startswith("MODEL:\n  META_ARCHITECTURE: FasterRCNN\n  DEVICE: ''\n  WEIGHTS: ''\n  NUM_CLASSES: 80\n")
    assert yaml.safe_load(text) == cfg.to_dict()
    assert list(yaml.safe_load(text)["SOLVER"]) == list(cfg.SOLVER)


# -- merge_overrides and save_config -----------------------------------------------------------------------------------
def test_merge_overrides_returns_a_new_validated_frozen_config(small_config: Path) -> None:
    cfg = load_config(small_config)
    merged = merge_overrides(cfg, ["SOLVER.BASE_LR=0.04", "MODEL.WEIGHTS=output/model_final.pth"])
    assert merged.is_frozen() and merged.SOLVER.BASE_LR == 0.04 and merged.MODEL.WEIGHTS == "output/model_final.pth"
    assert cfg.SOLVER.BASE_LR == 0.01 and cfg.MODEL.WEIGHTS == ""
    with pytest.raises(ConfigError, match=re.escape("SOLVER.STEPS=[50, 80] has values above SOLVER.MAX_ITER=60: [80]")):
        merge_overrides(cfg, ["SOLVER.MAX_ITER=60"])
    with pytest.raises(ConfigError, match=re.escape("did you mean 'SOLVER.MAX_ITER'?")):
        merge_overrides(cfg, ["SOLVER.MAX_ITERS=60"])


def test_save_and_load_round_trip(tmp_path: Path, small_config: Path) -> None:
    cfg = load_config(
        small_config,
        [
            "SOLVER.BASE_LR=1e-5",
            "MODEL.RPN.ANCHOR_SIZES=[64,128]",
            "DATASETS.TRAIN=[a.json:imgs, b]",
            "OUTPUT_DIR=2024",
            "MODEL.DEVICE=cpu",
            "DATALOADER.ASPECT_RATIO_GROUPING=false",
            "SEED=7",
        ],
    )
    target = tmp_path / "out" / "run" / "config.yaml"
    write(tmp_path, "out/run/config.yaml", "stale")
    save_config(cfg, target)
    assert sorted(path.name for path in target.parent.iterdir()) == ["config.yaml"]  # no temporary file left
    assert target.read_text(encoding="utf-8") == cfg.dump()
    reloaded = load_config(target)
    assert reloaded == cfg
    assert reloaded.OUTPUT_DIR == "2024" and reloaded.SOLVER.BASE_LR == 1e-5
    assert reloaded.DATASETS.TRAIN == ["a.json:imgs", "b"]
