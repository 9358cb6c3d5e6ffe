"""The R-CNN stage's RoI cache (OUTPUT_DIR/rcnn/rcnn_rois.pth) is read with a weights-only load: a file crafted to
run code when unpickled runs nothing, and it, a truncated cache or one of the older (pickled) version is made again
with one warning naming it and why; what the cache holds comes back exactly (dtypes, shapes, scalars, tuples)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detectron_res.config import load_config
from detectron_res.data.datasets import generate_loc_shapes
from detectron_res.data.datasets.base import DetectionDataset
from detectron_res.localization import train as loc_train
from detectron_res.localization.train import ROI_POOL_FILE, read_roi_cache, roi_pool, write_roi_cache

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/loc_shapes_r18.yaml")


class WritesAMarker:
    """Unpickled, it opens `marker` for writing, which creates the file: proof that the pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def sample_pool() -> DetectionDataset:
    """Two records with every kind of value the pool holds (and a few more): arrays of several dtypes, shapes and
    layouts, numpy scalars, tuples, nested annotations."""
    rois = np.arange(12, dtype=np.float32).reshape(3, 4) + 0.5
    records = [
        {
            "file_name": "a.JPEG", "image_id": "n01_1", "height": 300, "width": 400,
            "annotations": [{"bbox": [1.0, 2.0, 30.0, 40.0], "category_id": 0, "iscrowd": 0}],
            "rois": rois, "roi_foreground": np.array([True, False, True]),
            "labels": np.array([3, 1], dtype=np.int64), "boxes": np.zeros((0, 4)),
            "score": np.float64(0.25), "count": np.int32(7), "wnid": np.str_("n01"), "size": (300, 400),
        },
        {
            "file_name": "b.JPEG", "image_id": 7, "height": 5, "width": 6, "annotations": [],
            "rois": np.asfortranarray(np.ones((2, 4), dtype=np.float32)), "roi_foreground": np.array([False, False]),
            "flipped": np.arange(8, dtype=np.uint16)[::-2], "zero_d": np.array(1.5), "nothing": None,
        },
    ]
    return DetectionDataset(
        name="train_rcnn_rois", records=records, class_names=["a", "b"], category_ids=[1, 2],
        extra={"wnids": ["n01", "n02"], "loc_csv": "x.csv"},
    )


def assert_same(value, expected, where="pool"):
    """Equal values of the same type; arrays of the same dtype, shape and contents."""
    assert type(value) is type(expected), f"{where}: {type(value)} vs {type(expected)}"
    if isinstance(expected, np.ndarray):
        assert value.dtype == expected.dtype and value.shape == expected.shape, where
        np.testing.assert_array_equal(value, expected)
    elif isinstance(expected, dict):
        assert list(value) == list(expected), where
        for key in expected:
            assert_same(value[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(value) == len(expected), where
        for i, (a, b) in enumerate(zip(value, expected)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert value == expected, where
        if isinstance(expected, np.generic):
            assert value.dtype == expected.dtype, where


def test_the_cache_holds_no_pickled_class_and_gives_back_every_value_exactly(tmp_path):
    pool = sample_pool()
    path = tmp_path / ROI_POOL_FILE
    write_roi_cache(path, key="k1", pool=pool)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    state = torch.load(path, weights_only=True)  # what a weights-only load accepts, unaided
    assert state["version"] == 2 and state["arrays"].dtype == torch.uint8
    # 3x4 float32 (48 bytes), 3 bools (3 -> 16), 2 int64 (16), (0, 4) float64 (0), float64 (8 -> 16), int32 (4 -> 16),
    # <U3 (12 -> 16); then 2x4 float32 (32), 2 bools (16), 4 uint16 (8 -> 16), 0-d float64 (16): each padded to 16
    assert state["arrays"].numel() == 48 + 16 + 16 + 0 + 16 + 16 + 16 + 32 + 16 + 16 + 16
    key, read = read_roi_cache(path)
    assert key == "k1"
    assert_same(read.records, pool.records)
    for name in ("name", "class_names", "category_ids", "json_file", "extra"):
        assert_same(getattr(read, name), getattr(pool, name), name)


def roi_pool_setup(tmp_path, monkeypatch, overrides=()):
    """A config whose OUTPUT_DIR is tmp_path, a one-record data set, an RPN checkpoint file, and
    `rcnn_training_records` replaced by a stand-in that returns `sample_pool()` and counts its calls."""
    cfg = load_config(CONFIG, [f"OUTPUT_DIR={tmp_path}", "MODEL.DEVICE=cpu", "DATALOADER.NUM_WORKERS=0", *overrides])
    dataset = DetectionDataset(name="train", records=[{"file_name": "a.JPEG", "image_id": "n01_1", "height": 300,
                                                       "width": 400, "annotations": []}],
                               class_names=["a", "b"], category_ids=[1, 2])
    rpn_checkpoint = tmp_path / "rpn.pth"
    rpn_checkpoint.write_bytes(b"an RPN checkpoint")
    calls = []

    def make_pool(rpn, data, loader, *, fg_iou_thresh):
        calls.append(data.name)
        return sample_pool()

    monkeypatch.setattr(loc_train, "rcnn_training_records", make_pool)
    return lambda: roi_pool(cfg, None, dataset, rpn_checkpoint=rpn_checkpoint), calls


def test_a_cache_crafted_to_run_code_runs_nothing_and_is_made_again(tmp_path, monkeypatch, caplog):
    make, calls = roi_pool_setup(tmp_path, monkeypatch)
    marker = tmp_path / "payload_ran"
    crafted = tmp_path / ROI_POOL_FILE
    torch.save({"key": "anything", "pool": WritesAMarker(marker)}, crafted)
    torch.load(crafted, weights_only=False)["pool"].close()  # the payload is real: an unsafe load runs it
    assert marker.is_file()
    marker.unlink()

    with caplog.at_level(logging.WARNING, logger="detectron_res"):
        pool = make()
    assert not marker.exists()  # nothing in the crafted file ran
    assert calls == ["train"]
    assert_same(pool.records, sample_pool().records)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"Could not read the R-CNN RoI cache {crafted}: it holds a pickled Python object (io.open) that is "
        "refused, since loading it could run code from the file; only tensors and plain containers (a state_dict) "
        "are read; making the RoIs again"
    ]
    assert torch.serialization.get_unsafe_globals_in_checkpoint(crafted) == []  # replaced by a safe cache
    assert make().records[0]["image_id"] == "n01_1" and calls == ["train"]  # which the next run reads


def test_a_truncated_cache_is_made_again_with_a_warning(tmp_path, monkeypatch, caplog):
    make, calls = roi_pool_setup(tmp_path, monkeypatch)
    make()
    cache = tmp_path / ROI_POOL_FILE
    whole = cache.read_bytes()
    cache.write_bytes(whole[: len(whole) // 2])  # a disk that filled up, a killed copy
    with caplog.at_level(logging.WARNING, logger="detectron_res"):
        pool = make()
    assert calls == ["train", "train"]
    assert_same(pool.records, sample_pool().records)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"Could not read the R-CNN RoI cache {cache}: a truncated or damaged zip archive ({len(whole) // 2:,} bytes, "
        "without the directory that ends a complete archive): an interrupted write, copy or download; making the "
        "RoIs again"
    ]
    assert cache.read_bytes() == whole  # the same cache made again


def test_a_cache_of_the_older_pickled_version_is_made_again(tmp_path, monkeypatch, caplog):
    make, calls = roi_pool_setup(tmp_path, monkeypatch)
    torch.save({"key": "k", "pool": sample_pool()}, tmp_path / ROI_POOL_FILE)  # version 1: a pickled dataclass
    with caplog.at_level(logging.WARNING, logger="detectron_res"):
        make()
    assert calls == ["train"]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "(detectron_res.data.datasets.base.DetectionDataset) that is refused" in warning


def test_a_cache_made_for_another_rpn_is_made_again_and_the_same_one_is_read(tmp_path, monkeypatch):
    make, calls = roi_pool_setup(tmp_path, monkeypatch)
    make()
    make()
    assert calls == ["train"]
    (tmp_path / "rpn.pth").write_bytes(b"another RPN checkpoint")
    make()
    assert calls == ["train", "train"]


def test_a_cache_made_in_another_localization_test_mode_is_made_again(tmp_path, monkeypatch):
    """The RoIs are the RPN's boxes in LOC.TEST_MODE: another mode or other scales give other boxes."""
    make, calls = roi_pool_setup(tmp_path, monkeypatch)
    make()
    multi, multi_calls = roi_pool_setup(tmp_path, monkeypatch, ["LOC.TEST_MODE=dense_multiscale"])
    multi()
    multi()
    assert calls == ["train"] and multi_calls == ["train"]  # made again once, then read
    scales, scale_calls = roi_pool_setup(tmp_path, monkeypatch, ["LOC.TEST_MODE=dense_multiscale",
                                                                 "LOC.TEST_SCALES=[96,160]"])
    scales()
    assert scale_calls == ["train"]


@pytest.fixture(scope="module")
def rpn_trained(tmp_path_factory):
    """The RPN stage trained for 2 iterations on 6 loc_shapes images, and the tool's arguments for a stage-2 run of
    2 iterations (each run in its own process: a run holds its output folder's lock until its process ends)."""
    root = tmp_path_factory.mktemp("loc_shapes")
    generate_loc_shapes(root, num_train=6, num_val=2, seed=5)
    output = tmp_path_factory.mktemp("out")
    arguments = [
        "--cfg", CONFIG, "MODEL.DEVICE=cpu", "DATALOADER.NUM_WORKERS=0", "MODEL.RPN.POST_NMS_TOPK_TEST=4",
        f"OUTPUT_DIR={output}", f"DATASETS.TRAIN=[{root}/LOC_train_solution.csv:{root}/train]", "DATASETS.TEST=[]",
        "SOLVER.IMS_PER_BATCH=2", "SOLVER.MAX_ITER=2", "SOLVER.STEPS=[]", "SOLVER.CHECKPOINT_PERIOD=1",
        "LOC.RCNN.IMS_PER_BATCH=2", "LOC.RCNN.MAX_ITER=2", "LOC.RCNN.STEPS=[]",
    ]
    run_train_loc([*arguments, "--stage", "rpn"])
    return output, arguments


def run_train_loc(arguments: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(REPO / "tools/train_loc.py"), *arguments], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.parametrize("damage", ["crafted", "truncated"])
def test_train_loc_resume_with_a_crafted_or_truncated_cache_runs_nothing_and_makes_it_again(rpn_trained, damage):
    output, arguments = rpn_trained
    cache = output / "rcnn" / ROI_POOL_FILE
    marker = output / "payload_ran"
    if damage == "crafted":
        cache.parent.mkdir(exist_ok=True)
        torch.save({"key": "anything", "pool": WritesAMarker(marker)}, cache)
        reason = "it holds a pickled Python object (io.open) that is refused"
    else:
        assert cache.is_file()  # the crafted run made it again
        cache.write_bytes(cache.read_bytes()[:1000])
        reason = "a truncated or damaged zip archive (1,000 bytes,"
    done = run_train_loc([*arguments, "--stage", "rcnn", "--resume"])
    assert done.stderr == ""
    assert not marker.exists()
    log = (output / "log.txt").read_text()  # the runs' logs, one after the other
    assert f"detectron_res.localization.train] Could not read the R-CNN RoI cache {cache}: {reason}" in log
    assert log.count("making the RoIs again") == (1 if damage == "crafted" else 2)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(cache) == []
    assert read_roi_cache(cache)[1].records[0]["rois"].dtype == np.float32
