"""Per-class precision-recall curves of an evaluation and the PNGs drawn from them.

The numbers come from the metric modules (`coco.coco_pr_curves` from COCOeval's accumulated precision,
`voc.voc_pr_curves` from the devkit's ranked recall and precision), one `ClassCurves` per class;
`write_evaluation_plots` draws them with `utils.plots` when matplotlib is installed. Plots are a by-product: without
matplotlib they are skipped (a debug log line), and a failure to draw or write them is logged as a warning, never
raised, so an evaluation never fails because of them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

PR_CURVES_FILE = "{prefix}_pr_curves.png"
AP_BARS_FILE = "{prefix}_ap_per_class.png"


@dataclass(frozen=True)
class ClassCurves:
    """One class's precision-recall curves and APs.

    Attributes:
        name: the class name.
        curves: curve label -> (recall (N,), precision (N,)) float64 arrays; empty when undefined (the class has
            no ground truth in the evaluated images).
        ap: AP label -> AP in percent, None when undefined.
    """

    name: str
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]]
    ap: Mapping[str, float | None]


def write_evaluation_plots(
    classes: Sequence[ClassCurves], output_dir: str | os.PathLike, *, prefix: str, title: str
) -> list[Path]:
    """`<prefix>_pr_curves.png` (an axes per class) and `<prefix>_ap_per_class.png` (bars) in `output_dir`.

    Returns the files written: [] without matplotlib (logged at debug level), without classes, or when drawing or
    writing failed (logged as a warning; the exception is not raised)."""
    from ..utils import plots  # matplotlib itself is imported only when drawing

    if not classes:
        return []
    if not plots.matplotlib_available():
        logger.debug("matplotlib is not installed: no %s evaluation plots (%s)", prefix, plots.INSTALL_HINT)
        return []
    output_dir = Path(output_dir)
    try:
        written = [
            plots.plot_pr_curves(classes, output_dir / PR_CURVES_FILE.format(prefix=prefix), title=title),
            plots.plot_ap_bars(classes, output_dir / AP_BARS_FILE.format(prefix=prefix), title=f"{title}: AP per class"),
        ]
    except Exception as error:  # noqa: BLE001 - a plot must never fail an evaluation
        logger.warning("Could not write the %s evaluation plots to %s: %s: %s",
                       prefix, output_dir, type(error).__name__, error)
        return []
    logger.info("Wrote %s", ", ".join(str(path) for path in written))
    return written
