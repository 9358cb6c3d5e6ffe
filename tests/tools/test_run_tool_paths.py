"""Issue 21, acceptance 2, for the tools that run through `engine.runner` (train_det, test_det, train_loc,
ensemble_det) and benchmark: an output path equal to one of the tool's inputs, named directly or through a symlink,
is refused before anything is written: exit 1, one line on stderr, every input's bytes unchanged. (The other tools'
cases are in test_tool_paths.py.)"""

import os
import sys
from pathlib import Path

import pytest

from conftest import load_tool, package_logger_restored

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def inputs(tmp_path):
    """A detector config, a localization config and two "checkpoints" (their bytes only matter: nothing may be
    read from them before the refusal), each with a symlink beside it."""
    base = b"_base_: " + str(REPO / "configs/base_c4.yaml").encode()
    files = {
        "det.yaml": (REPO / "configs/shapes_r18.yaml").read_bytes().replace(b"_base_: base_c4.yaml", base),
        "loc.yaml": (REPO / "configs/loc_shapes_r18.yaml").read_bytes().replace(b"_base_: base_c4.yaml", base),
        "a.pth": b"checkpoint a",
        "b.pth": b"checkpoint b",
        "base.yaml": (REPO / "configs/base_c4.yaml").read_bytes(),
        "child.yaml": b"_base_: base.yaml\nSEED: 3\n",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        os.symlink(tmp_path / name, tmp_path / f"link_{name}")
    return tmp_path, files


def cases(root: Path) -> list[tuple[str, list[str], str, str]]:
    """(tool, argv with {out} for the output path, the flag of that output, the input it aliases)."""
    det, loc, a, b = (str(root / name) for name in ("det.yaml", "loc.yaml", "a.pth", "b.pth"))
    return [
        ("train_det", ["--cfg", det, "--output", "{out}", "MODEL.DEVICE=cpu"], "--output", "det.yaml"),
        ("train_det", ["--cfg", det, "--output", "{out}", f"MODEL.WEIGHTS={a}"], "--output", "a.pth"),
        ("train_det", ["--cfg", det, "--eval-only", "--output", "{out}", f"MODEL.WEIGHTS={a}"], "--output", "a.pth"),
        ("test_det", ["--cfg", det, "--ckpt", a, "--output", "{out}"], "--output", "a.pth"),
        ("train_loc", ["--cfg", loc, "--output", "{out}"], "--output", "loc.yaml"),
        ("train_loc", ["--cfg", loc, "--stage", "rcnn", "--rpn-ckpt", b, "--output", "{out}"], "--output", "b.pth"),
        ("ensemble_det", ["--model", det, a, "--model", det, b, "--output", "{out}"], "--output", "b.pth"),
        ("benchmark", ["--cfg", det, "--json-out", "{out}"], "--json-out", "det.yaml"),
        ("train_det", ["--cfg", str(root / "child.yaml"), "--output", "{out}"], "--output", "base.yaml"),  # a _base_
    ]


@pytest.mark.parametrize("alias", ["same", "symlink"])
@pytest.mark.parametrize("index", range(9))
def test_output_on_an_input_is_refused_and_the_input_kept(inputs, index, alias, monkeypatch, capsys):
    root, files = inputs
    tool_name, argv, flag, target = cases(root)[index]
    out = root / (target if alias == "same" else f"link_{target}")
    monkeypatch.setattr(sys, "argv", [str(REPO / "tools" / f"{tool_name}.py")])
    tool = load_tool(tool_name)
    with package_logger_restored():
        code = tool.run_tool(tool.main, [arg.replace("{out}", str(out)) for arg in argv])
    err = capsys.readouterr().err.splitlines()
    assert code == 1
    assert len(err) == 1, err
    shown = f"{flag} {out}" if alias == "same" else f"{flag} {out} (= {root / target})"
    assert err[0].startswith(f"{tool_name}.py: error: {shown} is the same path as the input "), err[0]
    assert err[0].endswith(f"{root / target}: refusing to overwrite it")
    for name, data in files.items():
        assert (root / name).read_bytes() == data, name
    assert sorted(p.name for p in root.iterdir()) == sorted([*files, *(f"link_{n}" for n in files)])
