"""CfgNode: the config container (a dict with attribute access that can be frozen) and the config errors."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

import yaml

__all__ = ["CfgNode", "ConfigError", "FrozenConfigError"]


class ConfigError(ValueError):
    """A config file, override or value is invalid; the message names the key, value and where it came from."""


class FrozenConfigError(AttributeError):
    """Raised when a frozen CfgNode (or a list inside one) is modified."""


def _raise_frozen(what: str) -> NoReturn:
    raise FrozenConfigError(
        f"Cannot modify {what}: the config is frozen. Use cfg.clone() for a modifiable copy, "
        "or merge_overrides(cfg, [...]) for a validated, modified one."
    )


class _FrozenList(list):
    """A list that refuses modification; frozen CfgNodes hold their list values as these (equal to plain lists)."""

    def __init__(self, values: Iterable[Any], *, key_path: str) -> None:
        super().__init__(values)
        self._key_path = key_path

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        _raise_frozen(f"the list at '{self._key_path}'")

    append = extend = insert = pop = remove = clear = sort = reverse = _refuse
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle/deepcopy as a plain list: the default protocol would call the refused extend().
        return (list, (list(self),))


def _rebuild_node(values: dict[str, Any], frozen: bool) -> CfgNode:
    node = CfgNode(values=values)
    if frozen:
        node.freeze()
    return node


class CfgNode(dict):
    """A config mapping whose keys are also attributes (``cfg.MODEL.BACKBONE.DEPTH``).

    Nested mappings become CfgNodes. ``freeze()`` makes the node, its children and their lists immutable.
    """

    def __init__(self, *, values: Mapping[str, Any] | None = None, key_path: str = "") -> None:
        super().__init__()
        object.__setattr__(self, "_frozen", False)
        object.__setattr__(self, "_key_path", key_path)
        for key, value in (values or {}).items():
            self[key] = value

    # -- attribute access ---------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(
                f"Config node '{self._key_path or '<root>'}' has no key '{name}'; it has: {', '.join(self)}"
            ) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]

    def __dir__(self) -> Iterable[str]:
        return [*super().__dir__(), *self.keys()]

    # -- mutation (refused once frozen) -----------------------------------------------------------------
    def _child_path(self, key: str) -> str:
        return f"{self._key_path}.{key}" if self._key_path else str(key)

    def __setitem__(self, key: str, value: Any) -> None:
        if self._frozen:
            _raise_frozen(f"'{self._child_path(key)}'")
        if isinstance(value, Mapping) and not isinstance(value, CfgNode):
            value = CfgNode(values=value, key_path=self._child_path(key))
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        if self._frozen:
            _raise_frozen(f"'{self._child_path(key)}'")
        super().__delitem__(key)

    def _refuse_if_frozen(self) -> None:
        if self._frozen:
            _raise_frozen(f"'{self._key_path or '<root>'}'")

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self._refuse_if_frozen()
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def pop(self, *args: Any) -> Any:  # type: ignore[override]
        self._refuse_if_frozen()
        return super().pop(*args)

    def popitem(self) -> tuple[str, Any]:
        self._refuse_if_frozen()
        return super().popitem()

    def clear(self) -> None:
        self._refuse_if_frozen()
        super().clear()

    def __ior__(self, other: Any) -> CfgNode:  # type: ignore[override,misc]
        self.update(other)
        return self

    # -- freezing, copying, serialising -----------------------------------------------------------------
    def freeze(self) -> CfgNode:
        """Make this node and everything below it immutable (lists included); returns self."""
        for key, value in self.items():
            if isinstance(value, CfgNode):
                value.freeze()
            elif isinstance(value, list) and not isinstance(value, _FrozenList):
                dict.__setitem__(self, key, _FrozenList(value, key_path=self._child_path(key)))
        object.__setattr__(self, "_frozen", True)
        return self

    def is_frozen(self) -> bool:
        return self._frozen

    def clone(self) -> CfgNode:
        """A deep, modifiable (unfrozen) copy."""
        return CfgNode(values=self.to_dict(), key_path=self._key_path)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists, in definition order."""
        return {key: _to_plain(value) for key, value in self.items()}

    def dump(self) -> str:
        """YAML text of the config: keys in definition order, lists of scalars in flow style ``[a, b]``."""
        return yaml.dump(self.to_dict(), Dumper=_ConfigDumper, sort_keys=False, allow_unicode=True, width=120)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_node, (self.to_dict(), self._frozen))

    def __repr__(self) -> str:
        return f"CfgNode({dict.__repr__(self)})"


def _to_plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(item) for item in value]
    return value


class _ConfigDumper(yaml.SafeDumper):
    """Safe YAML dumper writing lists of scalars as ``[a, b]`` and nested mappings as blocks."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(not isinstance(item, (list, tuple, Mapping)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_ConfigDumper.add_representer(list, _represent_list)
