"""Tests of `utils.plots`: reading the training log (errors name file and line), grouping its quantities, and the
PNGs drawn (read back, decoded, sized, not blank); without matplotlib a clear error and nothing written."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from detectron_res.evaluation.pr_curves import ClassCurves
from detectron_res.utils import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path: Path) -> np.ndarray:
    """The decoded image of a valid, non-blank PNG file."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None and image.ndim == 3, path
    assert len(np.unique(image.reshape(-1, image.shape[2]), axis=0)) > 2, f"{path} is blank"  # lines, text, background
    return image


def hide_matplotlib(monkeypatch) -> None:
    """Make `import matplotlib` (and any of its modules) fail as if it were not installed."""
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def write_log(path: Path, records: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records) + tail)
    return path


RECORDS = [
    {"iteration": 1, "total_loss": 3.0, "loss_cls": 2.0, "loss_box_reg": 1.0, "lr": 0.01, "time": 0.5, "data_time": 0.25, "memory_mb": 100.0},
    {"iteration": 2, "loss_cls": 1.5, "total_loss": 2.0, "loss_box_reg": 0.5, "lr": 0.02, "time": 0.25, "data_time": 0.125, "memory_mb": 110.0},
    {"iteration": 2, "bbox/AP": 40.0, "bbox/AP50": 60.0, "bbox/APl": None, "bbox/AP-cat": 30.0, "bbox/AP-dog": 50.0,
     "voc/mAP_07": 0.5, "voc/per_class/cat/AP_07": 0.25, "grad_norm": 7.0},
]


def test_training_curve_groups_sort_the_log_into_plots():
    groups = plots.training_curve_groups(RECORDS)
    assert list(groups) == ["losses", "lr", "time", "memory", "other", "eval_bbox", "eval_bbox per class", "eval_voc",
                            "eval_voc per class"]
    losses = groups["losses"]
    assert losses.split and list(losses.series) == ["total_loss", "loss_cls", "loss_box_reg"]  # total first
    assert losses.series["loss_cls"] == ([1, 2], [2.0, 1.5])
    assert groups["lr"].series == {"lr": ([1, 2], [0.01, 0.02])}
    assert groups["time"].series == {"time": ([1, 2], [0.5, 0.25]), "data_time": ([1, 2], [0.25, 0.125])}
    assert groups["eval_bbox"].series == {"AP": ([2], [40.0]), "AP50": ([2], [60.0])}  # the null APl left out
    assert groups["eval_bbox"].markers and groups["eval_bbox"].ylabel == "AP (%)"
    assert groups["eval_bbox per class"].series == {"cat": ([2], [30.0]), "dog": ([2], [50.0])}
    assert groups["eval_voc"].ylabel == "AP (fraction)"
    assert groups["eval_voc per class"].series == {"cat/AP_07": ([2], [0.25])}
    assert groups["other"].series == {"grad_norm": ([2], [7.0])}
    # several test sets: "<set>/bbox/AP"
    several = plots.training_curve_groups([{"iteration": 5, "set_a/bbox/AP": 1.0, "set_b/bbox/AP-cat": 2.0}])
    assert {k: v.series for k, v in several.items()} == {
        "eval_set_a/bbox": {"AP": ([5], [1.0])}, "eval_set_b/bbox per class": {"cat": ([5], [2.0])}
    }
    assert plots.file_stem("eval_set_a/bbox per class") == "eval_set_a_bbox_per_class"


def test_read_training_log_errors_name_the_file_and_line(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match=r"training log not found: .*nothing\.jsonl"):
        plots.read_training_log(tmp_path / "nothing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: empty training log"):
        plots.read_training_log(empty)
    bad = write_log(tmp_path / "bad.jsonl", RECORDS[:1], tail='{"iteration": 2, "loss": }\n' + json.dumps(RECORDS[1]) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: not valid JSON"):
        plots.read_training_log(bad)
    for line, message in [
        ("[1, 2]", "line 2: expected a JSON object, got list"),
        ('{"total_loss": 1.0}', "line 2: no integer 'iteration'"),
        ('{"iteration": 2.5}', "line 2: no integer 'iteration'"),
        ('{"iteration": 2, "lr": "fast"}', "line 2: 'lr' is 'fast', not a number"),
    ]:
        write_log(bad, RECORDS[:1], tail=line + "\n")
        with pytest.raises(ValueError, match=f"bad.jsonl, {message}"):
            plots.read_training_log(bad)
    # a half-written last line (no newline: a run still writing it) is left out with a warning
    live = write_log(tmp_path / "live.jsonl", RECORDS[:2], tail='{"iteration": 3, "tot')
    with caplog.at_level(logging.WARNING, logger="detectron_res.utils.plots"):
        assert plots.read_training_log(live) == RECORDS[:2]
    assert "live.jsonl, line 3: half-written last record left out" in caplog.text
    # only the last line may be half-written: a broken line before it is an error, newline at the end or not
    write_log(bad, RECORDS[:1], tail='{"iteration": 2, "loss": }\n' + json.dumps(RECORDS[1]))
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: not valid JSON"):
        plots.read_training_log(bad)


def test_plot_training_log_writes_one_valid_png_per_group(tmp_path):
    log = write_log(tmp_path / "metrics.jsonl", RECORDS)
    written = plots.plot_training_log(log, tmp_path / "plots")
    names = ["losses", "lr", "time", "memory", "other", "eval_bbox", "eval_bbox_per_class", "eval_voc",
             "eval_voc_per_class"]
    assert written == [tmp_path / "plots" / f"{name}.png" for name in names]
    # sizes at 100 dpi: split groups are 4.2 in per axes (3 columns at most) by 3.0 in per row + 0.6 for the title
    assert read_png(written[0]).shape[:2] == (360, 1260)  # three loss panels
    assert read_png(written[4]).shape[:2] == (360, 420)  # one "other" panel
    for path in written[1:4] + written[5:]:
        assert read_png(path).shape[:2] == (360, 700)  # one axes of 7.0 x 3.6 in


def curves_fixture() -> list[ClassCurves]:
    recall = np.linspace(0.0, 1.0, 11)
    return [
        ClassCurves(name="cat", curves={"IoU 0.50": (recall, 1.0 - 0.5 * recall), "IoU 0.50:0.95": (recall, 0.8 - 0.6 * recall)},
                    ap={"AP50": 75.0, "AP": 50.0}),
        ClassCurves(name="dog", curves={}, ap={"AP50": None, "AP": None}),  # no ground truth
        ClassCurves(name="bird", curves={"IoU 0.50": (recall, np.ones(11)), "IoU 0.50:0.95": (recall, np.full(11, 0.5))},
                    ap={"AP50": 100.0, "AP": 50.0}),
    ]


def test_evaluation_plots_are_valid_pngs(tmp_path):
    curves = curves_fixture()
    pr = plots.plot_pr_curves(curves, tmp_path / "pr.png", title="test")
    bars = plots.plot_ap_bars(curves, tmp_path / "bars.png", title="test")
    assert read_png(pr).shape[:2] == (350, 960)  # 3 axes of 3.2 x 2.9 in, one row, + 0.6 in for the title
    assert read_png(bars).shape[:2] == (258, 800)  # 8 in wide; 0.9 + 0.28 in x 3 classes x 2 APs high
    many = [ClassCurves(name=f"class {i}", curves=curves[0].curves, ap=curves[0].ap) for i in range(9)]
    assert read_png(plots.plot_pr_curves(many, tmp_path / "many.png", title="9")).shape[:2] == (930, 1280)  # 3 x 4


def test_without_matplotlib_drawing_says_how_to_install_it_and_writes_nothing(tmp_path, monkeypatch):
    hide_matplotlib(monkeypatch)
    assert not plots.matplotlib_available()
    log = write_log(tmp_path / "metrics.jsonl", RECORDS)
    with pytest.raises(plots.MatplotlibMissingError, match=r"pip install detectron_res\[viz\]"):
        plots.plot_training_log(log, tmp_path / "plots")
    with pytest.raises(ImportError, match="matplotlib"):
        plots.plot_pr_curves(curves_fixture(), tmp_path / "pr.png", title="x")
    assert not (tmp_path / "plots").exists() and not (tmp_path / "pr.png").exists()


def test_the_package_imports_without_matplotlib():
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "import detectron_res.engine.runner, detectron_res.evaluation.build, detectron_res.utils.plots\n"
        "assert not detectron_res.utils.plots.matplotlib_available()\n"
        "print('imported')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and done.stdout == "imported\n", done.stderr
