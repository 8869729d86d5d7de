"""Sphinx configuration: MyST Markdown pages, autodoc + napoleon, MathJax."""

from __future__ import annotations

import importlib.metadata
import re
from typing import Any

project = "combframe"
author = "combframe developers"
copyright = "combframe developers"
release = importlib.metadata.version("combframe")
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "examples", "**/README.md"]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"show-inheritance": True}
napoleon_numpy_docstring = True
napoleon_google_docstring = False

html_theme = "alabaster"
html_title = f"combframe {release}"

# The root toctree lists these pages explicitly and ends with a ``**`` glob that picks
# up every other page (strategies, registry, training, command line, benchmarks).
# Sphinx warns about a glob that matches nothing, so it is dropped while no other
# page exists.
CATCH_ALL = "**"


def _drop_empty_catch_all(app: Any, docname: str, source: list[str]) -> None:
    if docname != root_doc:
        return
    text = source[0]
    block = re.search(r"```\{toctree\}\n(.*?)```", text, re.DOTALL)
    if block is None:
        return
    entries = [line.strip() for line in block.group(1).splitlines()]
    listed = {e for e in entries if e and not e.startswith(":") and e != CATCH_ALL}
    if not (set(app.env.found_docs) - listed - {root_doc}):
        body = "\n".join(line for line in block.group(1).splitlines() if line != CATCH_ALL)
        source[0] = text[: block.start(1)] + body + "\n" + text[block.end(1) :]


def setup(app: Any) -> None:
    app.connect("source-read", _drop_empty_catch_all)
