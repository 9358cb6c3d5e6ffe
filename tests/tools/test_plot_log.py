"""Tests of `tools/plot_log.py`: training curves as PNGs from a run's metrics.jsonl, and its one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_tool, read_png

from detectron_res.engine.events import JSONWriter, MetricsStorage
from detectron_res.engine.runner import TRAIN_LOG_FILE

REPO = Path(__file__).resolve().parents[2]


plot_log = load_tool("plot_log")


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run folder whose metrics.jsonl the real JSONWriter wrote: 6 iterations logged every 2, then evaluation."""
    writer = JSONWriter(path=tmp_path / "run" / TRAIN_LOG_FILE)
    storage = MetricsStorage()
    for iteration in range(6):
        storage.iter = iteration
        storage.put_scalars(total_loss=2.0 - 0.25 * iteration, loss_cls=1.0 - 0.125 * iteration, loss_rpn_cls=0.5,
                            lr=0.01 * (iteration + 1), time=0.2, data_time=0.01, memory_mb=300.0 + iteration)
        if iteration % 2 == 1:
            writer.write(storage)
    storage.put_scalars(**{"bbox/AP": 40.0, "bbox/AP50": 70.0, "bbox/AP-circle": 35.0})
    writer.write(storage)
    return tmp_path / "run"


def test_log_file_name_is_the_runners():
    assert plot_log.TRAIN_LOG_FILE == TRAIN_LOG_FILE


def test_plots_every_group_of_a_training_log(run_dir, capsys):
    assert plot_log.main([str(run_dir)]) == 0
    names = ["losses", "lr", "time", "memory", "eval_bbox", "eval_bbox_per_class"]
    assert sorted(path.name for path in (run_dir / "plots").iterdir()) == sorted(f"{name}.png" for name in names)
    assert read_png(run_dir / "plots" / "losses.png").shape[:2] == (360, 1260)  # total + 2 terms, one panel each
    for name in names[1:]:
        assert read_png(run_dir / "plots" / f"{name}.png").shape[:2] == (360, 700)
    out = capsys.readouterr().out
    assert f"4 records of {run_dir / TRAIN_LOG_FILE}, iterations 2 to 6" in out
    assert f"wrote {run_dir / 'plots' / 'eval_bbox.png'}" in out

    # --out, and the log file itself as the argument
    assert plot_log.main([str(run_dir / TRAIN_LOG_FILE), "--out", str(run_dir / "elsewhere")]) == 0
    assert len(list((run_dir / "elsewhere").glob("*.png"))) == len(names)


def test_errors_are_one_line_naming_the_file_and_line(run_dir, tmp_path, capsys):
    assert plot_log.main([str(tmp_path / "nowhere")]) == 1
    assert f"plot_log.py: error: training log not found: {tmp_path / 'nowhere' / TRAIN_LOG_FILE}" in capsys.readouterr().err
    log = run_dir / TRAIN_LOG_FILE
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], "{'iteration': 4}", *lines[1:]]) + "\n")
    assert plot_log.main([str(run_dir)]) == 1
    assert f"plot_log.py: error: {log}, line 2: not valid JSON" in capsys.readouterr().err
    log.write_text("")
    assert plot_log.main([str(run_dir)]) == 1
    assert f"plot_log.py: error: {log}: empty training log, no records to plot" in capsys.readouterr().err
    assert not (run_dir / "plots").exists()


def test_without_matplotlib_it_says_how_to_install_it(run_dir, monkeypatch, capsys):
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_log.main([str(run_dir)]) == 1
    assert capsys.readouterr().err.strip() == (
        "plot_log.py: error: plotting needs matplotlib, which is not installed: pip install detectron_res[viz]"
    )
    assert not (run_dir / "plots").exists()


def test_command_line(run_dir):
    done = subprocess.run([sys.executable, str(REPO / "tools" / "plot_log.py"), str(run_dir), "--out", str(run_dir / "p")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert len(list((run_dir / "p").glob("*.png"))) == 6
    bad = subprocess.run([sys.executable, str(REPO / "tools" / "plot_log.py"), str(run_dir / "missing")],
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("plot_log.py: error: training log not found")


# -- outputs checked before any PNG is written, one line per refusal (issue 21 items 5, 14, 18) ---------------------
def run_plot_log(argv, capsys) -> tuple[int, list[str]]:
    """plot_log's exit status and its stderr lines."""
    capsys.readouterr()
    status = plot_log.main(argv)
    return status, capsys.readouterr().err.splitlines()


def test_a_binary_file_is_named(tmp_path, capsys):
    binary = tmp_path / "metrics.jsonl"
    binary.write_bytes(b'{"iteration": 1}\n\x89PNG\r\n')
    status, err = run_plot_log([str(tmp_path)], capsys)
    assert status == 1 and err == [
        f"plot_log.py: error: {binary}, line 2: not UTF-8 text (byte 0x89 at offset 17), so not a training log "
        "(training writes OUTPUT_DIR/metrics.jsonl, JSON lines)"
    ]
    assert not (tmp_path / "plots").exists()


def test_out_that_is_or_lies_under_a_file_is_one_line(run_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    status, err = run_plot_log([str(run_dir), "--out", str(blocker)], capsys)
    assert status == 1 and err == [f"plot_log.py: error: --out {blocker} is a file, not a folder: give the folder the "
                                   "PNGs go to"]
    status, err = run_plot_log([str(run_dir), "--out", str(blocker / "plots")], capsys)
    assert status == 1 and err == [f"plot_log.py: error: --out {blocker / 'plots'} cannot be written: {blocker} is a "
                                   "file, not a folder"]
    assert blocker.read_text() == "x"


def test_a_failed_write_names_out(run_dir, tmp_path, capsys, monkeypatch):
    def disk_full(records, out_dir):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plot_log, "plot_training_log", disk_full)
    status, err = run_plot_log([str(run_dir), "--out", str(tmp_path / "p")], capsys)
    assert status == 1 and err == [
        f"plot_log.py: error: could not write the plots to --out {tmp_path / 'p'}: [Errno 28] No space left on device"
    ]


def test_out_on_the_log_is_refused_and_the_run_folder_is_fine(run_dir, tmp_path, capsys):
    log = run_dir / TRAIN_LOG_FILE
    before = log.read_bytes()
    status, err = run_plot_log([str(run_dir), "--out", str(log)], capsys)
    assert status == 1 and err == [
        f"plot_log.py: error: --out {log} is the same path as the input training log {log}: refusing to overwrite it"
    ]
    # a PNG that resolves to the log: --out holds a losses.png symlinked to it
    (tmp_path / "trap").mkdir()
    (tmp_path / "trap" / "losses.png").symlink_to(log)
    status, err = run_plot_log([str(run_dir), "--out", str(tmp_path / "trap")], capsys)
    assert status == 1 and err == [
        f"plot_log.py: error: plot {tmp_path / 'trap' / 'losses.png'} (= {log}) is the same path as the input "
        f"training log {log}: refusing to overwrite it"
    ]
    assert log.read_bytes() == before and sorted(p.name for p in (tmp_path / "trap").iterdir()) == ["losses.png"]
    # the run folder itself holds the log, and gets the PNGs beside it
    assert plot_log.main([str(run_dir), "--out", str(run_dir)]) == 0
    assert (run_dir / "losses.png").is_file() and log.read_bytes() == before
