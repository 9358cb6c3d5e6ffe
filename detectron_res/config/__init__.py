"""Configuration: packaged defaults, YAML files with one ``_base_`` level, ``KEY=VALUE`` overrides, validation."""

from detectron_res.config.config import config_files, get_default_config, load_config, merge_overrides, save_config
from detectron_res.config.node import CfgNode, ConfigError
from detectron_res.config.validation import validate_config

__all__ = [
    "CfgNode",
    "ConfigError",
    "config_files",
    "get_default_config",
    "load_config",
    "merge_overrides",
    "save_config",
    "validate_config",
]
