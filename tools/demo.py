#!/usr/bin/env python
"""Draw a trained detector's detections on images or videos and write the annotated copies.

    python tools/demo.py --cfg configs/shapes_r18.yaml --ckpt output/shapes_r18/model_final.pth --input photo.jpg
    python tools/demo.py --cfg CONFIG --ckpt CHECKPOINT --input images/ --output annotated/ --score-thr 0.3
    python tools/demo.py --cfg CONFIG --ckpt CHECKPOINT --input "images/*.png" --show
    python tools/demo.py --cfg CONFIG --ckpt CHECKPOINT --input clip.mp4 --output annotated/

`--input` is one image, a video (.mp4, .avi, .mov, .mkv, ...), a folder (its images and videos, not its subfolders)
or a glob pattern (quoted; the images and videos it matches). Each detection scoring at least `--score-thr` is drawn
with its class name and score (`utils.visualize.draw_detections`); MODEL.ROI_HEADS.SCORE_THRESH_TEST is lowered to
`--score-thr` when it is higher, so that the model drops nothing the threshold asks for. Annotated images keep their
file names (relative to the folder, or to the common folder of the glob's matches) in `--output` (default:
<OUTPUT_DIR>/demo), beside log.txt; a video becomes a video of the same name (MJPG in .avi/.mkv, MPEG-4 Part 2
"mp4v" in .mp4/.mov/.m4v; other containers are written as .mp4). One line per image (detections, top classes, time)
and per video goes to stdout, with a tqdm bar over folders, globs and video frames. `--show` also shows each result
in an OpenCV window (any key: next image; q or Esc: stop showing) where OpenCV has a GUI and there is a display;
elsewhere it says why and only writes the files.
Flags may come before or after KEY=VALUE overrides.

Nothing the demo reads is overwritten: before anything is written, `--output`, every annotated file and log.txt
are resolved (`..` and symlinks followed) and refused, in one line naming both paths, when one is an input image
or video, lies inside the `--input` folder (or the glob's common folder), holds an input, is `--cfg` or `--ckpt`,
or is another output (two inputs that would be written to one file). A file that cannot be read or decoded, or
that the model fails on, stops the demo with one line naming it (the files before it are written).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from detectron_res.config import config_files, load_config, merge_overrides
from detectron_res.data.build import build_test_mapper, load_dataset
from detectron_res.data.mapper import read_image_rgb
from detectron_res.engine.predictor import Predictor
from detectron_res.engine.runner import (
    default_argument_parser,
    load_for_inference,
    parse_args,
    releasing_run_folders,
    run_tool,
    setup,
)
from detectron_res.utils.paths import check_tool_paths
from detectron_res.utils.visualize import draw_detections

logger = logging.getLogger("detectron_res.demo")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".pbm", ".pgm", ".ppm")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".webm", ".3gp")
MEDIA_EXTENSIONS = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
# the codec written for each output container; containers not listed are written as .mp4. Both codecs are
# encoded by the FFmpeg of opencv-python(-headless) wheels (H.264 is not: no encoder there) and read back by it.
VIDEO_CODECS = {".avi": "MJPG", ".mkv": "MJPG", ".mp4": "mp4v", ".mov": "mp4v", ".m4v": "mp4v"}
DEFAULT_VIDEO_EXTENSION = ".mp4"
DEFAULT_FPS = 25.0  # for a video whose frame rate OpenCV cannot read
WINDOW_NAME = "detectron_res demo"
TOP_CLASSES = 3  # classes named in an image's summary line


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def collect_inputs(spec: str) -> tuple[list[Path], Path]:
    """The files `--input` names and the folder their output names are relative to.

    Raises:
        FileNotFoundError: a missing file or folder, a glob pattern matching no file, a folder without images or
            videos.
    """
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in MEDIA_EXTENSIONS)
        if not files:
            extensions = " ".join(MEDIA_EXTENSIONS)
            raise FileNotFoundError(f"no images or videos in the folder {spec} (looked for {extensions})")
        return files, path
    if path.is_file():
        return [path], path.parent
    if glob.has_magic(spec):
        matches = [Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
        files = sorted(p for p in matches if p.suffix.lower() in MEDIA_EXTENSIONS)
        if not files:
            what = f"only files that are not images or videos ({matches[0]}, ...)" if matches else "no file"
            raise FileNotFoundError(f"the glob pattern {spec} matches {what}")
        return files, Path(os.path.commonpath([str(p.parent.absolute()) for p in files]))
    raise FileNotFoundError(f"input not found: {spec} (expected an image, a video, a folder or a glob pattern)")


def check_paths(
    *, spec: str, files: Sequence[Path], base: Path, output_dir: Path, targets: Sequence[Path], cfg: str,
    ckpt: str | None,
) -> None:
    """Refuses, before anything is written, an output (the --output folder, an annotated file, log.txt) that is or
    lies inside an input (an input file; the --input folder or the glob's common folder; --cfg and its _base_,
    --ckpt), an
    --output folder that holds an input image or video, and two outputs on one path (`utils.paths`: resolved, so
    `..` and symlinks count). --cfg and --ckpt may lie in --output (a training's folder), as long as no annotated
    file lands on them.

    Raises:
        PathConflictError: the first conflict, naming both paths.
    """
    folder_given = not Path(spec).is_file()  # a folder or a glob: its folder is an input too (re-read next time)
    outputs = {"--output": output_dir, "annotated file": targets, "log.txt": output_dir / "log.txt"}
    check_tool_paths(inputs={"--input": [*files, *([base] if folder_given else [])]}, outputs=outputs)
    check_tool_paths(inputs={"--cfg": config_files(cfg), "--ckpt": ckpt}, outputs=outputs, run_folders=["--output"])


def output_path(source: Path, base: Path, output_dir: Path) -> Path:
    """Where the annotated copy of `source` goes: its path relative to `base`, under `output_dir`; a video in a
    container OpenCV cannot write here gets the .mp4 extension."""
    target = output_dir / source.absolute().relative_to(base.absolute())
    if is_video(source) and target.suffix.lower() not in VIDEO_CODECS:
        target = target.with_suffix(DEFAULT_VIDEO_EXTENSION)
    return target


def summarize(class_names: Sequence[str]) -> str:
    """'3 detections (2 circle, 1 square)': the number of detections and the most frequent classes (ties: the
    class of the better detection first, the names being sorted by descending score)."""
    counts = Counter(class_names).most_common()
    text = f"{len(class_names)} detection{'' if len(class_names) == 1 else 's'}"
    if counts:
        shown = ", ".join(f"{n} {name}" for name, n in counts[:TOP_CLASSES])
        text += f" ({shown}{', ...' if len(counts) > TOP_CLASSES else ''})"
    return text


def kept(result: dict, score_thr: float) -> dict:
    """The detections scoring at least `score_thr` (those `draw_detections` draws)."""
    keep = result["scores"] >= score_thr
    return {
        "boxes": result["boxes"][keep],
        "scores": result["scores"][keep],
        "labels": result["labels"][keep],
        "class_names": [name for name, k in zip(result["class_names"], keep, strict=True) if k],
    }


def display_problem() -> str | None:
    """Why `--show` cannot open a window here (None when it can)."""
    if re.search(r"^\s*GUI:\s*NONE\s*$", cv2.getBuildInformation(), re.MULTILINE):
        return ("this OpenCV has no GUI support (opencv-python-headless); "
                "install opencv-python instead of opencv-python-headless to use --show")
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "there is no display (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    try:
        cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
    except cv2.error as error:
        return f"OpenCV cannot open a window: {str(error).strip().splitlines()[-1]}"
    return None


class Window:
    """The `--show` window: `show(bgr, wait_ms)` shows an image and waits for a key (0: until one is pressed); q or
    Esc closes the window for the rest of the run."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def show(self, image_bgr: np.ndarray, wait_ms: int) -> None:
        if not self.enabled:
            return
        cv2.imshow(WINDOW_NAME, image_bgr)
        if cv2.waitKey(wait_ms) & 0xFF in (ord("q"), 27):
            self.enabled = False
            cv2.destroyWindow(WINDOW_NAME)

    def close(self) -> None:
        if self.enabled:
            cv2.destroyAllWindows()


def build_predictor(cfg, checkpoint: str | None) -> Predictor:
    """The config's model with the checkpoint's weights; class names from the checkpoint (training stores them),
    else from the config's first test data set, else class_0..class_{K-1}."""
    model, metadata = load_for_inference(cfg, checkpoint)
    class_names = metadata.get("class_names")
    if class_names is None and cfg.DATASETS.TEST:
        try:
            class_names = load_dataset(cfg, cfg.DATASETS.TEST[0]).class_names
            logger.info("The checkpoint holds no class names; taking those of the data set %s", cfg.DATASETS.TEST[0])
        except (OSError, ValueError) as error:
            logger.warning("The checkpoint holds no class names and the data set %s gives none (%s)",
                           cfg.DATASETS.TEST[0], error)
    if class_names is None:
        logger.warning("Calling the classes class_0..class_%d", cfg.MODEL.NUM_CLASSES - 1)
        class_names = [f"class_{i}" for i in range(cfg.MODEL.NUM_CLASSES)]
    if len(class_names) != cfg.MODEL.NUM_CLASSES:
        raise ValueError(f"{len(class_names)} class names for a model with MODEL.NUM_CLASSES={cfg.MODEL.NUM_CLASSES}")
    return Predictor(model, mapper=build_test_mapper(cfg), class_names=class_names)


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[list[str]]:
    """Collects what C libraries print on file descriptor 2 inside the block (libpng's "libpng error: IHDR: CRC
    error" for a corrupt header, libjpeg's warnings), which would otherwise add lines to the tool's one-line error;
    the list holds the text once the block ends."""
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace").strip())


def read_image(source: Path) -> np.ndarray:
    """`read_image_rgb` (its errors name the file) with the decoder's own stderr lines logged, or appended to the
    error, instead of printed."""
    with native_stderr_captured() as native:
        try:
            image = read_image_rgb(source)
        except ValueError as error:
            failure = error
        else:
            failure = None
    decoder = " ".join(line.strip() for line in native[0].splitlines() if line.strip())
    if failure is not None:
        if decoder:
            failure.add_note(f"({decoder})")
        raise failure
    if decoder:
        logger.warning("%s: the decoder says: %s", source, decoder)
    return image


def one_line(error: BaseException) -> str:
    """The message of `error` and its notes on one line."""
    text = " ".join([str(error), *getattr(error, "__notes__", ())])
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(error).__name__


def annotate_file(predictor: Predictor, source: Path, target: Path, score_thr: float, window: Window) -> dict:
    """`annotate_image` or `annotate_video`; an error on the file (unreadable, empty, corrupt, or the model failing
    on it) becomes one line that names it."""
    annotate = annotate_video if is_video(source) else annotate_image
    try:
        return annotate(predictor, source, target, score_thr, window)
    except (ValueError, OSError, RuntimeError) as error:
        message = one_line(error)
        if str(source) in message and message == " ".join([str(error), *getattr(error, "__notes__", ())]):
            raise  # already one line naming the file
        kind = next(kind for kind in (OSError, ValueError, RuntimeError) if isinstance(error, kind))
        raise kind(f"{source}: {message}") from error


def annotate_image(predictor: Predictor, source: Path, target: Path, score_thr: float, window: Window) -> dict:
    """Detects, draws and writes one image; returns its record (see `main`)."""
    image = read_image(source)  # FileNotFoundError / BadImageError name the file
    start = time.perf_counter()
    result = kept(predictor(image), score_thr)
    seconds = time.perf_counter() - start
    drawn = cv2.cvtColor(draw_detections(image, result, predictor.class_names, score_thr), cv2.COLOR_RGB2BGR)
    target.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if target.suffix.lower() in (".jpg", ".jpeg") else []
    if not cv2.imwrite(str(target), drawn, params):
        raise OSError(f"could not write {target}")
    best = f", best {result['scores'][0]:.2f}" if len(result["scores"]) else ""
    tqdm.write(f"{source.name}: {summarize(result['class_names'])}{best} in {seconds:.3f} s -> {target}")
    window.show(drawn, 0)
    return {"input": str(source), "output": str(target), "kind": "image", "detections": result, "seconds": seconds}


def annotate_video(predictor: Predictor, source: Path, target: Path, score_thr: float, window: Window) -> dict:
    """Detects and draws on every frame of a video and writes them as a video of the same size and frame rate;
    returns its record (see `main`)."""
    capture = cv2.VideoCapture(str(source))
    if not capture.isOpened():
        raise OSError(f"OpenCV cannot open the video {source}")
    try:
        fps = capture.get(cv2.CAP_PROP_FPS)
        fps = fps if np.isfinite(fps) and fps > 0 else DEFAULT_FPS
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        target.parent.mkdir(parents=True, exist_ok=True)
        writer = None
        frames, counts, seconds, per_frame = 0, Counter(), 0.0, []
        progress = tqdm(total=total, desc=source.name, unit="frame", leave=False)
        try:
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                if writer is None:
                    height, width = frame.shape[:2]
                    fourcc = cv2.VideoWriter_fourcc(*VIDEO_CODECS[target.suffix.lower()])
                    writer = cv2.VideoWriter(str(target), fourcc, fps, (width, height))
                    if not writer.isOpened():
                        raise OSError(f"OpenCV cannot write the video {target}")
                rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                start = time.perf_counter()
                result = kept(predictor(rgb), score_thr)
                seconds += time.perf_counter() - start
                drawn = cv2.cvtColor(draw_detections(rgb, result, predictor.class_names, score_thr), cv2.COLOR_RGB2BGR)
                writer.write(drawn)
                window.show(drawn, 1)
                frames += 1
                counts.update(result["class_names"])
                per_frame.append(result)
                progress.update(1)
        finally:
            progress.close()
            if writer is not None:
                writer.release()
    finally:
        capture.release()
    if frames == 0:
        raise OSError(f"no frame could be read from the video {source}")
    tqdm.write(f"{source.name}: {frames} frames of {width}x{height}, {summarize(list(counts.elements()))}, "
               f"{seconds / frames:.3f} s/frame -> {target}")
    return {"input": str(source), "output": str(target), "kind": "video", "frames": frames, "size": (width, height),
            "fps": fps, "detections": per_frame, "seconds": seconds}


@releasing_run_folders
def main(argv: list[str] | None = None) -> list[dict]:
    """Runs the demo; returns one record per input file: {"input", "output" (the annotated file), "kind": "image",
    "detections" (those drawn: boxes, scores, labels, class_names), "seconds" (the model's)} or {"input", "output",
    "kind": "video", "frames", "size" (width, height), "fps", "detections" (one dict as above per frame), "seconds"}."""
    parser = default_argument_parser(
        __doc__.splitlines()[0], output_help="folder of the annotated files and log.txt (default: <OUTPUT_DIR>/demo)"
    )
    parser.add_argument("--ckpt", default=None, help="checkpoint (default: MODEL.WEIGHTS, else OUTPUT_DIR's newest)")
    parser.add_argument("--input", required=True, help="an image, a video, a folder or a glob pattern (quoted)")
    parser.add_argument(
        "--score-thr", type=float, default=0.5, metavar="S",
        help="draw detections scoring at least S (default 0.5); lowers MODEL.ROI_HEADS.SCORE_THRESH_TEST to S",
    )
    parser.add_argument("--show", action="store_true", help="also show each result in a window (needs a GUI)")
    parser.epilog += "; --output is the folder of the annotated files and log.txt (default: <OUTPUT_DIR>/demo)"
    args = parse_args(parser, argv)
    if not 0.0 <= args.score_thr <= 1.0:
        raise ValueError(f"--score-thr must be in [0, 1], got {args.score_thr}")
    files, base = collect_inputs(args.input)  # before anything is written: a bad --input names itself first
    run_dir = load_config(args.cfg, list(args.opts)).OUTPUT_DIR  # the training's folder, where --ckpt defaults to
    if args.output is None:
        args.output = str(Path(run_dir) / "demo")
    output_dir = Path(args.output)
    targets = [output_path(source, base, output_dir) for source in files]
    check_paths(spec=args.input, files=files, base=base, output_dir=output_dir, targets=targets, cfg=args.cfg,
                ckpt=args.ckpt)

    cfg = setup(args, config_file=None)  # logs to --output/log.txt
    overrides = [f"OUTPUT_DIR={json.dumps(str(run_dir))}"]  # without --ckpt, the model loads its newest checkpoint
    if cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST > args.score_thr:
        logger.info("MODEL.ROI_HEADS.SCORE_THRESH_TEST lowered from %g to --score-thr %g",
                    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST, args.score_thr)
        overrides.append(f"MODEL.ROI_HEADS.SCORE_THRESH_TEST={args.score_thr!r}")
    predictor = build_predictor(merge_overrides(cfg, overrides), args.ckpt)

    window = Window(False)
    if args.show:
        problem = display_problem()
        if problem:
            logger.warning("--show: %s; writing the annotated files to %s only", problem, output_dir)
        window = Window(problem is None)

    records = []
    try:
        pairs = list(zip(files, targets, strict=True))
        progress = tqdm(pairs, desc="demo", unit="file") if len(pairs) > 1 else pairs
        for source, target in progress:
            records.append(annotate_file(predictor, source, target, args.score_thr, window))
    finally:
        window.close()
    logger.info("Wrote %d annotated file(s) to %s", len(records), output_dir)
    return records


if __name__ == "__main__":
    sys.exit(run_tool(main, sys.argv[1:]))
