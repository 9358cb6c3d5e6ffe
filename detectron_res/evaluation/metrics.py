"""Reporting evaluation metrics: the atomic, merging ``metrics.json`` writer and a per-category text table."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from ..utils import atomic_write_text


def json_safe(value: object) -> object:
    """``value`` with every non-finite float (NaN, inf) replaced by ``None``, recursively through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def read_metrics_json(path: str | os.PathLike) -> dict[str, object]:
    """The JSON object of an existing metrics file, {} when there is no file at ``path``.

    Raises:
        ValueError: ``path`` is not UTF-8 text, not valid JSON, or not a JSON object (the message names the file).
        IsADirectoryError: ``path`` is a folder.
    """
    path = Path(path)
    if not path.exists():
        return {}
    try:
        existing = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: existing metrics file is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
            f"{error.start}), so not a metrics json"
        ) from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: existing metrics file is not valid JSON ({error})") from None
    if not isinstance(existing, dict):
        raise ValueError(f"{path}: existing metrics file must hold a JSON object, got {type(existing).__name__}")
    return existing


def write_metrics_json(path: str | os.PathLike, metrics: Mapping[str, object]) -> None:
    """Merge ``metrics`` into the JSON object at ``path`` (created if absent) and write it atomically.

    The merge is by top-level key: ``{"bbox": {...}}`` replaces an existing ``"bbox"`` entry and leaves other
    entries (for example ``"voc"``) as they are. Non-finite floats are written as ``null``. The file is written
    to a temporary file in the same folder and moved over ``path`` with ``os.replace``, so readers never see a
    half-written file.

    Raises:
        ValueError: ``path`` exists but does not hold a JSON object (see `read_metrics_json`).
    """
    path = Path(path)
    merged: dict[str, object] = dict(read_metrics_json(path))
    merged.update(metrics)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(json_safe(merged), indent=2, allow_nan=False) + "\n")


def per_category_values(metrics: Mapping[str, float | None], *, prefix: str = "AP-") -> dict[str, float | None]:
    """The ``{class name: value}`` entries of a task's metrics, from its keys ``f"{prefix}{class name}"``."""
    return {key[len(prefix):]: value for key, value in metrics.items() if key.startswith(prefix)}


def format_per_category_table(
    values: Mapping[str, float | None], *, value_name: str = "AP", num_columns: int = 3
) -> str:
    """A fixed-width text table of ``{category: value}`` laid out in ``num_columns`` (category, value) pairs.

    Values are printed with three decimals; ``None`` and NaN (undefined, e.g. a class without ground truth)
    print as ``nan``. Rows are filled left to right in the given order.
    """
    if num_columns < 1:
        raise ValueError(f"num_columns must be >= 1, got {num_columns}")
    cells = [(str(name), _format_value(value)) for name, value in values.items()]
    num_columns = max(1, min(num_columns, len(cells)))
    name_width = max([len("category"), *(len(name) for name, _ in cells)])
    value_width = max([len(value_name), *(len(text) for _, text in cells)])

    def row(pairs: list[tuple[str, str]]) -> str:
        return " | ".join(f"{name:<{name_width}} {text:>{value_width}}" for name, text in pairs).rstrip()

    header = row([("category", value_name)] * num_columns)
    lines = [header, "-" * len(header)]
    for start in range(0, len(cells), num_columns):
        lines.append(row(cells[start : start + num_columns]))
    return "\n".join(lines)


def _format_value(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return f"{value:.3f}"
