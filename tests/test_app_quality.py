"""House rules for ``combframe.app``: short functions, the library through its public API."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parent.parent / "combframe" / "app"
MODULES = sorted(APP.glob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_functions_are_at_most_60_lines(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > 60
    ]
    assert not long, f"{path.name}: {long}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_the_library_is_imported_through_its_public_names(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    private = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names = [node.module]
        private += [n for n in names if n.startswith("combframe._")]
    assert not private, f"{path.name} imports private modules: {private}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_type_ignores_say_why(path: Path) -> None:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if "# type: ignore" in line:
            reason = line.split("# type: ignore", 1)[1].partition("#")[2].strip()
            assert reason, f"{path.name}:{number}: a type: ignore without a reason"
