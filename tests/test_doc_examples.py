"""The examples of README.md, docs/ and datasets/README.md run as written.

Every fenced block is extracted from the Markdown. Each Python block runs unchanged, as a script file in a sandbox
folder (`configs/` and `tools/` linked from the checkout, tiny data made by the test), in the order of the pages.
Each shell command (a line starting with a program, or after a `$ ` prompt; `\\`-continued lines joined) must match
one rule of `COMMANDS`, a reviewed list: either it runs, exactly as written with the tiny overrides of its tool
appended (`KEY=VALUE` arguments come last and win), or the rule says why it cannot run here (a download, a GPU, a
synopsis with placeholders, a transcript of a refusal whose message a named test asserts). A new command in the
docs fails `test_every_command_is_reviewed` until it is added to the list; a rule that no longer matches any
command fails it too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from detectron_res.data.datasets import generate_loc_shapes, generate_shapes

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "datasets" / "README.md"]
PROGRAMS = ("python", "torchrun", "pip", "PYTHONPATH=", "tensorboard", "rm", "mutmut", "ls")

RUN = "run"
DOWNLOAD = "needs a download: "
# (pattern searched in the command, what to do) in order; the first match decides
COMMANDS: list[tuple[str, str]] = [
    # the newcomer's path, run here in a sandbox, in page order
    (r"^pip install -e \. && python tools/train_det\.py --cfg configs/shapes_r18\.yaml --output output/shapes$", RUN),
    (r"^python tools/demo\.py --cfg output/shapes/config\.yaml --ckpt output/shapes/model_final\.pth --input photos/",
     RUN),
    (r"^python tools/plot_log\.py output/shapes$", RUN),
    (r"^python tools/report\.py output/shapes$", RUN),
    (r"^python tools/export\.py --cfg output/shapes/config\.yaml --ckpt output/shapes/model_final\.pth --format onnx",
     RUN),
    (r"^python train_parts\.py", RUN),
    (r"^python tools/train_loc\.py --cfg configs/loc_shapes_r18\.yaml$", RUN),
    (r"^python tools/localize\.py --cfg configs/loc_shapes_r18\.yaml --images datasets/loc_shapes/val --out "
     r"submission\.txt --csv-out submission\.csv --gt datasets/loc_shapes/LOC_val_solution\.csv$", RUN),
    # not runnable here
    (r"loc_shapes", "localization.md's quick start (run above) with other file names (results.md's record)"),
    (r'^pip install -e "\.\[test\]" && python -m pytest', "the test suite itself"),
    (r"^pip install", "installs packages (network)"),
    (r"coco_r101|coco_r50\.yaml --output output/coco128|instances_val2017\.json|coco128|\$C/|"
     r"report\.py output/coco_r50",
     DOWNLOAD + "COCO (or ../shared/data's coco128 sample)"),
    (r"d2_r50_c4|model_final_f97cb7|R-50\.pkl|R-101\.pkl|\$D2", DOWNLOAD + "detectron2 or MSRA weights"),
    (r"ilsvrc_loc|LOC_val_solution|\$S/", DOWNLOAD + "ImageNet CLS-LOC"),
    (r"voc_r50|VOCdevkit|--voc-root VOC2007|voc2012_sample", DOWNLOAD + "PASCAL VOC"),
    (r"coco_r50\.yaml", DOWNLOAD + "COCO and torchvision's ResNet-50 weights; costs hours on a CPU"),
    (r"output/mine|data/mine", "needs your own data (data/mine); the same path runs as train_parts.py above"),
    (r"CONFIG|OUTPUT_DIR \[|A\.yaml|\[--", "a synopsis with placeholders, not a command"),
    (r"^python tools/gpu_check\.py --output", "needs a GPU (its --dry-run is run by tests/tools/test_gpu_check.py)"),
    (r"--output s128 DATASETS\.TRAIN=\[\$R/", "the ensemble comparison's models of docs/results.md (350 iterations)"),
    (r"^torchrun|--num-gpus", "several processes: tests/engine/test_distributed.py runs them at tiny size"),
    (r"^mutmut|^rm -rf mutants", "the mutation run of docs/testing.md (hours)"),
    (r"^tensorboard|^python -c|^ls /tmp", "part of a transcript whose output the page shows"),
    (r"/tmp/qs/|/tmp/shapes_run|/tmp/shapes_report_run|/tmp/broken|/tmp/nothing|/tmp/exp/|run/model_final|"
     r"--output photos|--input \"photos/\*\.jpg\"|run --out|instances_val\.json --dets|link_to_r50|"
     r"^python tools/export\.py \.\.\.",
     "a transcript of docs/tools.md; its messages are asserted by tests/tools (test_demo, test_plot_log, "
     "test_tool_paths, test_export, test_report_tools; README's report line runs after the quick start)"),
    (r"shapes_r18\.yaml --output output/shapes_(single|ddp)", "the 1500-iteration schedule of docs/results.md"),
]

TINY_SHAPES = 64


def code_blocks() -> list[tuple[str, str, str]]:
    """(page relative to the checkout, language, text) of every fenced block, in page order."""
    blocks = []
    for page in PAGES:
        for language, text in re.findall(r"^```(\w*)\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M):
            blocks.append((str(page.relative_to(REPO)), language, text))
    return blocks


def commands(text: str) -> list[str]:
    """The shell commands of a block: `\\`-continued lines joined, a `$ ` prompt removed, a `# comment` cut."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        elif not line.startswith(PROGRAMS):
            continue
        line = re.sub(r"\s+#.*$", "", re.sub(r"\s+", " ", line)).strip()
        found.append(line)
    return found


def all_commands() -> list[tuple[str, str]]:
    return [(page, command) for page, language, text in code_blocks() if language != "python"
            for command in commands(text) if language != "bash"]


def decision(command: str) -> str | None:
    for pattern, what in COMMANDS:
        if re.search(pattern, command):
            return what
    return None


def test_every_command_is_reviewed():
    unreviewed = [f"{page}: {command}" for page, command in all_commands() if decision(command) is None]
    assert not unreviewed, "commands in the docs without a rule in COMMANDS:\n" + "\n".join(unreviewed)
    used = {next(pattern for pattern, _ in COMMANDS if re.search(pattern, command)) for _, command in all_commands()}
    assert [pattern for pattern, _ in COMMANDS if pattern not in used] == []  # no stale rule
    python_blocks = [page for page, language, _ in code_blocks() if language == "python"]
    # each page's Python is run: docs/evaluation.md's by tests/evaluation/test_errors.py, the others' below
    assert python_blocks == ["README.md", "docs/evaluation.md", "docs/own_data.md", "docs/tools.md", "docs/training.md"]


def test_commands_splits_blocks_as_a_shell_reads_them():
    block = "$ python tools/a.py --x 1 \\\n    --y 2   # why\nsome output line\npip install -e . && python b.py\n"
    assert commands(block) == ["python tools/a.py --x 1 --y 2", "pip install -e . && python b.py"]
    assert decision("python tools/train_det.py --cfg configs/coco_r101.yaml --resume").startswith(DOWNLOAD)
    assert decision("python tools/new_tool.py") is None


# ---- running them ----------------------------------------------------------------------------------------------

def tiny_train_overrides(data: Path) -> list[str]:
    """Two iterations at 64 pixels on 4 generated images, evaluated on 2: the quick start in seconds."""
    return [
        f"DATASETS.TRAIN=[{data}/annotations/instances_train.json:{data}/train]",
        f"DATASETS.TEST=[{data}/annotations/instances_val.json:{data}/val]",
        f"INPUT.MIN_SIZE_TRAIN=[{TINY_SHAPES}]", f"INPUT.MAX_SIZE_TRAIN={TINY_SHAPES}",
        f"INPUT.MIN_SIZE_TEST={TINY_SHAPES}", f"INPUT.MAX_SIZE_TEST={TINY_SHAPES}", "MODEL.DEVICE=cpu",
        "SOLVER.IMS_PER_BATCH=2", "SOLVER.MAX_ITER=2", "SOLVER.STEPS=[]", "SOLVER.WARMUP_ITERS=0",
        "SOLVER.CHECKPOINT_PERIOD=100", "LOG_PERIOD=1", "MODEL.RPN.POST_NMS_TOPK_TEST=20",
    ]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """A folder as a user's checkout looks to the examples: configs/ and tools/ of this checkout, tiny shapes data
    (tiny/), two images for the demo (photos/) and the Predictor (image.png, image.jpg), and the CSV data set of
    docs/own_data.md's script (datasets/parts/)."""
    root = tmp_path_factory.mktemp("doc_examples")
    for name in ("configs", "tools"):
        (root / name).symlink_to(REPO / name)
    generate_shapes(root / "tiny", num_train=4, num_val=2, image_size=TINY_SHAPES, seed=5)
    (root / "photos").mkdir()
    for i, image in enumerate(sorted((root / "tiny" / "val").iterdir())):
        shutil.copy(image, root / "photos" / f"photo{i}.png")
    shutil.copy(root / "photos" / "photo0.png", root / "image.png")
    cv2.imwrite(str(root / "image.jpg"), cv2.imread(str(root / "image.png")))
    parts = root / "datasets" / "parts"
    (parts / "images").mkdir(parents=True)
    rows = ["file_name,height,width,x1,y1,x2,y2,label"]
    for i in range(2):
        image = np.full((64, 80, 3), 40, np.uint8)
        image[10 + i:40, 12:50] = (200, 60, 60)
        cv2.imwrite(str(parts / "images" / f"p{i}.png"), image)
        rows += [f"p{i}.png,64,80,12,{10 + i},50,40,0", f"p{i}.png,64,80,55,20,75,60,1"]
    (parts / "boxes.csv").write_text("\n".join(rows) + "\n")
    return root


def run(sandbox: Path, argv: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DETECTRON_RES_DATASETS", None)
    done = subprocess.run(argv, cwd=sandbox, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv} failed with status {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def run_command(sandbox: Path, command: str, extra: list[str] = ()) -> subprocess.CompletedProcess:
    """`command` as written (a leading `pip install ... &&` left out: the checkout is installed), `extra` appended."""
    command = re.sub(r"^pip install [^&]*&& ", "", command)
    argv = shlex.split(command)
    assert argv[0] == "python"
    return run(sandbox, [sys.executable, *argv[1:], *extra])


def page_command(page: str, pattern: str) -> str:
    """The one command of `page` that matches `pattern`."""
    found = [c for p, c in all_commands() if p == page and re.search(pattern, c)]
    assert len(found) == 1, (page, pattern, found)
    return found[0]


def python_block(page: str) -> str:
    [text] = [text for p, language, text in code_blocks() if p == page and language == "python"]
    return text


def run_python_block(sandbox: Path, page: str, name: str, args: list[str] = ()) -> subprocess.CompletedProcess:
    script = sandbox / name
    script.write_text(python_block(page))
    return run(sandbox, [sys.executable, str(script), *args])


@pytest.fixture(scope="module")
def quick_start(sandbox) -> Path:
    """README's quick start, as written at tiny size: trains and evaluates output/shapes."""
    run_command(sandbox, page_command("README.md", r"^pip install -e \. &&"), tiny_train_overrides(sandbox / "tiny"))
    return sandbox / "output" / "shapes"


def test_predictor_examples_of_readme_and_training_md(sandbox, quick_start):
    """After the quick start, README's and training.md's Predictor examples run on its model as written."""
    assert {"config.yaml", "model_final.pth", "metrics.json"} <= {p.name for p in quick_start.iterdir()}
    for page in ("README.md", "docs/training.md"):
        run_python_block(sandbox, page, f"example_{Path(page).stem}.py")


def test_demo_plot_log_and_report_lines_of_readme(sandbox, quick_start):
    run_command(sandbox, page_command("README.md", r"^python tools/demo\.py"))
    assert sorted(p.name for p in (sandbox / "drawn").glob("*.png")) == ["photo0.png", "photo1.png"]
    run_command(sandbox, page_command("README.md", r"^python tools/plot_log\.py"))
    assert (quick_start / "plots" / "losses.png").is_file()
    run_command(sandbox, page_command("README.md", r"^python tools/report\.py"))
    assert json.loads((quick_start / "report" / "errors.json").read_text())["bbox"]["counts"]["gt"] > 0
    assert "<table id=class-table" in (quick_start / "report" / "index.html").read_text()


def test_export_line_of_readme_and_the_example_of_tools_md(sandbox, quick_start):
    """README's export line writes m.onnx; docs/tools.md's Python example then reads it (as shapes_r18.onnx) and a
    TorchScript export of the same model (shapes_r18.ts), as the page's transcript makes them, and image.png."""
    run_command(sandbox, page_command("README.md", r"^python tools/export\.py"))
    shutil.copy(sandbox / "m.onnx", sandbox / "shapes_r18.onnx")
    run(sandbox, [sys.executable, "tools/export.py", "--cfg", "output/shapes/config.yaml", "--ckpt",
                  "output/shapes/model_final.pth", "--format", "torchscript", "--output", "shapes_r18.ts"])
    run_python_block(sandbox, "docs/tools.md", "example_tools.py")


def test_own_data_script(sandbox):
    """docs/own_data.md's script, as written, trains on its CSV data set (ResNet-50 weights and the COCO schedule
    replaced by tiny overrides on the script's command line, which it passes on); then resumes through the
    script as the page says."""
    tiny = ["MODEL.BACKBONE.WEIGHTS=", "MODEL.BACKBONE.DEPTH=18", "MODEL.BACKBONE.WIDTH=16", "MODEL.BACKBONE.NORM=BN",
            "MODEL.BACKBONE.FREEZE_AT=0", "INPUT.MIN_SIZE_TRAIN=[64]", "INPUT.MAX_SIZE_TRAIN=80",
            "SOLVER.IMS_PER_BATCH=2", "SOLVER.MAX_ITER=1", "SOLVER.STEPS=[]", "SOLVER.WARMUP_ITERS=0",
            "MODEL.DEVICE=cpu", "DATALOADER.NUM_WORKERS=1", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE=16"]
    run_python_block(sandbox, "docs/own_data.md", "train_parts.py", tiny)
    assert (sandbox / "output/parts/model_final.pth").is_file()
    resume = page_command("docs/own_data.md", r"^python train_parts\.py --resume")
    done = run_command(sandbox, resume, [*tiny, "SOLVER.MAX_ITER=2", "DATALOADER.NUM_WORKERS=0"])
    assert "Resum" in done.stdout + done.stderr
    iterations = [json.loads(line)["iteration"] for line in (sandbox / "output/parts/metrics.jsonl").open()]
    assert iterations == [1, 2]  # LOG_PERIOD 20: each run's last iteration; the second continued the first


def test_localization_quick_start(sandbox):
    """docs/localization.md's quick start, as written with tiny overrides: both stages train on a small loc_shapes
    set generated where the built-in one would be, then localize.py writes and scores the val submission."""
    root = sandbox / "datasets" / "loc_shapes"
    generate_loc_shapes(root, num_train=10, num_val=4, seed=3)
    common = ["MODEL.DEVICE=cpu", "DATALOADER.NUM_WORKERS=0", "MODEL.RPN.POST_NMS_TOPK_TEST=4"]
    train_loc = page_command("docs/localization.md", r"^python tools/train_loc\.py --cfg configs/loc_shapes")
    run_command(sandbox, train_loc, [
        *common, f"DATASETS.TRAIN=[{root}/LOC_train_solution.csv:{root}/train]",
        f"DATASETS.TEST=[{root}/LOC_val_solution.csv:{root}/val]", "SOLVER.IMS_PER_BATCH=4", "SOLVER.MAX_ITER=2",
        "SOLVER.STEPS=[]", "LOC.RCNN.IMS_PER_BATCH=4", "LOC.RCNN.MAX_ITER=2", "LOC.RCNN.STEPS=[]"])
    assert (sandbox / "output/loc_shapes_r18/rcnn/model_final.pth").is_file()
    localize = page_command("docs/localization.md", r"^python tools/localize\.py --cfg configs/loc_shapes")
    done = run_command(sandbox, localize, common)
    assert "submission for 4 images written to submission.txt" in done.stdout
    assert len((sandbox / "submission.txt").read_text().splitlines()) == 4
    assert (sandbox / "submission.images.txt").is_file() and (sandbox / "submission.synsets.txt").is_file()
