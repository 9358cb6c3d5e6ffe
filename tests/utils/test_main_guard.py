"""utils.main_guard: a script that starts loading workers from its unguarded top level is refused before any worker
starts, naming the line; the same script under `if __name__ == "__main__":` is not; a worker importing such a script
stops with the fix. The scripts run in this process as a main script would (their file as sys.modules["__main__"],
their code run with __name__ == "__main__")."""

import multiprocessing
import re
import sys
import types
from pathlib import Path

import pytest

from detectron_res.utils.main_guard import check_not_bootstrapping, unguarded_main_statement


def run_as_main(path: Path, monkeypatch) -> dict:
    """Runs the script at `path` as the main script: its module in sys.modules["__main__"], its code's frame a
    module frame of that file with __name__ "__main__"; returns its globals."""
    module = types.ModuleType("__main__")
    module.__file__ = str(path)
    monkeypatch.setitem(sys.modules, "__main__", module)
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
    return module.__dict__


LOADER = """\
from detectron_res.data.datasets.base import DetectionDataset
from detectron_res.data.loader import build_test_loader
dataset = DetectionDataset(name="none", records=[], class_names=["a"], category_ids=[1])
"""


def test_a_loader_started_from_the_unguarded_top_level_is_refused_naming_the_line(tmp_path, monkeypatch):
    script = tmp_path / "train_parts.py"
    script.write_text(LOADER + "loader = (  # the statement's first line is named\n"
                               "    build_test_loader(dataset, mapper=len, num_workers=2)\n)\n")
    with pytest.raises(RuntimeError) as refused:
        run_as_main(script, monkeypatch)
    assert str(refused.value) == (
        f"{script}, line 4, starts 2 data-loading worker process(es) (DATALOADER.NUM_WORKERS) from the script's top "
        "level: each worker imports the script again and would run that line again. Put the script's top-level calls "
        'under `if __name__ == "__main__":` (docs/own_data.md), or set DATALOADER.NUM_WORKERS=0'
    )


def test_the_same_call_under_the_guard_in_a_function_or_without_workers_is_not(tmp_path, monkeypatch):
    guarded = tmp_path / "guarded.py"
    guarded.write_text(LOADER + 'if __name__ == "__main__":\n    loader = build_test_loader(dataset, mapper=len, '
                                "num_workers=2)\n")
    assert run_as_main(guarded, monkeypatch)["loader"].num_workers == 2
    no_workers = tmp_path / "no_workers.py"
    no_workers.write_text(LOADER + "loader = build_test_loader(dataset, mapper=len, num_workers=0)\n")
    assert run_as_main(no_workers, monkeypatch)["loader"] is not None
    # a function of the script called from its unguarded top level: the top-level line is named
    called = tmp_path / "called.py"
    called.write_text(LOADER + "def main():\n    return build_test_loader(dataset, mapper=len, num_workers=1)\n\n"
                               "x = 1\nmain()\n")
    with pytest.raises(RuntimeError, match=rf"^{script_re(called)}, line 8, starts 1 data-loading"):
        run_as_main(called, monkeypatch)
    # an `if` that does not test __name__ is no guard
    other_if = tmp_path / "other_if.py"
    other_if.write_text(LOADER + "if len(dataset.records) == 0:\n    build_test_loader(dataset, mapper=len, "
                                 "num_workers=1)\n")
    with pytest.raises(RuntimeError, match=rf"^{script_re(other_if)}, line 4, starts 1 data-loading"):
        run_as_main(other_if, monkeypatch)


def script_re(path: Path) -> str:
    return re.escape(str(path))


def test_no_main_script_file_means_nothing_is_imported_again(tmp_path, monkeypatch):
    module = types.ModuleType("__main__")  # python -c, a notebook, an interactive session: no __file__
    monkeypatch.setitem(sys.modules, "__main__", module)
    code = compile("from detectron_res.utils.main_guard import unguarded_main_statement\n"
                   "found = unguarded_main_statement()\n", "<string>", "exec")
    exec(code, module.__dict__)
    assert module.__dict__["found"] is None
    assert unguarded_main_statement() is None  # pytest's own main module runs its code under the guard


def test_a_worker_importing_the_script_is_stopped_with_the_fix(tmp_path, monkeypatch):
    check_not_bootstrapping("train_det.py's main()")  # an ordinary process: nothing to refuse
    script = tmp_path / "train_parts.py"
    mp_main = types.ModuleType("__mp_main__")
    mp_main.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__mp_main__", mp_main)
    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)
    with pytest.raises(RuntimeError) as refused:
        check_not_bootstrapping("train_det.py's main()")
    assert str(refused.value) == (
        f"train_det.py's main() was called while a worker process imported {script} (worker processes import the "
        'main script again): put the script\'s top-level calls under `if __name__ == "__main__":` (docs/own_data.md)'
    )


def test_every_tool_main_checks_for_a_worker_bootstrap(monkeypatch):
    """The check sits in `releasing_run_folders`, which every tool's main wears."""
    from detectron_res.engine.runner import releasing_run_folders

    calls = []
    main = releasing_run_folders(lambda argv: calls.append(argv))
    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)
    with pytest.raises(RuntimeError, match=r"main\(\) was called while a worker process imported"):
        main(["--cfg", "x.yaml"])
    assert calls == []
