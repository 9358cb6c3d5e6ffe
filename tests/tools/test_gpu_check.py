"""tools/gpu_check.py: its dry run (every step on the CPU in place of CUDA, the CPU against itself, so that every
comparison is exact), the json and Markdown it writes after each step, the time budget, a failing step among
others, an interruption, and the comparisons' arithmetic on hand-made boxes."""

from __future__ import annotations

import json
import math
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import load_tool
from detectron_res.engine.runner import run_tool
from detectron_res.utils.signals import Terminated

gpu_check = load_tool("gpu_check")

STEP_NAMES = ["cuda_vs_cpu", "train_step", "syncbn", "cuda_tests", "benchmark", "export"]

MARKED_TESTS = textwrap.dedent(
    """
    import pytest

    @pytest.mark.cuda
    def test_marked_and_passing():
        assert 1 + 1 == 2

    @pytest.mark.cuda
    def test_marked_and_skipped():
        pytest.skip("as a test without CUDA skips")

    def test_not_marked():
        raise AssertionError("pytest -m cuda must not run this")
    """
)


def write_marked_tests(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test_marked.py").write_text(MARKED_TESTS)
    (folder / "test_unmarked.py").write_text("def test_never_collected():\n    raise AssertionError\n")
    return folder


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of every step (the cuda tests: a small folder of marked tests, not the suite)."""
    root = tmp_path_factory.mktemp("gpu_check")
    tests = write_marked_tests(root / "marked_tests")
    threads = torch.get_num_threads()
    start = time.monotonic()
    report = gpu_check.main(["--dry-run", "--output", str(root / "out"), "--tests", str(tests)])
    seconds = time.monotonic() - start
    assert torch.get_num_threads() == threads  # the dry run's single thread is given back
    written = json.loads((root / "out" / "gpu_check.json").read_text())
    markdown = (root / "out" / "gpu_check.md").read_text()
    return {"report": report, "json": written, "markdown": markdown, "seconds": seconds, "root": root}


def steps_by_name(report: dict) -> dict[str, dict]:
    return {step["name"]: step for step in report["steps"]}


def test_the_dry_run_runs_every_step_and_writes_its_json(dry_run):
    report = dry_run["json"]
    assert report == json.loads(json.dumps(dry_run["report"]))  # what main returned is what is on disk
    assert report["dry_run"] is True and report["finished"] is True
    assert report["device"].startswith("cpu in place of cuda (dry run)")
    assert report["torch"] == torch.__version__ and report["budget_s"] == 480.0
    assert [step["name"] for step in report["steps"]] == STEP_NAMES
    assert [step["status"] for step in report["steps"]] == ["ok"] * 6
    assert all(step["seconds"] > 0 for step in report["steps"])
    assert report["elapsed_s"] >= sum(step["seconds"] for step in report["steps"]) - 0.5
    assert dry_run["seconds"] < 180


def test_the_cpu_against_itself_is_exact(dry_run):
    step = steps_by_name(dry_run["json"])["cuda_vs_cpu"]
    assert step["image"] == [64, 96] and step["config"] == "configs/shapes_r18.yaml"
    assert step["features"]["rel_error"] == 0.0 and step["features"]["max_abs_diff"] == 0.0
    assert step["features"]["shape"] == [1, 64, 4, 6]  # res4 of a width-16 ResNet-18 (16/32/64/128), 64 x 96 / 16
    assert step["features_default_precision"]["rel_error"] == 0.0
    proposals = step["proposals"]
    assert proposals["count"] == proposals["reference_count"] == 50  # the dry run's POST_NMS_TOPK_TEST
    assert proposals["topk"] == 50 and proposals["topk_overlap"] == 1.0 and proposals["max_box_diff"] == 0.0
    for name in ("detections", "detections_same_proposals"):
        detections = step[name]
        assert detections["count"] == detections["reference_count"] > 0  # the calibrated heads detect something
        assert detections["matched"] == 1.0
        assert detections["max_box_diff"] == 0.0 and detections["max_score_diff"] == 0.0
        assert detections["box_tol"] == 0.05 and detections["min_matched"] == 0.95


def test_training_steps_in_three_precisions(dry_run):
    step = steps_by_name(dry_run["json"])["train_step"]
    assert step["input"] == [2, 3, 64, 96] and step["iterations"] == 3
    precisions = step["precisions"]
    assert list(precisions) == ["float32", "bfloat16", "float16"]
    assert [precisions[name]["autocast"] for name in precisions] == [None, "bfloat16", "bfloat16"]
    for name, entry in precisions.items():
        assert len(entry["iterations"]) == (6 if name == "float16" else 3)  # float16: room for skipped steps
        assert all(iteration["step_taken"] for iteration in entry["iterations"])
        assert entry["last_losses"] == entry["iterations"][-1]["losses"]
        losses = entry["last_losses"]
        assert set(losses) == {"total_loss", "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
        assert all(math.isfinite(value) for value in losses.values())
        assert losses["total_loss"] == pytest.approx(sum(v for k, v in losses.items() if k != "total_loss"), rel=1e-5)
        assert entry["peak_memory_mb"] is None  # CUDA's allocator only
    assert "grad_scaler" not in precisions["float32"] and "grad_scaler" not in precisions["bfloat16"]
    scaler = precisions["float16"]["grad_scaler"]
    assert scaler["initial_scale"] == scaler["final_scale"] == 65536.0  # no overflow: no step skipped, no halving
    assert scaler["steps_taken"] == 6
    assert [iteration["scale"] for iteration in precisions["float16"]["iterations"]] == [65536.0] * 6
    assert "amp_settings refuses float16 on the CPU" in scaler["note"]


def test_steps_the_gradient_scaler_skips_are_seen(tmp_path, monkeypatch):
    """Infinite gradients in the scaled steps: the scaler skips each of them and halves its scale."""
    train_iterations = gpu_check.train_iterations

    def overflowing(model, cfg, inputs, *, grad_scaler, **kwargs):
        if grad_scaler is not None:
            model.roi_heads.predictor.cls_score.weight.register_hook(lambda grad: grad * math.inf)
        return train_iterations(model, cfg, inputs, grad_scaler=grad_scaler, **kwargs)

    monkeypatch.setattr(gpu_check, "train_iterations", overflowing)
    with pytest.raises(RuntimeError, match=r"steps failed \(train_step\)"):
        gpu_check.main(["--dry-run", "--output", str(tmp_path), "--steps", "train_step"])
    (step,) = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert step["error"] == "float16: the gradient scaler skipped all 6 steps (scale 65536 -> 1024)"
    float16 = step["precisions"]["float16"]
    assert [i["step_taken"] for i in float16["iterations"]] == [False] * 6
    assert [i["scale"] for i in float16["iterations"]] == [32768.0, 16384.0, 8192.0, 4096.0, 2048.0, 1024.0]
    assert float16["grad_scaler"]["steps_taken"] == 0 and float16["grad_scaler"]["final_scale"] == 1024.0
    assert all(i["step_taken"] for i in step["precisions"]["bfloat16"]["iterations"])  # the others went on


def test_syncbn_in_a_one_process_group(dry_run):
    step = steps_by_name(dry_run["json"])["syncbn"]
    assert step["backend"] == "gloo" and step["world_size"] == 1
    # a width-16 ResNet-18: the stem's norm, 2 per basic block (2 blocks in each of res2..res5) and the downsample
    # norms of res3, res4 and res5: 1 + 16 + 3
    assert step["syncbn_layers"] == 20
    assert step["converted"] == {"torch_syncbn_layers": 20, "same_state": True}
    assert step["norm_in_step"].startswith("detectron_res SyncBatchNorm")
    assert step["loss_rel_error"] == 0.0 and step["grad_rel_error"] == 0.0 and step["running_stats_rel_error"] == 0.0
    assert step["gradients_missing"] == [] and step["gradients_compared"] > 40
    assert step["fused_kernel"].startswith("not run")
    assert not torch.distributed.is_initialized()  # the group is gone


def test_the_cuda_tests_are_run_and_counted(dry_run):
    step = steps_by_name(dry_run["json"])["cuda_tests"]
    assert [Path(f).name for f in step["files"]] == ["test_marked.py"]  # the file without `mark.cuda` is not read
    assert (step["passed"], step["failed"], step["errors"], step["skipped"]) == (1, 0, 0, 1)
    assert step["exit_status"] == 0
    log = Path(step["log"]).read_text()
    assert "1 passed, 1 skipped, 1 deselected" in log


def test_the_benchmark_entries(dry_run):
    step = steps_by_name(dry_run["json"])["benchmark"]
    entries = step["entries"]
    assert [e["entry"] for e in entries] == [
        "R50-C4 infer float32", "R50-C4 infer bfloat16", "R101-C4 infer float32", "R101-C4 infer bfloat16",
        "R50-C4 train float32", "R50-C4 train float16", "R101-C4 train float32", "R101-C4 train float16",
    ]  # fmt: skip
    for entry in entries:
        assert entry["status"] == "ok"
        images = 1 if entry["mode"] == "infer" else 2
        assert entry["input"] == [images, 3, 64, 85]  # a 4:3 image at the test size
        assert len(entry["seconds"]) == entry["runs"] == 2
        assert entry["median_s"] == pytest.approx(sum(entry["seconds"]) / 2)  # the median of two
        assert entry["images_per_s"] == pytest.approx(images / entry["median_s"])
        assert entry["peak_memory_mb"] is None
    assert [e["autocast"] for e in entries] == [None, "bfloat16"] * 2 + [None, "bfloat16"] * 2


def test_the_export_on_the_checked_device(dry_run):
    step = steps_by_name(dry_run["json"])["export"]
    assert step["format"] == "torchscript" and step["device"] == "cpu"
    assert [c["image_size"] for c in step["checks"]] == [[64, 96], [49, 73]]
    for check in step["checks"]:
        assert check["same_labels"] and check["reference_detections"] == check["exported_detections"] > 0
        assert check["max_box_diff"] <= 0.01 and check["max_score_diff"] <= 1e-4
        assert check["output_device"] == "cpu"


def test_the_markdown_report_has_a_row_per_step(dry_run):
    lines = dry_run["markdown"].splitlines()
    assert lines[0] == "# GPU check (dry run on the CPU)"
    rows = [line for line in lines if line.startswith("| ") and " | ok | " in line]
    assert [row.split(" | ")[0][2:] for row in rows] == STEP_NAMES
    assert sum(line.startswith("| R50-C4") or line.startswith("| R101-C4") for line in lines) == 8


def test_a_failing_step_is_recorded_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    def boom(ctx, record):
        record["measured"] = 1.5
        record["on_disk"] = [s["name"] for s in json.loads((ctx.output / "gpu_check.json").read_text())["steps"]]
        raise ValueError("the kernel\nexploded")

    monkeypatch.setitem(gpu_check.STEPS, "train_step", gpu_check.Step("b. failing", boom, 0, 0))
    status = run_tool(gpu_check.main, ["--dry-run", "--output", str(tmp_path), "--steps",
                                       "cuda_vs_cpu,train_step,syncbn"])  # fmt: skip
    assert status == 1
    assert capsys.readouterr().err.strip().endswith(
        f"error: 1 of 3 steps failed (train_step): see {tmp_path / 'gpu_check.md'}")
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(s["name"], s["status"]) for s in report["steps"]] == [
        ("cuda_vs_cpu", "ok"), ("train_step", "failed"), ("syncbn", "ok")]
    failed = report["steps"][1]
    assert failed["error"] == "ValueError: the kernel exploded" and failed["measured"] == 1.5
    assert failed["on_disk"] == ["cuda_vs_cpu"]  # the json was written after the first step
    assert report["finished"] is True
    assert "| train_step | failed |" in (tmp_path / "gpu_check.md").read_text()


def test_a_check_outside_its_tolerance_fails_with_the_values(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "FEATURES_REL_TOL", -1.0)  # no difference can be below it
    with pytest.raises(RuntimeError, match=r"1 of 1 steps failed \(cuda_vs_cpu\)"):
        gpu_check.main(["--dry-run", "--output", str(tmp_path), "--steps", "cuda_vs_cpu"])
    (step,) = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert step["status"] == "failed" and step["error"] == "res4 relative error 0 > -1.0"
    assert step["features"]["rel_error"] == 0.0 and step["detections"]["matched"] == 1.0  # measured values kept


def test_steps_that_do_not_fit_the_budget_are_skipped(tmp_path):
    report = gpu_check.main(["--dry-run", "--output", str(tmp_path), "--budget-s", "0"])
    assert [s["status"] for s in report["steps"]] == ["skipped"] * 6
    assert report["steps"][0]["reason"] == "would not fit the time budget: it takes about 3 s, 0 s left"
    assert json.loads((tmp_path / "gpu_check.json").read_text())["steps"] == report["steps"]


def test_a_step_running_past_the_budget_is_stopped(tmp_path, monkeypatch):
    def slow(ctx, record):
        record["first_value"] = 7
        time.sleep(30)
        record["never"] = True

    monkeypatch.setitem(gpu_check.STEPS, "cuda_vs_cpu", gpu_check.Step("a. slow", slow, 0, 0))
    start = time.monotonic()
    report = gpu_check.main(["--dry-run", "--output", str(tmp_path), "--budget-s", "1", "--steps",
                             "cuda_vs_cpu,syncbn"])  # fmt: skip
    assert time.monotonic() - start < 10
    stopped, later = report["steps"]
    assert stopped["status"] == "skipped" and stopped["first_value"] == 7 and "never" not in stopped
    assert stopped["reason"].startswith("stopped by the time budget (1 s) after ")
    assert 0.9 < stopped["seconds"] < 5
    assert later["status"] == "skipped" and later["reason"].startswith("would not fit the time budget")
    assert json.loads((tmp_path / "gpu_check.json").read_text())["steps"] == report["steps"]


def test_sigterm_writes_what_was_measured_then_exits_143(tmp_path, monkeypatch, capsys):
    def terminated(ctx, record):
        record["half_done"] = True
        raise Terminated("SIGTERM")

    monkeypatch.setitem(gpu_check.STEPS, "syncbn", gpu_check.Step("c. terminated", terminated, 0, 0))
    status = run_tool(gpu_check.main, ["--dry-run", "--output", str(tmp_path), "--steps",
                                       "cuda_vs_cpu,syncbn,export"])  # fmt: skip
    assert status == 143
    assert capsys.readouterr().err.strip().endswith("interrupted by SIGTERM")
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["finished"] is False
    assert [(s["name"], s["status"]) for s in report["steps"]] == [
        ("cuda_vs_cpu", "ok"), ("syncbn", "skipped"), ("export", "skipped")]
    assert report["steps"][1]["reason"] == "interrupted by SIGTERM" and report["steps"][1]["half_done"]
    assert report["steps"][2]["reason"] == "not run: the check was interrupted"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_and_without_dry_run_it_stops_with_one_line(tmp_path, capsys):
    assert run_tool(gpu_check.main, ["--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert ": error: CUDA is not available (torch " in err and "or add --dry-run" in err
    assert not (tmp_path / "out").exists()


def test_bad_arguments_are_refused_in_one_line(tmp_path, capsys):
    tests = write_marked_tests(tmp_path / "marked")
    argv = ["--dry-run", "--tests", str(tests)]
    assert run_tool(gpu_check.main, [*argv, "--output", str(tests / "out")]) == 1
    assert f"lies inside the input --tests {tests}" in capsys.readouterr().err
    assert run_tool(gpu_check.main, [*argv, "--output", str(tmp_path / "o"), "--steps", "export,speed"]) == 1
    err = capsys.readouterr().err
    assert "--steps 'export,speed': unknown step speed; the steps are cuda_vs_cpu,train_step," in err
    assert run_tool(gpu_check.main, [*argv, "--output", str(tmp_path / "o"), "--budget-s", "-1"]) == 1
    assert "--budget-s must be a number of seconds >= 0, got -1.0" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert run_tool(gpu_check.main, [*argv, "--output", str(tmp_path / "file")]) == 1
    assert "--output" in capsys.readouterr().err


def test_the_repository_marks_its_cuda_only_test():
    files = gpu_check.marked_test_files([str(gpu_check.REPO / "tests")])
    assert gpu_check.REPO / "tests/engine/test_distributed.py" in files


# ------------------------------------------------------------------------------------------- the comparisons
def test_relative_error_by_hand():
    reference = torch.tensor([0.0, 3.0, 4.0])  # norm 5
    assert gpu_check.relative_error(torch.tensor([1.0, 3.0, 4.0]), reference) == pytest.approx(1 / 5)
    assert gpu_check.relative_error(torch.tensor([0.0, 3.0, 4.0]), reference) == 0.0
    assert gpu_check.relative_error(torch.tensor([0.5, 0.0]), torch.zeros(2)) == 0.5  # no norm: the difference


def test_proposal_overlap_by_hand():
    reference = torch.tensor([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]], dtype=torch.float32)
    proposals = torch.tensor([[20, 20, 40, 40.1], [0, 0, 10, 10], [55, 55, 65, 65]], dtype=torch.float32)
    result = gpu_check.proposal_overlap(reference, proposals, topk=3)
    # box 2 against its match: IoU 400 / 402 = 0.995; box 3's best IoU is 25 / 175: 2 of 3 matched
    assert result == {"reference_count": 3, "count": 3, "topk": 3, "topk_overlap": pytest.approx(2 / 3),
                      "max_box_diff": pytest.approx(0.1, abs=1e-5)}  # fmt: skip
    assert gpu_check.proposal_overlap(reference, proposals, topk=2)["topk_overlap"] == 1.0  # each other's top 2
    # only among the other's top-k: box 1 matches the second proposal, which is outside the top-1
    assert gpu_check.proposal_overlap(reference, proposals, topk=1)["topk_overlap"] == 0.0


def test_detection_agreement_by_hand():
    reference = {"boxes": torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [30, 30, 50, 50.0]]),
                 "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([1, 2, 1])}  # fmt: skip
    detections = {"boxes": torch.tensor([[30, 30, 50, 50.04], [0, 0, 10, 10.0], [0, 0, 10, 10.0], [80, 80, 90, 90.0]]),
                  "scores": torch.tensor([0.7002, 0.9, 0.5, 0.4]), "labels": torch.tensor([1, 1, 3, 1])}  # fmt: skip
    result = gpu_check.detection_agreement(reference, detections)
    # the first and third match (same class, IoU 400 / 400.8); the second has no box of class 2: 2 pairs of 4
    assert result == {"reference_count": 3, "count": 4, "matched": 0.5, "max_box_diff": pytest.approx(0.04, abs=1e-5),
                      "max_score_diff": pytest.approx(0.0002, abs=1e-6)}  # fmt: skip
    problems = gpu_check.detection_problems("detections", result)
    assert problems == ["detections: 0.500 of the detections matched (< 0.95)"]
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    assert gpu_check.detection_problems("d", gpu_check.detection_agreement(empty, empty)) == [
        "d: the CPU found no detection, nothing was compared"]


def test_calibrated_heads_spread_their_outputs_around_zero():
    """After `calibrate_heads`, the class logits of the RoIs it saw average 0 (the bias cancels their inputs' mean)
    and spread with a standard deviation near its target 2; so do the RPN's objectness logits around 0 (target 2)."""
    ctx = gpu_check.Context(device=torch.device("cpu"), dry_run=True, output=Path("."), budget=gpu_check.Budget(1),
                            tests=[])  # fmt: skip
    cfg = ctx.config("r50")
    model = gpu_check.random_detector(cfg, ctx.cpu, seed=0).eval()
    inputs = gpu_check.synthetic_inputs(num_images=1, height=64, width=96, seed=0)
    before = model.roi_heads.predictor.cls_score.weight.clone()
    gpu_check.calibrate_heads(model, inputs, seed=0)
    assert not torch.equal(before, model.roi_heads.predictor.cls_score.weight)
    seen = {}

    def keep(name):
        def hook(module, args, output):
            seen[name] = output[0]  # logits of (logits, deltas); objectness of (objectness, deltas)

        return hook

    model.roi_heads.predictor.register_forward_hook(keep("logits"))
    model.rpn.head.register_forward_hook(keep("objectness"))
    with torch.no_grad():
        prepared = model.prepare(inputs)
        proposals = model.propose(prepared)
        model.detection_candidates(inputs, prepared, [p[:32] for p in proposals])  # the RoIs it calibrated on
    logits, objectness = seen["logits"], seen["objectness"]
    assert logits.shape == (32, 4)  # 3 classes and background
    assert logits.mean(dim=0).abs().max() < 1e-4
    assert 1.0 < logits.std().item() < 3.0  # about 2, not the 0.01-scale spread of the random initialisation
    per_anchor = objectness.permute(0, 2, 3, 1).reshape(-1, objectness.shape[1])  # (cells, anchors)
    assert per_anchor.mean(dim=0).abs().max() < 1e-4
    assert 1.0 < objectness.std().item() < 3.0  # about 2


def test_junit_counts(tmp_path):
    xml = tmp_path / "report.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.a" name="test_ok"/>'
        '<testcase classname="tests.a" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.b" name="test_setup"><error message="y"/></testcase>'
        '<testcase classname="tests.b" name="test_skip"><skipped message="needs CUDA"/></testcase>'
        '<testcase classname="tests.b" name="test_ok_too"/>'
        "</testsuite></testsuites>"
    )
    assert gpu_check.junit_counts(xml) == {"passed": 2, "failed": 1, "errors": 1, "skipped": 1,
                                           "failing": ["tests.a::test_bad", "tests.b::test_setup"]}  # fmt: skip
