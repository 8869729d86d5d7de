"""The docs read correctly where they are read: on a code host, offline, after set-up.

- The Markdown pages the README leads to use only what a code host renders: no MyST
  roles or directives, and copies of example files that stay equal to the files.
- Every relative link in the README and in those pages points at an existing file.
- The README's set-up installs no exact torch (it would replace a user's torch), and the
  package requires only ``torch>=2.4``; installing it keeps the torch at hand.
- The built HTML loads no script or stylesheet from the network, its math is typeset
  by a MathJax copied into the build, and the contents and API links are there.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"

#: Pages that exist to render docstrings with autodoc; a code host shows their
#: ``{eval-rst}`` blocks as code. The API reference is nothing but such blocks.
AUTODOC_ONLY = {"docs/api.md"}
#: The combination pages render their plugin's module docstring (the math) this way;
#: the rest of each page is plain Markdown.
_AUTOMODULE_BLOCK = re.compile(
    r"^```\{eval-rst\}\n\.\. automodule:: [\w.]+\n(?:   :[\w-]+:.*\n)*```\n", re.MULTILINE
)

#: MyST syntax a code host shows as raw text.
_MYST_ONLY = {
    "role": re.compile(r"\{[a-z][\w:-]*\}`"),
    "directive": re.compile(r"^[ \t]*(?:`{3,}|~{3,}|:{3,})[ \t]*\{", re.MULTILINE),
    "target": re.compile(r"^\([\w-]+\)=[ \t]*$", re.MULTILINE),
    "equation label": re.compile(r"^\$\$[ \t]*\([\w-]+\)[ \t]*$", re.MULTILINE),
    "comment line": re.compile(r"^%", re.MULTILINE),
}
PIP_DRY_RUN = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet"]
PIP_DRY_RUN += ["--no-index", "--no-build-isolation"]  # offline: only what is installed
SPHINX_BUILD = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(`{3,})(\w*)\n(.*?)^\1[ \t]*$", re.MULTILINE | re.DOTALL)
_COPY_OF = re.compile(r"^<!-- copy of (\S+) -->\n\n(`{3,})\w*\n(.*?)^\2[ \t]*$", re.M | re.S)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _relative_links(path: Path) -> list[str]:
    """Relative link targets of a Markdown page (no URL, no in-page anchor), code excluded."""
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    targets = (m.group(1) for m in _LINK.finditer(text))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]


def _code_host_pages() -> list[Path]:
    """README and every Markdown page reachable from it through relative links."""
    seen: dict[Path, None] = {}
    todo = [README]
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen[page] = None
        for target in _relative_links(page):
            linked = (page.parent / target.split("#")[0]).resolve()
            if linked.suffix == ".md" and linked.is_file() and "_build" not in linked.parts:
                todo.append(linked)
    return sorted(seen, key=_rel)


PAGES = _code_host_pages()


def test_readme_reaches_the_docs() -> None:
    reached = {_rel(p) for p in PAGES}
    for page in ("docs/index.md", "docs/install.md", "docs/plugin-guide.md", "docs/math.md"):
        assert page in reached, f"{page} is not reachable from README.md; reached {reached}"


@pytest.mark.parametrize("page", [p for p in PAGES if _rel(p) not in AUTODOC_ONLY], ids=_rel)
def test_page_uses_only_what_a_code_host_renders(page: Path) -> None:
    text = _AUTOMODULE_BLOCK.sub("", page.read_text(encoding="utf-8"))
    prose = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # code shows as written
    for kind, pattern in _MYST_ONLY.items():
        for match in pattern.finditer(text if kind == "directive" else prose):
            line = prose.count("\n", 0, match.start()) + 1
            raise AssertionError(f"{_rel(page)}:{line}: MyST {kind} {match.group(0)!r}")


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page: Path) -> None:
    for target in _relative_links(page):
        linked = page.parent / target.split("#")[0]
        assert linked.exists(), f"{_rel(page)} links to {target}, which does not exist"


def test_copies_of_example_files_match_the_files() -> None:
    copies = []
    for page in sorted(DOCS.rglob("*.md")):
        for match in _COPY_OF.finditer(page.read_text(encoding="utf-8")):
            source = page.parent / match.group(1)
            assert source.is_file(), f"{_rel(page)}: no file {match.group(1)}"
            assert match.group(3) == source.read_text(encoding="utf-8"), (
                f"{_rel(page)}: the copy of {match.group(1)} differs from the file; paste it again"
            )
            copies.append(_rel(source))
    assert "docs/examples/combframe-expavg/combframe_expavg/__init__.py" in copies, copies
    assert "docs/examples/combframe-expavg/pyproject.toml" in copies, copies


# --- set-up ------------------------------------------------------------------------------


def _shell_blocks(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [m.group(3) for m in _FENCE.finditer(text) if m.group(2) in ("bash", "sh", "shell")]


def test_readme_setup_keeps_the_users_torch() -> None:
    blocks = _shell_blocks(README)
    commands = [line for block in blocks for line in block.splitlines()]
    assert any(re.search(r"pip install -e \. && combframe train", c) for c in commands), blocks
    assert any("pip install -e '.[test]' && python -m pytest" in c for c in commands), blocks
    for page in (README, DOCS / "install.md"):
        for block in _shell_blocks(page):
            pinned = re.search(r"\btorch\s*(?:==|~=|===)", block)
            assert pinned is None, f"{_rel(page)} pins torch exactly:\n{block}"
    text = README.read_text(encoding="utf-8")
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in text


def test_pyproject_requires_a_torch_range_only() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    torch = [Requirement(r) for r in requirements if Requirement(r).name == "torch"]
    assert [str(r.specifier) for r in torch] == [">=2.4"], [str(r) for r in torch]


def _setuptools_builds_editables() -> bool:
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return major >= 64  # PEP 660 editable installs


@pytest.mark.skipif(
    not _setuptools_builds_editables(), reason="builds offline with the local setuptools >= 64"
)
def test_installing_keeps_the_installed_torch() -> None:
    """Resolve ``pip install -e .`` offline against this environment: torch stays as it is."""
    proc = subprocess.run(
        [*PIP_DRY_RUN, "--report", "-", "-e", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    installs = sorted(item["metadata"]["name"] for item in report["install"])
    assert installs == ["combframe"], installs


# --- the built HTML ----------------------------------------------------------------------


class _Assets(HTMLParser):
    """Collect the ``src`` of scripts and the ``href`` of ``<link>`` elements."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        url = {"script": values.get("src"), "link": values.get("href")}.get(tag)
        if url:
            self.urls.append(url)


def _assets(page: Path) -> list[str]:
    parser = _Assets()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.urls


@pytest.fixture(scope="module")
def html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The docs built as CI builds them (``-W``), into a temporary folder."""
    missing = [m for m in ("sphinx", "myst_parser", "furo") if importlib.util.find_spec(m) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must build the docs; missing {missing} (pip install -e '.[docs]')")
        pytest.skip(f"needs the docs extra (pip install -e '.[docs]'); missing {missing}")
    out = tmp_path_factory.mktemp("html")
    proc = subprocess.run(
        [*SPHINX_BUILD, "-d", str(out / ".doctrees"), str(DOCS), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_html_loads_nothing_from_the_network(html: Path) -> None:
    pages = sorted(html.rglob("*.html"))
    assert len(pages) > 10, pages
    for page in pages:
        for url in _assets(page):
            assert not re.match(r"(?:https?:)?//", url), f"{page.relative_to(html)} loads {url}"


def test_math_is_typeset_by_a_local_mathjax(html: Path) -> None:
    page = html / "math.html"
    assert 'class="math' in page.read_text(encoding="utf-8")
    scripts = [url.split("?")[0] for url in _assets(page) if "mathjax" in url.lower()]
    assert scripts, f"math.html loads no MathJax: {_assets(page)}"
    for script in scripts:
        assert (page.parent / script).is_file(), f"math.html loads {script}, not in the build"
    # The SVG output carries its glyphs; CHTML would fetch web fonts.
    assert any(script.endswith("tex-svg.js") for script in scripts), scripts


def test_html_has_contents_and_api_links(html: Path) -> None:
    index = (html / "index.html").read_text(encoding="utf-8")
    for target in ("install.html", "math.html", "plugin-guide.html", "api.html"):
        assert f'href="{target}"' in index, f"index.html does not link {target}"
    cli = (html / "cli.html").read_text(encoding="utf-8")
    assert 'href="api.html#combframe.CombinationConfig"' in cli, "inline code is not linked"
    for page in html.rglob("*.html"):
        raw = re.search(r"\{(?:doc|class|func|literalinclude|toctree)\}", page.read_text("utf-8"))
        assert raw is None, f"{page.relative_to(html)} shows {raw.group(0)}"
