"""Loading configs: packaged defaults <- one optional ``_base_`` file <- the config file <- ``KEY=VALUE`` overrides.

Every key must exist in ``defaults.yaml``; values are type-checked against the defaults, then validated
(see ``validation.py``). Errors are ConfigErrors naming the dotted key, the value and the file (or command line).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from detectron_res.config.node import CfgNode, ConfigError
from detectron_res.config.validation import find_problems, format_problems
from detectron_res.utils.io import atomic_write_text

__all__ = ["BASE_KEY", "get_default_config", "load_config", "merge_overrides", "save_config"]

BASE_KEY = "_base_"
_COMMAND_LINE = "on the command line"
# yaml.safe_load follows YAML 1.1, where "1e-4" (no dot) is a string; numeric keys accept such strings.
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


# -- reading YAML ------------------------------------------------------------------------------------------------
class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe loader that rejects a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_mapping(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as error:
        raise ConfigError(f"Cannot parse config file {source}: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {source} must hold a mapping of keys, not a {type(data).__name__}")
    return data


def _read_config_file(path: Path, *, role: str = "") -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"Config file not found: {path}{role}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"Config file {path}{role} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
            f"{error.start}): a YAML config was expected"
        ) from None
    except OSError as error:
        raise ConfigError(f"Cannot read config file {path}{role}: {error}") from error
    return _parse_mapping(text, f"{path}{role}")


def get_default_config() -> CfgNode:
    """A fresh, modifiable CfgNode holding every key of the packaged ``defaults.yaml``."""
    resource = resources.files("detectron_res.config").joinpath("defaults.yaml")
    return CfgNode(values=_parse_mapping(resource.read_text(encoding="utf-8"), "detectron_res/config/defaults.yaml"))


# -- type checking -------------------------------------------------------------------------------------------------
class _Mismatch(Exception):
    """A value does not fit the default's type; the argument, if any, says which list element."""


def _element_template(default_list: list[Any]) -> Any:
    """The default a list's elements are checked against: 0.0 for a numeric list holding any float."""
    numeric = all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in default_list)
    if numeric and any(isinstance(item, float) for item in default_list):
        return 0.0
    return default_list[0]


def _type_name(default: Any) -> str:
    if isinstance(default, list):
        return f"a list of {_type_name(_element_template(default))}" if default else "a list"
    if isinstance(default, bool):
        return "bool (true or false)"
    return type(default).__name__


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing (null)"


def _convert(value: Any, default: Any) -> Any:
    """``value`` converted to the default's type, or _Mismatch."""
    if isinstance(default, list):
        if isinstance(value, Mapping):
            raise _Mismatch
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if not default:
            if any(isinstance(item, (Mapping, list, tuple)) for item in items):
                raise _Mismatch
            return items
        template = _element_template(default)
        converted = []
        for index, item in enumerate(items):
            try:
                converted.append(_convert(item, template))
            except _Mismatch:
                raise _Mismatch(f"element [{index}] is {_describe(item)}") from None
        return converted
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if isinstance(default, (int, float)):
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Mismatch
        if isinstance(default, float):
            return float(value)
        if isinstance(value, float):
            if not value.is_integer():
                raise _Mismatch
            return int(value)
        return value
    if isinstance(value, type(default)) and not isinstance(value, (Mapping, list)):
        return value
    raise _Mismatch


def _checked_value(value: Any, default: Any, *, key: str, where: str) -> Any:
    try:
        return _convert(value, default)
    except _Mismatch as mismatch:
        detail = f" ({mismatch.args[0]})" if mismatch.args and isinstance(value, (list, tuple)) else ""
        raise ConfigError(
            f"Config key '{key}' {where} expects {_type_name(default)}, got {_describe(value)}{detail}"
        ) from None


# -- merging ---------------------------------------------------------------------------------------------------------
def _dotted_keys(node: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        keys.append(prefix + key)
        if isinstance(value, Mapping):
            keys.extend(_dotted_keys(value, f"{prefix}{key}."))
    return keys


def _unknown_key_error(
    parts: Sequence[str], depth: int, node: Mapping[str, Any], where: str, all_keys: Sequence[str]
) -> ConfigError:
    """Error for ``parts[depth]`` missing from ``node``; suggests the closest of ``all_keys`` (every dotted key),
    else the closest key of ``node``."""
    full_key = ".".join(parts)
    suggestions = difflib.get_close_matches(full_key, all_keys, n=1)
    if not suggestions:
        same_level = difflib.get_close_matches(str(parts[depth]), [str(key) for key in node], n=1)
        suggestions = [".".join([*parts[:depth], *same_level])] if same_level else []
    if suggestions:
        hint = f"; did you mean '{suggestions[0]}'?"
    else:
        level = f"under '{'.'.join(parts[:depth])}'" if depth else "at the top level"
        hint = f"; valid keys {level}: {', '.join(node)}"
    return ConfigError(f"Unknown config key '{full_key}' {where}{hint}")


def _merge(
    node: CfgNode,
    data: Mapping[Any, Any],
    *,
    parts: Sequence[str],
    where: str,
    all_keys: Sequence[str],
    origins: dict[str, str],
) -> None:
    """Recursively merge ``data`` into ``node`` (whose dotted path is ``parts``), checking keys and types.

    ``all_keys`` lists every dotted key of the whole config (for suggestions); ``origins`` records where each
    merged key was set ("in x.yaml").
    """
    for key, value in data.items():
        key_parts = [*parts, str(key)]
        dotted = ".".join(key_parts)
        if key not in node:
            raise _unknown_key_error(key_parts, len(parts), node, where, all_keys)
        current = node[key]
        if isinstance(current, CfgNode):
            if value is None:  # an empty group, e.g. "TEST:" with its keys commented out
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"Config key '{dotted}' {where} is a group of keys ({', '.join(current)}), "
                    f"so it needs a mapping, not {_describe(value)}"
                )
            _merge(current, value, parts=key_parts, where=where, all_keys=all_keys, origins=origins)
        else:
            node[key] = _checked_value(value, current, key=dotted, where=where)
            origins[dotted] = where


def _parse_override_value(text: str, default: Any, argument: str) -> Any:
    """YAML value of an override; for a string key the raw text is kept unless YAML reads it as a string."""
    text = text.strip()
    if isinstance(default, str):
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            return text
        return parsed if isinstance(parsed, str) else text
    if not text:
        raise ConfigError(f"Override {argument!r} {_COMMAND_LINE} gives no value; it needs {_type_name(default)}")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"Cannot parse the value of override {argument!r} {_COMMAND_LINE}: {error}") from None


def _apply_overrides(cfg: CfgNode, overrides: Sequence[str], origins: dict[str, str]) -> None:
    if isinstance(overrides, (str, bytes)):
        raise TypeError(f"overrides must be a sequence of 'KEY=VALUE' strings, not the single string {overrides!r}")
    all_keys = _dotted_keys(cfg)
    for argument in overrides:
        key, separator, text = str(argument).partition("=")
        key = key.strip()
        if not separator or not key:
            raise ConfigError(
                f"Malformed override {argument!r} {_COMMAND_LINE}: expected KEY=VALUE, e.g. SOLVER.BASE_LR=0.02"
            )
        parts = key.split(".")
        node = cfg
        for depth, part in enumerate(parts):
            if part not in node:
                raise _unknown_key_error(parts, depth, node, _COMMAND_LINE, all_keys)
            if depth < len(parts) - 1:
                if not isinstance(node[part], CfgNode):
                    raise ConfigError(
                        f"Unknown config key '{key}' {_COMMAND_LINE}: "
                        f"'{'.'.join(parts[: depth + 1])}' is a value, not a group of keys"
                    )
                node = node[part]
        value = _parse_override_value(text, node[parts[-1]], argument)
        _merge(node, {parts[-1]: value}, parts=parts[:-1], where=_COMMAND_LINE, all_keys=all_keys, origins=origins)


def _validated_and_frozen(cfg: CfgNode, origins: Mapping[str, str]) -> CfgNode:
    problems = find_problems(cfg)
    if problems:
        raise ConfigError(format_problems(problems, origins))
    return cfg.freeze()


# -- public entry points ---------------------------------------------------------------------------------------------
def load_config(path: str | Path, overrides: Sequence[str] = ()) -> CfgNode:
    """The frozen, validated config: defaults <- the ``_base_`` file, if any <- ``path`` <- ``overrides``.

    ``_base_`` (top level of ``path`` only) names one file relative to ``path``'s folder; that base may not have a
    ``_base_`` of its own. ``overrides`` are ``KEY=VALUE`` strings, values read as YAML (``[64,128]``, ``true``).
    """
    path = Path(path)
    data = _read_config_file(path)
    cfg = get_default_config()
    all_keys = _dotted_keys(cfg)
    origins: dict[str, str] = {}
    if BASE_KEY in data:
        base_name = data.pop(BASE_KEY)
        if not isinstance(base_name, str) or not base_name.strip():
            raise ConfigError(f"'{BASE_KEY}' in {path} must name a YAML file (relative to {path}), not {base_name!r}")
        base_path = path.parent / base_name
        base_data = _read_config_file(base_path, role=f" (the {BASE_KEY} of {path})")
        if BASE_KEY in base_data:
            raise ConfigError(
                f"Config file {base_path} (the {BASE_KEY} of {path}) has a {BASE_KEY} of its own "
                f"({base_data[BASE_KEY]!r}); only one {BASE_KEY} level is allowed"
            )
        _merge(cfg, base_data, parts=[], where=f"in {base_path}", all_keys=all_keys, origins=origins)
    _merge(cfg, data, parts=[], where=f"in {path}", all_keys=all_keys, origins=origins)
    _apply_overrides(cfg, overrides, origins)
    return _validated_and_frozen(cfg, origins)


def config_files(path: str | Path) -> list[Path]:
    """The files `load_config(path)` reads: ``path`` and its ``_base_`` file, if it names one (for the tools' check
    that no output lands on an input)."""
    path = Path(path)
    base_name = _read_config_file(path).get(BASE_KEY)
    return [path, path.parent / base_name] if isinstance(base_name, str) and base_name.strip() else [path]


def merge_overrides(cfg: CfgNode, overrides: Sequence[str]) -> CfgNode:
    """A new frozen, validated config: ``cfg`` with ``KEY=VALUE`` overrides applied (``cfg`` is left unchanged)."""
    merged = cfg.clone()
    origins: dict[str, str] = {}
    _apply_overrides(merged, overrides, origins)
    return _validated_and_frozen(merged, origins)


def save_config(cfg: CfgNode, path: str | Path) -> None:
    """Write ``cfg`` as YAML to ``path`` atomically (a temporary file beside it, then ``os.replace``).

    ``load_config(path)`` gives back an equal config. Missing parent folders are created.
    """
    atomic_write_text(path, cfg.dump())
