"""Dependencies run one way: configkit (the config system) under everything, crawler and bolid on it, datapipe on
bolid, the demo on top.

Two checks. The import graph of every file (every ``import`` statement, at any depth, including inside
functions) is read with ``ast``, so a lower package cannot reach up even lazily. Then each package's
modules are imported in a fresh interpreter in which the packages above it cannot be found at all.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: package -> first-party packages it must never import (directly, lazily, or through a string).
FORBIDDEN = {
    "configkit": {"bolid", "datapipe", "crawler", "demo"},  # the one config system, below everything
    "crawler": {"bolid", "datapipe", "demo"},
    "bolid": {"datapipe", "crawler", "demo"},
    "datapipe": {"crawler", "demo"},
}
#: Lightning (and its CLI) belongs to the training code only.
LIGHTNING = {"lightning", "pytorch_lightning", "lightning_fabric"}


def imports_of(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at any depth, plus ``importlib.import_module("x")``."""
    with warnings.catch_warnings():  # a docstring's invalid escape is not this test's business
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value.split(".")[0])
    return found


def files_of(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_reaches_up(package):
    wrong = {str(path.relative_to(ROOT)): sorted(imports_of(path) & FORBIDDEN[package]) for path in files_of(package)}
    assert not {k: v for k, v in wrong.items() if v}, f"{package} must not import {sorted(FORBIDDEN[package])}"


def test_lightning_only_in_training_code():
    users = {
        str(path.relative_to(ROOT))
        for package in ("configkit", "bolid", "datapipe", "crawler", "demo")
        for path in files_of(package)
        if imports_of(path) & LIGHTNING
    }
    assert users and all(u.startswith("bolid/train/") for u in users), sorted(users)


def test_the_check_sees_lazy_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from datapipe.writer import write_shard\n    import crawler.store\n")
    assert imports_of(path) == {"datapipe", "crawler"}


BLOCKED_IMPORT = """
import importlib, importlib.abc, pkgutil, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} is blocked in this test", name=name)
        return None

BLOCKED = set(sys.argv[2].split(","))
sys.meta_path.insert(0, Block())
package = importlib.import_module(sys.argv[1])
names = [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in [sys.argv[1]] + names:
    if name.endswith("__main__"):
        continue
    importlib.import_module(name)
print(len(names))
"""


@pytest.mark.parametrize("package", ["configkit", "crawler", pytest.param("bolid", marks=pytest.mark.slow), "datapipe"])
def test_every_module_imports_with_the_packages_above_blocked(package):
    blocked = FORBIDDEN[package] | (LIGHTNING if package != "bolid" else set())
    code = BLOCKED_IMPORT
    if package == "bolid":  # bolid.train is the one part of bolid that may import Lightning
        code = code.replace('if name.endswith("__main__")', 'if name.endswith("__main__") or ".train" in name')
        blocked |= LIGHTNING
    result = subprocess.run(
        [sys.executable, "-c", code, package, ",".join(sorted(blocked))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) > (3 if package != "configkit" else -1)
