"""tools/demo.py: a tiny detector trained for two iterations on shapes draws its detections on a folder of images,
a glob of coco128 images and a video; pixels change only around the boxes and their labels; bad inputs name
themselves."""

import re
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import package_logger_restored

from detectron_res.data.datasets import generate_shapes
from detectron_res.engine.runner import run_tool
from detectron_res.utils.visualize import draw_detections, label_size

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import demo  # noqa: E402
import train_det  # noqa: E402

CONFIG = str(REPO / "configs/shapes_r18.yaml")
SIZE = 128  # the shapes images' side and the test-time size
THICKNESS = 2  # draw_detections' default line width
# small and fast at test time: few proposals, three detections per image at most (so most of an image stays
# untouched and the "nothing changes elsewhere" check has pixels to look at)
TEST_OVERRIDES = [
    "MODEL.DEVICE=cpu",
    f"INPUT.MIN_SIZE_TEST={SIZE}",
    f"INPUT.MAX_SIZE_TEST={SIZE}",
    "MODEL.RPN.POST_NMS_TOPK_TEST=50",
    "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE=3",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint, shapes val image folder): shapes_r18 trained for 2 iterations on 8 images of 128 px (~1 s)."""
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=8, num_val=4, image_size=SIZE, seed=1)
    out = root / "run"
    with package_logger_restored():
        train_det.main([
            "--cfg", CONFIG, "--output", str(out), *TEST_OVERRIDES,
            f"DATASETS.TRAIN=[{root}/annotations/instances_train.json:{root}/train]", "DATASETS.TEST=[]",
            "DATALOADER.NUM_WORKERS=0", f"INPUT.MIN_SIZE_TRAIN=[{SIZE}]", f"INPUT.MAX_SIZE_TRAIN={SIZE}",
            "SOLVER.IMS_PER_BATCH=2", "SOLVER.MAX_ITER=2", "SOLVER.STEPS=[1]", "SOLVER.WARMUP_ITERS=1",
        ])
    return out / "model_final.pth", root / "val"


def run_demo(checkpoint, input_spec, output, *extra):
    return demo.main(["--cfg", CONFIG, "--ckpt", str(checkpoint), "--input", str(input_spec), "--output", str(output),
                      *TEST_OVERRIDES, *extra])


def allowed_region(shape, detections) -> np.ndarray:
    """Where draw_detections may change pixels: each box's outline widened by the line thickness on both sides
    (its inside stays untouched), and its label's filled background (above the box, or inside its top)."""
    allowed = np.zeros(shape[:2], dtype=bool)
    for box, score, name in zip(detections["boxes"], detections["scores"], detections["class_names"], strict=True):
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        outline = np.zeros_like(allowed)
        outline[max(y1 - THICKNESS, 0) : y2 + THICKNESS + 1, max(x1 - THICKNESS, 0) : x2 + THICKNESS + 1] = True
        outline[y1 + THICKNESS : y2 - THICKNESS + 1, x1 + THICKNESS : x2 - THICKNESS + 1] = False
        allowed |= outline
        width, height = label_size(f"{name} {float(score):.2f}")
        top = y1 - height if y1 - height >= 0 else y1
        allowed[top : top + height, x1 : x1 + width] = True
    return allowed


def check_drawn_only_around_detections(record) -> None:
    before = cv2.imread(record["input"], cv2.IMREAD_COLOR)
    after = cv2.imread(record["output"], cv2.IMREAD_COLOR)
    assert after is not None and after.shape == before.shape
    detections = record["detections"]
    assert len(detections["boxes"]) > 0  # something is drawn: the checks below cannot pass vacuously
    allowed = allowed_region(before.shape, detections)
    changed = (before != after).any(axis=2)
    assert changed.any()
    assert (~allowed).mean() > 0.2  # the region that must stay untouched is not empty
    assert not (changed & ~allowed).any(), f"{(changed & ~allowed).sum()} pixels changed away from the detections"


def test_a_folder_of_images(tiny, tmp_path, capsys):
    checkpoint, val = tiny
    records = run_demo(checkpoint, val, tmp_path / "out", "--score-thr", "0")
    inputs = sorted(p.name for p in val.iterdir())
    assert [Path(r["input"]).name for r in records] == inputs
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == inputs  # one annotated copy each, same name
    for record in records:
        assert record["kind"] == "image" and Path(record["output"]).parent == tmp_path / "out"
        check_drawn_only_around_detections(record)
    lines = capsys.readouterr().out.splitlines()
    first = records[0]["detections"]
    summary = [line for line in lines if line.startswith(f"{inputs[0]}: ")]
    assert len(summary) == 1 and f"{len(first['boxes'])} detection" in summary[0]
    assert first["class_names"][0] in summary[0] and re.search(r"in \d+\.\d{3} s", summary[0])


def test_a_glob_of_coco128_images(tiny, tmp_path, shared_data):
    """Three real photos (converted to PNG, so that the written copies are lossless) through a glob pattern, and one
    JPEG as a single image: its copy is the drawn image encoded as JPEG at quality 95."""
    checkpoint, _ = tiny
    photos = sorted((shared_data("coco128") / "train2017").glob("*.jpg"))[:3]
    (tmp_path / "in").mkdir()
    for photo in photos:
        cv2.imwrite(str(tmp_path / "in" / f"{photo.stem}.png"), cv2.imread(str(photo)))
    (tmp_path / "in" / "notes.txt").write_text("not an image")  # a glob's non-image matches are left out
    records = run_demo(checkpoint, tmp_path / "in" / "*", tmp_path / "out", "--score-thr", "0")
    assert [Path(r["output"]).name for r in records] == [f"{p.stem}.png" for p in photos]
    for record in records:
        check_drawn_only_around_detections(record)

    (record,) = run_demo(checkpoint, photos[0], tmp_path / "jpeg", "--score-thr", "0")
    assert Path(record["output"]) == tmp_path / "jpeg" / photos[0].name
    detections = record["detections"]
    names = dict(zip(detections["labels"].tolist(), detections["class_names"], strict=True))
    class_names = [names.get(label, "") for label in range(3)]
    image = cv2.imread(str(photos[0]))
    drawn = draw_detections(image[:, :, ::-1], detections, class_names, 0.0)
    _, encoded = cv2.imencode(".jpg", np.ascontiguousarray(drawn[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95])
    np.testing.assert_array_equal(cv2.imread(record["output"]), cv2.imdecode(encoded, cv2.IMREAD_COLOR))


@pytest.mark.parametrize("suffix, fourcc", [(".avi", "MJPG"), (".mp4", "mp4v")])
def test_a_video(tiny, tmp_path, capsys, suffix, fourcc):
    checkpoint, val = tiny
    frames = [cv2.imread(str(p)) for p in sorted(val.iterdir())]
    video = tmp_path / f"clip{suffix}"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*fourcc), 5.0, (SIZE, SIZE))
    for frame in frames:
        writer.write(frame)
    writer.release()

    (record,) = run_demo(checkpoint, video, tmp_path / "out", "--score-thr", "0")
    assert record["kind"] == "video" and record["frames"] == len(frames) and record["size"] == (SIZE, SIZE)
    assert Path(record["output"]) == tmp_path / "out" / video.name
    written = read_frames(record["output"])
    originals = read_frames(video)  # what the demo saw: the input after its own lossy encoding
    assert len(written) == len(frames) and all(frame.shape == (SIZE, SIZE, 3) for frame in written)
    for before, after, detections in zip(originals, written, record["detections"], strict=True):
        assert len(detections["boxes"]) > 0
        difference = np.abs(before.astype(np.int16) - after.astype(np.int16)).max(axis=2)
        allowed = allowed_region(before.shape, detections)
        # the drawn pixels differ a lot; elsewhere only the re-encoding's noise (more near the drawn edges)
        assert difference[allowed].mean() > 4 * difference[~allowed].mean() + 10
    assert f"{video.name}: {len(frames)} frames of {SIZE}x{SIZE}" in capsys.readouterr().out


def read_frames(path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def test_score_threshold_lowers_the_models_own(tiny, tmp_path):
    checkpoint, val = tiny
    image = sorted(val.iterdir())[0]
    # the config's SCORE_THRESH_TEST of 0.99 would drop everything this barely trained model finds
    low = ["--score-thr", "0", "MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.99"]
    (record,) = run_demo(checkpoint, image, tmp_path / "low", *low)
    scores = record["detections"]["scores"]
    assert len(scores) > 0 and scores.min() < 0.99
    assert "SCORE_THRESH_TEST lowered from 0.99 to --score-thr 0" in (tmp_path / "low" / "log.txt").read_text()

    # a --score-thr above the config's 0.05 leaves it as it is, and only what scores at least --score-thr is drawn
    threshold = round(float(scores[0]) - 0.001, 4)
    assert threshold > 0.05
    (record,) = run_demo(checkpoint, image, tmp_path / "high", "--score-thr", str(threshold))
    np.testing.assert_allclose(record["detections"]["scores"], scores[scores >= threshold], rtol=1e-5)
    assert "lowered" not in (tmp_path / "high" / "log.txt").read_text()
    # "at least": a detection scoring exactly --score-thr is drawn
    exact = float(scores[1])
    assert exact > 0.05
    (record,) = run_demo(checkpoint, image, tmp_path / "exact", "--score-thr", repr(exact))
    assert exact in record["detections"]["scores"].tolist()


def test_the_checkpoint_defaults_to_the_newest_in_the_configs_output_dir(tiny, tmp_path):
    checkpoint, val = tiny
    argv = ["--cfg", CONFIG, "--input", str(min(val.iterdir())), *TEST_OVERRIDES, f"OUTPUT_DIR={checkpoint.parent}"]
    (record,) = demo.main(argv)  # no --ckpt, no --output: model_final.pth of OUTPUT_DIR, written to OUTPUT_DIR/demo
    assert Path(record["output"]) == checkpoint.parent / "demo" / min(val.iterdir()).name
    assert f"Evaluating the weights of {checkpoint}" in (checkpoint.parent / "demo" / "log.txt").read_text()


def test_bad_inputs_name_the_path(tiny, tmp_path, capsys):
    checkpoint, val = tiny
    missing = tmp_path / "missing.jpg"
    with pytest.raises(FileNotFoundError, match=re.escape(f"input not found: {missing}")):
        run_demo(checkpoint, missing, tmp_path / "out")
    pattern = tmp_path / "nothing_*.png"
    with pytest.raises(FileNotFoundError, match=re.escape(f"the glob pattern {pattern} matches no file")):
        run_demo(checkpoint, pattern, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(f"no images or videos in the folder {tmp_path / 'empty'}")):
        run_demo(checkpoint, tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ValueError, match=re.escape(f"--output {val} is the same path as the input --input {val}: ")):
        run_demo(checkpoint, val, val)

    (tmp_path / "bad").mkdir()
    shutil.copy(sorted(val.iterdir())[0], tmp_path / "bad" / "a.png")
    (tmp_path / "bad" / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=re.escape(f"corrupt or unsupported image: {tmp_path / 'bad' / 'b.png'}")):
        run_demo(checkpoint, tmp_path / "bad", tmp_path / "out")
    assert (tmp_path / "out" / "a.png").is_file()  # the images before it are written

    # through the command line's wrapper: one line naming the path, exit status 1
    capsys.readouterr()
    argv = ["--cfg", CONFIG, "--ckpt", str(checkpoint), "--input", str(missing), "--output", str(tmp_path / "out")]
    assert run_tool(demo.main, argv) == 1
    assert f"error: input not found: {missing}" in capsys.readouterr().err


def test_show_without_a_display_says_why_and_still_writes(tiny, tmp_path, monkeypatch):
    checkpoint, val = tiny
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    problem = demo.display_problem()  # no GUI in opencv-python-headless, or no display for a GUI build
    assert problem is not None and ("no GUI" in problem or "no display" in problem)
    (record,) = run_demo(checkpoint, sorted(val.iterdir())[0], tmp_path / "out", "--show")
    assert Path(record["output"]).is_file()
    assert f"--show: {problem}" in (tmp_path / "out" / "log.txt").read_text()


# -- outputs never land on inputs; per-file failures name the file in one line (issue 21 items 5 and 13) -----------
def file_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def test_outputs_that_alias_an_input_are_refused_before_anything_is_written(tiny, tmp_path):
    checkpoint, val = tiny
    images = tmp_path / "images"
    shutil.copytree(val, images)
    before = file_bytes(images)
    (tmp_path / "link_to_images").symlink_to(images)
    (tmp_path / "out").mkdir()
    shutil.copy(min(val.iterdir()), tmp_path / "out" / "earlier.png")  # an image already in the output folder
    out_before = file_bytes(tmp_path / "out")
    (tmp_path / "link_to_out").symlink_to(tmp_path / "out")
    first = min(images.iterdir())
    (tmp_path / "trap").mkdir()
    (tmp_path / "trap" / first.name).symlink_to(first)  # an annotated file that would be written through to the input
    cases = [
        (images, images / ".." / "images",
         f"--output {images / '..' / 'images'} (= {images}) is the same path as the input --input {images}: "
         "refusing to overwrite it"),
        (images, tmp_path / "link_to_images",
         f"--output {tmp_path / 'link_to_images'} (= {images}) is the same path as the input --input {images}: "
         "refusing to overwrite it"),
        (tmp_path / "link_to_out", tmp_path / "out",  # the input is a symlink to the output folder
         f"--output {tmp_path / 'out'} is the same path as the input --input {tmp_path / 'link_to_out'} (= "
         f"{tmp_path / 'out'}): refusing to overwrite it"),
        (images, images / "annotated",
         f"--output {images / 'annotated'} lies inside the input --input {images}: refusing to write there"),
        (first, tmp_path / "trap",
         f"annotated file {tmp_path / 'trap' / first.name} (= {first}) is the same path as the input --input "
         f"{first}: refusing to overwrite it"),
        (first, checkpoint,
         f"--output {checkpoint} is the same path as the input --ckpt {checkpoint}: refusing to overwrite it"),
    ]
    for input_spec, output, message in cases:
        with pytest.raises(ValueError) as caught:
            run_demo(checkpoint, input_spec, output)
        assert str(caught.value) == message
    assert file_bytes(images) == before
    assert file_bytes(tmp_path / "out") == out_before
    assert [p.name for p in (tmp_path / "trap").iterdir()] == [first.name]
    assert not (images / "annotated").exists() and not (images / "log.txt").exists()


def test_two_inputs_written_to_one_file_are_refused(tiny, tmp_path):
    checkpoint, _ = tiny
    (tmp_path / "clips").mkdir()
    for name in ("clip.mp4", "clip.wmv"):  # a .wmv is written as .mp4: both would become out/clip.mp4
        (tmp_path / "clips" / name).write_bytes(b"not read: refused before")
    out = tmp_path / "out"
    with pytest.raises(ValueError) as caught:
        run_demo(checkpoint, tmp_path / "clips", out)
    assert str(caught.value) == (f"annotated file {out / 'clip.mp4'} and annotated file {out / 'clip.mp4'} are the "
                                 "same path: one output would overwrite the other")
    assert not out.exists()


@pytest.mark.parametrize("height, width", [(4, 6000), (6000, 3)])
def test_images_of_extreme_aspect_ratio(tiny, tmp_path, height, width):
    """At the test size 128 (MAX_SIZE_TEST 128) the short side rounds to 0.085 or 0.064 px: it keeps 1 px, and the
    model runs on a 1 x 128 (128 x 1) image; the annotated copy has the input's size."""
    checkpoint, _ = tiny
    image = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    source = tmp_path / f"extreme_{height}x{width}.png"
    cv2.imwrite(str(source), image)
    (record,) = run_demo(checkpoint, source, tmp_path / "out", "--score-thr", "0")
    written = cv2.imread(record["output"])
    assert written.shape == (height, width, 3)
    assert record["kind"] == "image" and len(record["detections"]["boxes"]) > 0


def demo_failure(checkpoint, input_spec, output, capfd) -> list[str]:
    """The demo run through the command line's wrapper: exit status 1 and the lines it printed on stderr (file
    descriptor 2, so a C library's own lines count), each without the program name run_tool puts first."""
    argv = ["--cfg", CONFIG, "--ckpt", str(checkpoint), "--input", str(input_spec), "--output", str(output),
            *TEST_OVERRIDES]
    capfd.readouterr()
    assert run_tool(demo.main, argv) == 1
    return [line.split(": ", 1)[1] if ": error: " in line else line for line in capfd.readouterr().err.splitlines()]


def test_a_file_that_fails_is_named_in_one_line(tiny, tmp_path, capfd):
    checkpoint, val = tiny
    _, png = cv2.imencode(".png", np.zeros((50, 60, 3), dtype=np.uint8))
    header = bytearray(png.tobytes())
    header[16:24] = b"\xff" * 8  # width and height of the IHDR chunk: its CRC no longer matches
    corrupt = tmp_path / "corrupt_header.png"
    corrupt.write_bytes(bytes(header))
    assert demo_failure(checkpoint, corrupt, tmp_path / "out", capfd) == [
        f"error: corrupt or unsupported image: {corrupt} (libpng error: IHDR: CRC error)"
    ]
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert demo_failure(checkpoint, empty, tmp_path / "out", capfd) == [
        f"error: corrupt or unsupported image: {empty}"
    ]
    if Path("/proc/self/mem").is_file():  # a file whose read fails: OSError [Errno 5] without a file name
        unreadable = tmp_path / "unreadable.png"
        unreadable.symlink_to("/proc/self/mem")
        assert demo_failure(checkpoint, unreadable, tmp_path / "out", capfd) == [
            f"error: {unreadable}: [Errno 5] Input/output error"
        ]


def test_a_model_failure_names_the_file_in_one_line(tiny, tmp_path, monkeypatch):
    checkpoint, val = tiny
    source = min(val.iterdir())

    def fails(self, image):
        raise RuntimeError("1 validation error for InitSchema\nheight\n  Input should be greater than or equal to 1")

    monkeypatch.setattr(demo.Predictor, "__call__", fails)
    with pytest.raises(RuntimeError) as caught:
        run_demo(checkpoint, source, tmp_path / "out")
    assert str(caught.value) == (f"{source}: 1 validation error for InitSchema height Input should be greater than or "
                                 "equal to 1")


def test_help_gives_the_output_folder_the_demo_really_uses(capsys):
    with pytest.raises(SystemExit) as exited:
        demo.main(["--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--output OUTPUT folder of the annotated files and log.txt (default: <OUTPUT_DIR>/demo)" in text
    assert "the config's OUTPUT_DIR)" not in text
