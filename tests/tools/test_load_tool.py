"""conftest.load_tool: a tool module that defines a dataclass loads (the module must be in sys.modules while it
runs), under a name that shadows no real module."""

import sys

import pytest
from conftest import load_tool

DATACLASS_TOOL = '''
from __future__ import annotations  # as in every tool: the dataclass then looks its module up

from dataclasses import dataclass, field


@dataclass
class Job:
    name: str
    sizes: list[int] = field(default_factory=list)


def main(argv):
    return Job(argv[0], [int(value) for value in argv[1:]])
'''


def test_a_tool_defining_a_dataclass_loads_under_its_tools_name(tmp_path, monkeypatch):
    (tmp_path / "json.py").write_text(DATACLASS_TOOL)  # named like a standard module on purpose
    real_json = sys.modules["json"]
    monkeypatch.setitem(sys.modules, "json", real_json)  # put back after the test even if load_tool replaced it
    tool = load_tool("json", tools_dir=tmp_path)
    assert tool.__name__ == "tools_json" and sys.modules["tools_json"] is tool
    assert sys.modules.get("json") is real_json
    job = tool.main(["resize", "600", "1000"])
    assert (job.name, job.sizes) == ("resize", [600, 1000])
    assert tool.Job("a") == tool.Job("a", [])  # the generated __eq__ and default factory


def test_a_tool_that_fails_to_load_leaves_no_module_behind(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('bad tool')\n")
    with pytest.raises(RuntimeError, match="bad tool"):
        load_tool("broken", tools_dir=tmp_path)
    assert "tools_broken" not in sys.modules
