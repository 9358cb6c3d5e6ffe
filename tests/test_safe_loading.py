"""No file is read in a way that can run code from it: every call in detectron_res/ and tools/ that deserialises
(torch.load, pickle, numpy.load, yaml, torch.jit.load, eval/exec, ...) is either safe by its arguments
(`torch.load(..., weights_only=True)`, `yaml.safe_load`, `numpy.load` without `allow_pickle=True`) or one of the
known uses below, each with its reason. A new unsafe call fails this test, naming its file and line; so does a known
use that went away (the allowlist stays exact).

The calls are found in the syntax tree (comments and docstrings do not count), with import aliases followed
(`import pickle as p`, `from torch import load`)."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("detectron_res", "tools")

# (file, call) -> (how many, why it is safe)
KNOWN_SAFE = {
    ("detectron_res/data/loader.py", "pickle.loads"): (
        1, "SerializedRecords unpickles the byte buffer it pickled itself from in-memory records; never file data"),
    ("detectron_res/modeling/weight_formats.py", "class(pickle.Unpickler)"): (
        1, "_ArrayUnpickler's find_class builds numpy arrays and plain containers only and refuses any other class"),
    ("detectron_res/config/config.py", "yaml.load"): (
        1, "Loader=_UniqueKeyLoader, a yaml.SafeLoader subclass (checked below) that only adds duplicate-key errors"),
    ("tools/export.py", "torch.jit.load"): (
        1, "loads the TorchScript file the tool has just written (--output) to check it against the model"),
    ("tools/gpu_check.py", "torch.jit.load"): (
        1, "loads the TorchScript file its export step has just written to a temporary folder, to run it on the GPU"),
}

# calls that can run code from what they read, whatever their arguments (qualified names after import aliases)
ALWAYS_UNSAFE = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "_pickle.Unpickler",
    "cPickle.load", "cPickle.loads", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads",
    "joblib.load", "shelve.open", "marshal.load", "marshal.loads", "pandas.read_pickle",
    "yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all",
    "torch.jit.load", "torch.hub.load", "torch.package.PackageImporter", "torch.serialization.add_safe_globals",
    "torch.serialization.safe_globals", "builtins.eval", "builtins.exec", "builtins.compile", "builtins.__import__",
    "importlib.import_module", "runpy.run_path", "runpy.run_module",
}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"}
BUILTINS = {"eval", "exec", "compile", "__import__"}


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> qualified name, from the module's imports (`import numpy as np` -> {"np": "numpy"})."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:  # `import a.b` binds a; `import a.b as c` binds c to a.b
                top = alias.name.split(".")[0]
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _qualified(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """`np.load` -> "numpy.load"; a bare `eval` -> "builtins.eval"; None for anything but a dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    head = aliases.get(node.id, f"builtins.{node.id}" if node.id in BUILTINS and not parts else node.id)
    return ".".join([head, *reversed(parts)])


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str) -> list[tuple[int, str]]:
    """(line, call) for each call of `source` that may run code from what it reads, unless its arguments make it
    safe; a class deriving from an unpickler counts as `class(<base>)`."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                name = _qualified(base, aliases)
                if name in ALWAYS_UNSAFE:
                    found.append((node.lineno, f"class({name})"))
            continue
        if not isinstance(node, ast.Call):
            continue
        name = _qualified(node.func, aliases)
        if name is None:
            continue
        if name in ALWAYS_UNSAFE:
            found.append((node.lineno, name))
        elif name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            found.append((node.lineno, "torch.load without weights_only=True"))
        elif name == "numpy.load" and _keyword(node, "allow_pickle") is not None and not (
            isinstance(_keyword(node, "allow_pickle"), ast.Constant) and _keyword(node, "allow_pickle").value is False
        ):
            found.append((node.lineno, "numpy.load with allow_pickle"))
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _qualified(loader, aliases) not in SAFE_YAML_LOADERS:
                found.append((node.lineno, name))
    return sorted(found)


def scanned_files() -> list[Path]:
    files = sorted(p for folder in SCANNED for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts)
    assert len(files) > 50  # the package and the tools were found
    return files


def test_no_file_is_deserialised_unsafely_outside_the_known_safe_uses():
    found: Counter = Counter()
    where: dict[tuple[str, str], list[int]] = {}
    for path in scanned_files():
        relative = path.relative_to(REPO).as_posix()
        for line, call in unsafe_calls(path.read_text(encoding="utf-8")):
            found[(relative, call)] += 1
            where.setdefault((relative, call), []).append(line)
    expected = Counter({place: count for place, (count, _) in KNOWN_SAFE.items()})
    unexpected = [f"{file}:{line}: {call}" for (file, call), count in sorted(found.items())
                  if count > expected[(file, call)] for line in where[(file, call)]]
    assert not unexpected, (
        "calls that can run code from the data they read (use torch.load(..., weights_only=True), yaml.safe_load, "
        "numpy.load without allow_pickle, or add the call to KNOWN_SAFE with its reason): " + "; ".join(unexpected)
    )
    gone = [f"{file}: {call}" for (file, call), count in sorted(expected.items()) if found[(file, call)] < count]
    assert not gone, f"known safe uses no longer found, remove them from KNOWN_SAFE: {'; '.join(gone)}"


def test_the_config_loader_is_a_safe_loader():
    from detectron_res.config import config

    assert issubclass(config._UniqueKeyLoader, yaml.SafeLoader)
    with pytest.raises(yaml.YAMLError, match="could not determine a constructor for the tag"):
        yaml.load("!!python/object/apply:os.system ['true']", Loader=config._UniqueKeyLoader)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import torch\ntorch.load(p)", [(2, "torch.load without weights_only=True")]),
        ("import torch as t\nt.load(p, weights_only=False)", [(2, "torch.load without weights_only=True")]),
        ("from torch import load\nload(p, map_location='cpu')", [(2, "torch.load without weights_only=True")]),
        ("import torch\ntorch.load(p, weights_only=True, mmap=True)", []),
        ("import pickle\nwith open(p, 'rb') as f:\n    pickle.load(f)", [(3, "pickle.load")]),
        ("from pickle import loads as l\nl(data)", [(2, "pickle.loads")]),
        ("import pickle\nclass U(pickle.Unpickler):\n    pass", [(2, "class(pickle.Unpickler)")]),
        ("import numpy as np\nnp.load(p, allow_pickle=True)", [(2, "numpy.load with allow_pickle")]),
        ("import numpy as np\nnp.load(p)\nnp.load(p, allow_pickle=False)", []),
        ("import yaml\nyaml.load(s)", [(2, "yaml.load")]),
        ("import yaml\nyaml.load(s, Loader=yaml.Loader)", [(2, "yaml.load")]),
        ("import yaml\nyaml.load(s, yaml.FullLoader)", [(2, "yaml.load")]),
        ("import yaml\nyaml.load(s, Loader=yaml.SafeLoader)\nyaml.safe_load(s)", []),
        ("import yaml\nyaml.unsafe_load(s)\nyaml.full_load(s)", [(2, "yaml.unsafe_load"), (3, "yaml.full_load")]),
        ("import torch\ntorch.jit.load(p)", [(2, "torch.jit.load")]),
        ("import torch\ntorch.serialization.add_safe_globals([X])", [(2, "torch.serialization.add_safe_globals")]),
        ("eval(text)\nexec(code)", [(1, "builtins.eval"), (2, "builtins.exec")]),
        ("model.eval()\nself.eval()\nre.compile(r'x')", []),
        ("import marshal, shelve\nmarshal.loads(b)\nshelve.open(p)", [(2, "marshal.loads"), (3, "shelve.open")]),
    ],
)
def test_the_scan_finds_each_kind_of_unsafe_load(source, expected):
    assert unsafe_calls(source) == expected
