"""Lint and type checks run as ordinary tests, so a style break fails the suite.

ruff checks the whole tree; mypy checks the core packages (see [tool.mypy]); and
an import-layer rule keeps sans-I/O cores free of I/O, clocks and randomness.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Modules that must stay sans-I/O: they may not import these.
SANS_IO_CORES = [
    "src/corral/totem/config.py",
    "src/corral/cpg/core.py",
    "src/corral/quorum/core.py",
    "src/corral/cfs/ops.py",
    "src/corral/cfs/rules.py",
    "src/corral/cfs/state.py",
    "src/corral/cfs/records.py",
    "src/corral/cfs/resync.py",
    "src/corral/cfs/locks.py",
    "src/corral/cfs/virtual.py",
    "src/corral/cfs/memkv.py",
    "src/corral/cfs/replica_core.py",
    "src/corral/guests/config.py",
    "src/corral/daemon/statuscore.py",
    "src/corral/ha/logic",
]
FORBIDDEN_IMPORTS = {"asyncio", "socket", "time", "random", "uvloop", "subprocess", "threading"}


def test_ruff() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "src", "tests", "bench"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _core_files() -> list[pathlib.Path]:
    files: list[pathlib.Path] = []
    for entry in SANS_IO_CORES:
        path = ROOT / entry
        if path.is_dir():
            files += sorted(path.rglob("*.py"))
        elif path.exists():
            files.append(path)
    files += sorted((ROOT / "ext").rglob("*.pyx"))
    return files


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_sans_io_imports(path: pathlib.Path) -> None:
    if path.suffix == ".pyx":
        text = path.read_text()
        for name in FORBIDDEN_IMPORTS:
            assert f"import {name}\n" not in text and f"from {name} import" not in text, name
        return
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module.split(".")[0]]
        else:
            continue
        bad = FORBIDDEN_IMPORTS.intersection(names)
        assert not bad, f"{path.name} imports {bad}: cores must stay sans-I/O"
