"""TensorBoard event files beside the JSON-lines log (TENSORBOARD: true): the exact values and steps read back with
TensorBoard's own reader, a resumed run's purge, closing, the error without tensorboard, and a real training run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from detectron_res.config import load_config
from detectron_res.data.datasets import generate_shapes
from detectron_res.engine.events import JSONWriter, MetricsStorage, TensorboardMissingError, TensorboardWriter
from detectron_res.engine.hooks import PeriodicWriter
from detectron_res.engine.runner import TENSORBOARD_DIR, train

REPO = Path(__file__).resolve().parents[2]


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of the event files in `log_dir`, as TensorBoard shows them."""
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def test_writer_logs_the_json_records_values_at_their_iterations(tmp_path):
    storage = MetricsStorage()
    tensorboard = TensorboardWriter(log_dir=tmp_path / "tb", window=3)
    json_writer = JSONWriter(path=tmp_path / "metrics.jsonl", window=3)
    losses = [4.0, 1.0, 2.0, 0.5]
    for iteration, loss in enumerate(losses):
        storage.iter = iteration
        storage.put_scalars(total_loss=loss, lr=0.25 * (iteration + 1), time=0.5)
        if iteration % 2 == 1:  # a log period of 2
            tensorboard.write(storage)
            json_writer.write(storage)
    storage.put_scalar("bbox/AP", 62.5)  # evaluation after the last step: a record of its own
    tensorboard.write(storage)
    json_writer.write(storage)
    tensorboard.write(storage)  # nothing new: nothing written
    tensorboard.close()
    # losses are medians of the last 3 values: iteration 2 -> median(4, 1) = 2.5; iteration 4 -> median(1, 2, 0.5) = 1
    assert read_scalars(tmp_path / "tb") == {
        "total_loss": [(2, 2.5), (4, 1.0)],
        "lr": [(2, 0.5), (4, 1.0)],
        "time": [(2, 0.5), (4, 0.5)],
        "bbox/AP": [(4, 62.5)],
    }
    # the same numbers as the JSON-lines log (TensorBoard keeps float32)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [
        {"iteration": 2, "total_loss": 2.5, "lr": 0.5, "time": 0.5},
        {"iteration": 4, "total_loss": 1.0, "lr": 1.0, "time": 0.5},
        {"iteration": 4, "bbox/AP": 62.5},
    ]


def test_resumed_run_purges_the_events_a_killed_run_wrote_after_its_checkpoint(tmp_path):
    first = TensorboardWriter(log_dir=tmp_path)
    storage = MetricsStorage()
    for iteration in range(5):
        storage.iter = iteration
        storage.put_scalar("lr", float(iteration))
        first.write(storage)
    first.close()
    resumed = TensorboardWriter(log_dir=tmp_path, start_iter=2)  # the checkpoint after 2 iterations
    storage = MetricsStorage(start_iter=2)
    for iteration in range(2, 4):
        storage.iter = iteration
        storage.put_scalar("lr", 10.0 + iteration)
        resumed.write(storage)
    resumed.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert read_scalars(tmp_path) == {"lr": [(1, 0.0), (2, 1.0), (3, 12.0), (4, 13.0)]}


def test_periodic_writer_closes_its_writers_also_after_a_failed_run():
    class Recorder:
        def __init__(self):
            self.calls = []

        def write(self, storage):
            self.calls.append("write")

        def close(self):
            self.calls.append("close")

    recorder = Recorder()
    hook = PeriodicWriter([recorder, SimpleNamespace(write=lambda storage: None)], period=10)
    hook.trainer = SimpleNamespace(completed=False, storage=MetricsStorage())
    hook.after_train()
    assert recorder.calls == ["close"]
    hook.trainer.completed = True
    hook.after_train()
    assert recorder.calls == ["close", "write", "close"]


def test_missing_tensorboard_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(TensorboardMissingError, match=r"TENSORBOARD: true needs the tensorboard package.*pip install "
                                                      r"detectron_res\[viz\], or set TENSORBOARD=false"):
        TensorboardWriter(log_dir=tmp_path)
    assert issubclass(TensorboardMissingError, ImportError) and issubclass(TensorboardMissingError, RuntimeError)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=4, num_val=2, image_size=64, seed=2)
    return {split: f"{root}/annotations/instances_{split}.json:{root}/{split}" for split in ("train", "val")}


def tiny_config(tiny_shapes, output: Path, **extra: str):
    overrides = {
        "TENSORBOARD": "true", "OUTPUT_DIR": str(output), "MODEL.DEVICE": "cpu", "DATALOADER.NUM_WORKERS": "0",
        "DATASETS.TRAIN": f"[{tiny_shapes['train']}]", "DATASETS.TEST": f"[{tiny_shapes['val']}]",
        "INPUT.MIN_SIZE_TRAIN": "[64]", "INPUT.MAX_SIZE_TRAIN": "64", "INPUT.MIN_SIZE_TEST": "64",
        "INPUT.MAX_SIZE_TEST": "64", "SOLVER.IMS_PER_BATCH": "2", "SOLVER.MAX_ITER": "3", "SOLVER.STEPS": "[]",
        "SOLVER.WARMUP_ITERS": "1", "SOLVER.CHECKPOINT_PERIOD": "10", "LOG_PERIOD": "2", **extra,
    }
    return load_config(REPO / "configs" / "shapes_r18.yaml", [f"{key}={value}" for key, value in overrides.items()])


def test_training_with_tensorboard_writes_the_logged_scalars(tiny_shapes, tmp_path):
    output = tmp_path / "run"
    train(tiny_config(tiny_shapes, output))
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [record["iteration"] for record in records] == [2, 3, 3]  # LOG_PERIOD 2, the last iteration, evaluation
    scalars = read_scalars(output / TENSORBOARD_DIR)
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for name, value in record.items():
            if name != "iteration":
                expected.setdefault(name, []).append((record["iteration"], float(np.float32(value))))
    assert scalars == expected
    assert {"total_loss", "loss_cls", "lr", "time", "bbox/AP", "bbox/AP50"} <= set(scalars)


def test_training_with_tensorboard_on_but_not_installed_stops_before_the_first_step(tiny_shapes, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(TensorboardMissingError, match=r"pip install detectron_res\[viz\]"):
        train(tiny_config(tiny_shapes, tmp_path / "run"))
    assert not (tmp_path / "run" / TENSORBOARD_DIR).exists()
    assert not list((tmp_path / "run").glob("model_*.pth"))
