"""Every Python example in README.md and docs/ runs as written; doctests pass.

Also installs the example plugin package of the plugin-author guide and checks that
combframe discovers it through its entry point and that its gradients are exact.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

import combframe

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLE_PACKAGE = DOCS / "examples" / "combframe-expavg"
#: Pages whose examples need the example plugin installed; they run in a subprocess.
NEEDS_EXAMPLE_PLUGIN = {"docs/plugin-guide.md"}
SHIPPED_PLUGINS = ("combframe_max", "combframe_mean", "combframe_boltzmann", "combframe_attention")
#: The class an example plugin's entry point names.
EXAMPLE_CLASS = "combframe_expavg:ExpAverageCombination"

# A fenced block: ```python, ```py or ```{code-block} python, up to the closing fence
# of the same length. Directive options (":caption: ...") at its top are dropped.
_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*"
    r"(?P<info>python|py|\{code-block\}[ \t]+python|\{code\}[ \t]+python)[ \t]*\n"
    r"(?P<body>.*?)"
    r"^(?P=indent)(?P=fence)[ \t]*$",
    re.MULTILINE | re.DOTALL,
)


def _markdown_files() -> list[Path]:
    pages = [ROOT / "README.md"]
    pages += sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
    return [p for p in pages if p.exists()]


def python_blocks(text: str) -> list[tuple[int, str]]:
    """Return ``(line number, code)`` of every Python code block in a Markdown text."""
    blocks = []
    for match in _FENCE.finditer(text):
        body = textwrap.dedent(match.group("body"))
        lines = body.splitlines()
        for i, code_line in enumerate(lines):
            if not code_line.startswith(":"):
                break
            lines[i] = ""  # a directive option; blanked so line numbers stay true
        line = text.count("\n", 0, match.start("body")) + 1
        blocks.append((line, "\n".join(lines) + "\n"))
    return blocks


def _with_page_lines(line: int, code: str) -> str:
    """Pad ``code`` so that tracebacks give line numbers of the Markdown page."""
    return "\n" * (line - 1) + code


def _page_id(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


PAGES = [p for p in _markdown_files() if python_blocks(p.read_text(encoding="utf-8"))]


def test_block_parser_finds_fences_and_directives() -> None:
    text = (
        "# T\n\n```python\nx = 1\n```\n\n```{code-block} python\n:caption: c\n\ny = 2\n```\n\n"
        "```bash\nls\n```\n\n````python\nprint('```')\n````\n"
    )
    blocks = python_blocks(text)
    assert [code.strip() for _, code in blocks] == ["x = 1", "y = 2", "print('```')"]
    assert [line for line, _ in blocks] == [4, 8, 18]


def test_readme_and_docs_have_examples() -> None:
    found = {_page_id(p) for p in PAGES}
    for required in ("README.md", "docs/index.md", "docs/plugin-guide.md"):
        assert required in found, f"{required} has no Python example; found {sorted(found)}"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


_PRIVATE_ATTRIBUTE = re.compile(r"\bcombframe(?:\.\w+)*?\._(?!_)\w*")


def private_uses(code: str) -> list[str]:
    """Private combframe modules and names that ``code`` imports or reads."""

    def private(dotted: str) -> bool:
        parts = dotted.split(".")
        return parts[0] == "combframe" and any(map(_is_private, parts[1:]))

    found = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if private(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if private(node.module):
                found.append(node.module)
                continue
            names = (f"{node.module}.{alias.name}" for alias in node.names)
            found += [name for name in names if private(name)]
    found += _PRIVATE_ATTRIBUTE.findall(code)  # combframe._x, also inside strings
    return sorted(set(found))


def test_private_use_detector() -> None:
    code = (
        "import combframe._x\nfrom combframe._y import z\nfrom combframe.core import _w\n"
        "import combframe, combframe.registry\nfrom combframe.registry import create_combination\n"
        "print(combframe.__version__, combframe._HOMES, combframe.core.batch._pyg_batch)\n"
    )
    assert private_uses(code) == [
        "combframe._HOMES",
        "combframe._x",
        "combframe._y",
        "combframe.core._w",
        "combframe.core.batch._pyg_batch",
    ]


_EXAMPLE_SOURCES = sorted((EXAMPLE_PACKAGE / "combframe_expavg").rglob("*.py"))


@pytest.mark.parametrize("path", _markdown_files() + _EXAMPLE_SOURCES, ids=_page_id)
def test_docs_use_only_public_modules(path: Path) -> None:
    """Examples import the public API only; private modules may change at any release."""
    text = path.read_text(encoding="utf-8")
    blocks = python_blocks(text) if path.suffix == ".md" else [(1, text)]
    assert blocks or path.suffix == ".md", path
    for line, code in blocks:
        used = private_uses(code)
        assert not used, f"{_page_id(path)}:{line}: the example uses private {used}"


@pytest.mark.parametrize("path", _markdown_files() + _EXAMPLE_SOURCES, ids=_page_id)
def test_docs_give_the_head_as_a_module(path: Path) -> None:
    """A lambda readout hides its head's weights from model.parameters() and state_dict."""
    text = path.read_text(encoding="utf-8")
    blocks = python_blocks(text) if path.suffix == ".md" else [(1, text)]
    for line, code in blocks:
        assert not re.search(r"_readout\s*=\s*lambda", code), (
            f"{_page_id(path)}:{line}: a readout given as a lambda; pass an nn.Module head"
        )


def _run_blocks_in_process(path: Path, blocks: list[tuple[int, str]]) -> None:
    namespace: dict[str, Any] = {"__name__": f"docs_example_{path.stem}"}
    for line, code in blocks:
        compiled = compile(_with_page_lines(line, code), _page_id(path), "exec")
        exec(compiled, namespace)


def _run_blocks_in_subprocess(path: Path, blocks: list[tuple[int, str]], site: Path) -> None:
    # One script; every block compiled with its page and line so tracebacks point there.
    script = "\n".join(
        f"exec(compile({_with_page_lines(line, code)!r}, {_page_id(path)!r}, 'exec'))"
        for line, code in blocks
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{_page_id(path)} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="session")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin package of the guide, pip-installed into a temp directory."""
    target = tmp_path_factory.mktemp("example-site")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = tmp_path_factory.mktemp("example-source") / EXAMPLE_PACKAGE.name
    shutil.copytree(EXAMPLE_PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    if importlib.util.find_spec("setuptools") is not None:
        # Build with the setuptools at hand: fast and offline. Without one (fresh
        # Python >= 3.12 environments), pip fetches it like any user's install would.
        command += ["--no-build-isolation", "--no-index"]
    proc = subprocess.run(
        [*command, "--target", str(target), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"installing {EXAMPLE_PACKAGE} failed:\n{proc.stderr}"
    assert (target / "combframe_expavg" / "__init__.py").exists()
    return target


@pytest.mark.parametrize("path", PAGES, ids=_page_id)
def test_examples_run(
    path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    if _page_id(path) in NEEDS_EXAMPLE_PLUGIN:
        _run_blocks_in_subprocess(path, blocks, request.getfixturevalue("example_site"))
        return
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(ROOT)
    _run_blocks_in_process(path, blocks)


def _run_with_site(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python *args`` with the installed example package importable; assert it exits 0."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_example_plugin_discovered_and_exact(example_site: Path) -> None:
    """The guide's package, installed, registers through its entry point and passes parity."""
    check = textwrap.dedent(
        """
        from importlib.metadata import entry_points

        import combframe
        import combframe.registry
        from combframe.testing import gradient_parity

        names = combframe.list_combinations()
        assert "expavg" in names, names
        cls = combframe.registry.get_combination_class("expavg")
        assert cls.__module__ == "combframe_expavg", cls.__module__
        (ep,) = [e for e in entry_points(group="combframe") if e.name == "expavg"]
        assert ep.value == CLASS and ep.load() is cls, ep
        import combframe_expavg
        assert combframe_expavg.__file__.startswith(SITE), combframe_expavg.__file__
        comb = combframe.create_combination("expavg", kT=0.8)
        result = gradient_parity(comb, n_poses=(1, 4), seeds=(0,))
        assert result.passed, result
        # Only the per-pose losses, which the stream strategy refuses by design, are skipped.
        assert all(s.startswith(("stream/per_pose", "stream/both")) for s in result.skipped), (
            result.skipped
        )
        strategies = sorted({case[0] for case in result.cases})
        assert strategies == ["auto", "mtenn", "recompute", "store", "stream"], strategies
        print("worst", result.worst)
        """
    )
    proc = _run_with_site(
        example_site,
        "-W",
        "error",
        "-c",
        f"SITE = {str(example_site)!r}\nCLASS = {EXAMPLE_CLASS!r}\n{check}",
    )
    assert float(proc.stdout.split()[-1]) <= 1e-10


def _shipped_classes(module: str) -> list[type[combframe.Combination]]:
    """The classes that combframe's own entry points register from ``module``.

    Read from pyproject.toml, which a fresh install's metadata reproduces (a checkout
    installed before a plugin was added lacks its entry point until reinstalled).
    """
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    values = project["entry-points"]["combframe"].values()
    eps = [importlib.metadata.EntryPoint("", v, "combframe") for v in values]
    classes = [ep.load() for ep in eps if ep.module == module]
    for cls in classes:
        assert isinstance(cls, type) and issubclass(cls, combframe.Combination), cls
    assert classes, f"no entry point in group 'combframe' names a class of {module}"
    return classes


def _public_names(module: ModuleType) -> set[str]:
    """The public classes and functions a module defines itself (not those it imports)."""
    return {
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == module.__name__
    }


@pytest.mark.parametrize("module", SHIPPED_PLUGINS)
def test_combination_pages_document_every_parameter(module: str) -> None:
    for cls in _shipped_classes(module):
        page = DOCS / "combinations" / f"{cls.name}.md"
        assert page.exists(), f"combination {cls.name!r} has no page {page.relative_to(ROOT)}"
        text = page.read_text(encoding="utf-8")
        assert f".. automodule:: {module}" in text, f"{page.name} does not render {module}'s math"
        for field, info in cls.Params.model_fields.items():
            default = "required" if info.is_required() else f"`{info.default!r}`"
            row = f"| `{field}` | {default} |"
            assert row in text, f"{page.name}: no parameter row {row!r} for {cls.__name__}"
        listed = set(re.findall(r"^\| `(\w+)` \| (?:`|required)", text, re.MULTILINE))
        extra = listed - set(cls.Params.model_fields)
        assert not extra, f"{page.name} documents parameters {cls.__name__} lacks: {extra}"


def _package_modules() -> list[ModuleType]:
    modules: list[ModuleType] = [combframe]
    for info in pkgutil.walk_packages(combframe.__path__, "combframe."):
        if info.name.endswith("__main__"):
            continue
        modules.append(importlib.import_module(info.name))
    modules += [importlib.import_module(name) for name in SHIPPED_PLUGINS]
    return modules


def _doctests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    seen: set[str] = set()
    tests = []
    for module in _package_modules():
        for test in finder.find(module):
            if test.examples and test.name not in seen:
                seen.add(test.name)
                tests.append(test)
    return sorted(tests, key=lambda t: t.name)


DOCTESTS = _doctests()


def test_package_has_doctests() -> None:
    assert DOCTESTS, "no >>> examples found in combframe or the shipped plugins"


@pytest.mark.parametrize("test", DOCTESTS, ids=lambda t: t.name)
def test_doctest(test: doctest.DocTest) -> None:
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out: list[str] = []
    result = runner.run(test, out=out.append)
    assert result.failed == 0, "".join(out)


def test_api_reference_covers_public_api() -> None:
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\.\. auto\w+:: combframe\.(\w+)\s*$", text, re.MULTILINE))
    missing = sorted(set(combframe.__all__) - documented - {"__version__"})
    assert not missing, f"docs/api.md does not document combframe.{missing}"
    for module in SHIPPED_PLUGINS:
        plugin = importlib.import_module(module)
        public = _public_names(plugin)
        assert {cls.__name__ for cls in _shipped_classes(module)} <= public, public
        names = set(re.findall(rf"^\.\. auto\w+:: {module}\.(\w+)\s*$", text, re.MULTILINE))
        missing = sorted(public - names)
        assert not missing, f"docs/api.md does not document {module}.{missing}"


def test_example_plugin_passes_combframe_check(example_site: Path) -> None:
    """The guide ends with ``combframe check expavg``; it passes on the installed package."""
    proc = _run_with_site(
        example_site, "-m", "combframe", "check", "expavg", "kT=2.0", "--seeds", "0"
    )
    assert "PASS expavg" in proc.stdout, proc.stdout


def test_install_page_lists_every_extra_with_what_it_installs() -> None:
    """Each extra of pyproject.toml is a row of install.md's table naming its packages."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    rows = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^\| `(\w+)` \| ([^|]+) \|", (DOCS / "install.md").read_text(), re.M)
    }
    for extra, requirements in extras.items():
        assert extra in rows, f"docs/install.md's extras table lacks `{extra}`"
        for requirement in requirements:
            package = re.split(r"[<>=!\[ ]", requirement)[0]
            if not package.startswith("types-"):
                assert package.lower() in rows[extra].lower(), (extra, package)
