"""The package's shape, kept by tests: what ``import combframe`` loads, which way imports
go, and the size of functions and plugins."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "combframe"
PLUGINS = ROOT / "plugins"
MAX_FUNCTION_LINES = 60
#: Non-blank lines of a shipped plugin, its math docstring included.
MAX_PLUGIN_LINES = 45
#: Plugins allowed more lines, and why.
PLUGIN_LINES: dict[str, int] = {
    # Gated attention owns three layers (built from its parameters), checks the embedding
    # size, and writes a batched value, closed-form pool weights and the vector stream
    # terms of its 2d+1 sums: each is a few lines of its own math, not shared machinery.
    "combframe_attention": 80,
}
#: Lines of a module of the core (about 400): one concern per file.
MAX_CORE_MODULE_LINES = 410
#: Taking or replaying the state a forward changes (buffer values, RNG, autocast).
_SNAPSHOT = re.compile(
    r"fork_rng|[gs]et_rng_state|is_autocast_enabled|get_autocast_dtype|_foreach_copy_"
    r"|named_buffers\(\)\.items|b\.clone\(\)"
)


def _sources(*roots: Path) -> Iterator[Path]:
    for root in roots:
        yield from sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> set[str]:
    """Modules of the ``combframe`` package that ``path`` imports, lazily or not.

    Imports under ``if TYPE_CHECKING:`` are for the type checker only and not counted.
    """
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                found.add(base)
                found.update(f"{base}.{a.name}" for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    modules = {_module_name(p) for p in _sources(PACKAGE)}
    return {m for m in found if m in modules and m != module}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in _sources(PACKAGE)}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """Return one import cycle (a list of modules), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_among_the_package_modules() -> None:
    graph = _graph()
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_the_core_imports_nothing_from_the_registry_the_mtenn_layer_or_the_app() -> None:
    graph = _graph()
    allowed = ("combframe.core", "combframe.errors", "combframe.segment")
    for module, imported in graph.items():
        if module.startswith("combframe.core"):
            bad = sorted(m for m in imported if not m.startswith(allowed))
            assert not bad, f"{module} imports {bad}; the core stands alone"
        if not module.startswith(("combframe.app", "combframe.__main__")):
            app = sorted(m for m in imported if m.startswith("combframe.app"))
            assert not app, f"{module} imports the command line {app}"


#: The library's public modules: ``combframe`` itself (the names in its ``__all__``) and
#: the documented submodules, each through its own ``__all__``.
_PUBLIC_MODULES = (
    "combframe",
    "combframe.errors",
    "combframe.mtenn",
    "combframe.registry",
    "combframe.segment",
    "combframe.testing",
)


def _private_uses(path: Path) -> list[str]:
    """What ``path`` takes from the library besides its public API (``combframe.app`` aside).

    Imports of a module outside :data:`_PUBLIC_MODULES`, names a public module does not
    list in its ``__all__`` (``from combframe.registry import normalize_name`` is public,
    ``combframe.registry.plugins`` is not), and such names read as attributes.
    """
    import importlib

    def public(module: str, name: str | None = None) -> bool:
        if module.startswith("combframe.app") or module.split(".")[0] != "combframe":
            return True
        if module not in _PUBLIC_MODULES:
            return False
        listed = getattr(importlib.import_module(module), "__all__", ())
        return name is None or name in listed or f"{module}.{name}" in _PUBLIC_MODULES

    bad: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            bad += [a.name for a in node.names if not public(a.name)]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                bad.append(f"{'.' * node.level}{module} (a relative import)")
            else:
                bad += [f"{module}.{a.name}" for a in node.names if not public(module, a.name)]
        elif isinstance(node, ast.Attribute):
            dotted = ast.unparse(node)
            head, _, name = dotted.rpartition(".")
            if head in _PUBLIC_MODULES and not name.startswith("__") and not public(head, name):
                bad.append(dotted)
    return bad


def test_the_app_uses_only_the_public_api() -> None:
    for path in _sources(PACKAGE / "app"):
        bad = _private_uses(path)
        assert not bad, f"{path.relative_to(ROOT)} reaches into {sorted(set(bad))}"


#: What a benchmark may import from the library: the public API of ``combframe`` and of
#: ``combframe.testing``, and the command line's modules (besides its own helpers).
_BENCH_MODULES = ("combframe", "combframe.testing")


def _bench_private_uses(path: Path) -> list[str]:
    """What a benchmark takes besides :data:`_BENCH_MODULES` and ``combframe.app``.

    Everything :func:`_private_uses` finds, any other module of the library (the core,
    the registry), and the test suite's helpers (``tests``, ``conftest``).
    """
    bad = _private_uses(path)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        for name in names:
            top = name.split(".")[0]
            library = top == "combframe" and not name.startswith("combframe.app")
            if (library and name not in _BENCH_MODULES) or top in ("tests", "conftest"):
                bad.append(name)
    return sorted(set(bad))


def test_the_benchmarks_use_only_the_public_api_and_no_test_helper() -> None:
    for path in _sources(ROOT / "bench"):
        bad = _bench_private_uses(path)
        assert not bad, f"{path.relative_to(ROOT)} reaches into {bad}"


def test_the_benchmark_check_finds_core_registry_and_test_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import combframe\nfrom combframe.testing import make_loss\n"
        "from combframe.app.chem import conformer_poses\nimport torch, _models\n"
        "from combframe.core.gradients import ParamLayout\n"
        "from combframe.registry import create_combination\n"
        "from tests.conftest import make_mlp\nimport conftest\n"
    )
    assert _bench_private_uses(probe) == [
        "combframe.core.gradients",
        "combframe.core.gradients.ParamLayout",
        "combframe.registry",
        "conftest",
        "tests.conftest",
    ]


def test_the_public_api_check_finds_private_uses(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import combframe\n"
        "import combframe.core.model\n"
        "from combframe.registry.plugins import Source\n"
        "from combframe.registry import Registry, _flag\n"
        "from combframe import MultiPoseModel, BaseCombination\n"
        "from ..core import batch\n"
        "combframe.Store, combframe.testing.gradient_parity, combframe.errors._DEPRECATED\n"
    )
    assert sorted(_private_uses(probe)) == [
        "..core (a relative import)",
        "combframe.BaseCombination",
        "combframe.core.model",
        "combframe.errors._DEPRECATED",
        "combframe.registry._flag",
        "combframe.registry.plugins.Source",
    ]


def test_import_combframe_loads_neither_torch_nor_plugins_nor_optional_extras() -> None:
    code = (
        "import sys, json; before = set(sys.modules); import combframe; "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    loaded = json.loads(out.stdout)
    heavy = ("torch", "matplotlib", "tqdm", "yaml", "pydantic", "pluggy", "combframe_")
    assert not [m for m in loaded if m.startswith(heavy)], loaded
    assert not [m for m in loaded if m.startswith("combframe.")], loaded


def test_using_the_api_loads_no_plugin_and_no_optional_extra() -> None:
    code = (
        "import sys, json, torch; before = set(sys.modules); import combframe; "
        "combframe.MultiPoseModel; combframe.CombinationConfig; "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    loaded = json.loads(out.stdout)
    bad = [m for m in loaded if m.startswith(("matplotlib", "tqdm", "yaml", "combframe_"))]
    assert not bad, f"using combframe's API imported {bad}"
    assert not [m for m in loaded if m.startswith("combframe.app")], loaded


def _functions(path: Path) -> Iterator[tuple[str, int]]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            assert node.end_lineno is not None
            yield node.name, node.end_lineno - node.lineno + 1


@pytest.mark.parametrize(
    "path", list(_sources(PACKAGE, PLUGINS)), ids=lambda p: str(p.relative_to(ROOT))
)
def test_no_function_is_longer_than_60_lines(path: Path) -> None:
    long = [(name, n) for name, n in _functions(path) if n > MAX_FUNCTION_LINES]
    assert not long, f"{path.relative_to(ROOT)}: functions over {MAX_FUNCTION_LINES} lines: {long}"


_IGNORE = re.compile(r"#\s*type:\s*ignore(\[[^\]]*\])?(?P<rest>.*)$")


@pytest.mark.parametrize(
    "path", list(_sources(PACKAGE, PLUGINS)), ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_type_ignore_says_why_on_its_line(path: Path) -> None:
    bare = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = _IGNORE.search(line)
        if match and not re.match(r"\s*#\s*\S", match.group("rest")):
            bare.append(number)
    assert not bare, f"{path.relative_to(ROOT)}: type: ignore without a reason on lines {bare}"


@pytest.mark.parametrize(
    "path", list(_sources(PACKAGE / "core")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_no_core_module_is_much_longer_than_400_lines(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_CORE_MODULE_LINES, f"{path.relative_to(ROOT)}: {lines} lines"


def test_state_snapshots_have_one_home() -> None:
    """Buffer copies, RNG and autocast states are taken and replayed in one module."""
    home = PACKAGE / "core" / "strategies" / "replay.py"
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in _sources(PACKAGE / "core")
        if path != home
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if _SNAPSHOT.search(line)
    ]
    assert not found, f"state snapshots outside {home.relative_to(ROOT)}: {found}"
    assert _SNAPSHOT.search(home.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", sorted(PLUGINS.glob("*/__init__.py")), ids=lambda p: p.parent.name)
def test_each_shipped_plugin_is_small(path: Path) -> None:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    limit = PLUGIN_LINES.get(path.parent.name, MAX_PLUGIN_LINES)
    assert len(lines) <= limit, f"{path.parent.name}: {len(lines)} non-blank lines"


def test_the_command_line_offers_exactly_the_strategies_of_the_core() -> None:
    import typing

    from combframe.app.config import TrainConfig
    from combframe.core.strategies import STRATEGIES

    offered = typing.get_args(TrainConfig.model_fields["strategy"].annotation)
    assert offered == tuple(STRATEGIES), "combframe.app.config lists other strategies"


def test_the_core_alone_takes_instances_and_says_how_to_get_names() -> None:
    code = (
        "import torch\n"
        "from combframe.core.model import MultiPoseModel\n"
        "net = torch.nn.Linear(2, 1)\n"
        "try:\n"
        "    MultiPoseModel(net, 'max')\n"
        "except TypeError as exc:\n"
        "    assert 'import combframe.registry' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('a name resolved without the registry')\n"
        "from combframe.core.combination import Combination\n"
        "class Mean(Combination):\n"
        "    name = 'plain_mean'\n"
        "    def value(self, preds):\n"
        "        return preds.mean()\n"
        "try:\n"
        "    Mean()(torch.ones(2), {}, [])\n"
        "except TypeError as exc:\n"
        "    assert 'import combframe.registry first' in str(exc), exc\n"
        "else:\n"
        '    raise AssertionError("mtenn\'s call ran without the registry")\n'
        "import combframe.registry\n"
        "assert MultiPoseModel(net, 'max').combination.name == 'max'\n"
        "assert float(Mean()(torch.ones(2), {}, [])[0]) == 1.0\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _all_imports(path: Path) -> set[str]:
    """Modules of the package ``path`` imports, those for the type checker included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_the_contract_and_the_mechanism_do_not_know_each_other() -> None:
    contract = PACKAGE / "core" / "combination.py"
    mechanism = PACKAGE / "core" / "function.py"
    assert "combframe.core.function" not in _all_imports(contract)
    assert "combframe.core.combination" not in _all_imports(mechanism)
    assert "Combination" not in re.findall(r"\b[A-Z]\w*\b", mechanism.read_text("utf-8"))


def test_every_error_has_one_root_and_keeps_its_builtin_base() -> None:
    import importlib
    import inspect

    import combframe.errors as errors

    for path in _sources(PACKAGE):
        module = _module_name(path)
        if module == "combframe.__main__":  # importing it runs the command line
            continue
        for name, obj in vars(importlib.import_module(module)).items():
            if not (inspect.isclass(obj) and issubclass(obj, BaseException)):
                continue
            if obj.__module__ != module or name.startswith("_"):
                continue
            root = errors.CombframeWarning if issubclass(obj, Warning) else errors.CombframeError
            assert issubclass(obj, root), f"{module}.{name} does not derive from {root.__name__}"
    assert issubclass(errors.CombinationError, ValueError)
    assert issubclass(errors.StrategyError, RuntimeError)
    assert issubclass(errors.UnknownCombinationError, LookupError)
    assert issubclass(errors.PluginWarning, UserWarning)


def _names_used_from_combframe(*roots: Path) -> set[str]:
    """Names read from ``combframe`` (``combframe.X``, ``from combframe import X``)."""
    names: set[str] = set()
    for root in roots:
        files = [root] if root.is_file() else sorted(root.rglob("*"))
        for path in files:
            if path.suffix not in (".py", ".md") or "_build" in path.parts:
                continue
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".py":
                for node in ast.walk(ast.parse(text)):
                    if isinstance(node, ast.ImportFrom) and node.module == "combframe":
                        names.update(a.name for a in node.names)
                    elif (
                        isinstance(node, ast.Attribute)
                        and isinstance(node.value, ast.Name)
                        and node.value.id == "combframe"
                    ):
                        names.add(node.attr)
                continue
            names.update(re.findall(r"(?<![\w.])combframe\.([A-Za-z]\w*)\b", text))
            for block in re.findall(r"from combframe import (\([^)]*\)|[\w, ]+)", text):
                names.update(re.findall(r"\b([A-Za-z]\w*)\b(?:\s+as\s+\w+)?", block))
    return names - {"as"}


def test_all_lists_every_name_the_app_bench_and_docs_use() -> None:
    import combframe

    submodules = {p.stem for p in PACKAGE.iterdir() if p.suffix == ".py" or p.is_dir()}
    used = _names_used_from_combframe(
        PACKAGE / "app", ROOT / "bench", ROOT / "docs", ROOT / "README.md"
    )
    used -= submodules | {"as", "import", "__version__"}
    missing = sorted(used - set(combframe.__all__))
    assert not missing, f"used from combframe but not in combframe.__all__: {missing}"
    for name in combframe.__all__:
        assert getattr(combframe, name) is not None, name


@pytest.mark.parametrize(
    "name",
    [
        "BaseCombination",
        "ParamLayout",
        "PoseGradients",
        "Strategy",
        "PluginValidationError",
        "CombinationInfo",
        "ParameterInfo",
        "PluginLoadError",
        "resolve_combination",
        "hookimpl",
    ],
)
def test_names_of_earlier_releases_warn_and_still_work(name: str) -> None:
    import combframe

    with pytest.warns(DeprecationWarning, match=f"combframe.{name} is deprecated"):
        value = getattr(combframe, name)
    assert value is not None
    assert name not in combframe.__all__ and name not in dir(combframe)
