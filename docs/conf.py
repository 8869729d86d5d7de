"""Sphinx configuration: MyST Markdown pages, autodoc + napoleon, offline MathJax, furo.

The narrative pages are plain Markdown that a code host renders as well: links between
pages are ordinary ``[text](page.md)`` links (MyST turns them into cross-references) and
API names are inline code, which :func:`_link_code_to_api` links to the API reference in
the HTML. Two things a code host would show raw are added here instead of in the pages:
the table of contents (built from the link lists in ``index.md``) and the math renderer
(MathJax served from ``_static``, so the HTML needs no network).
"""

from __future__ import annotations

import importlib.metadata
import re
from typing import Any

from docutils import nodes

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
    # MathJax 3 bundled in a pip package, copied to _static/mathjax at the end of a build.
    "sphinx-mathjax-offline",
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

html_theme = "furo"
html_title = f"combframe {release}"
html_static_path = ["_static"]
html_css_files = ["wide-code.css"]

#: The section of ``index.md`` whose ``### Caption`` lists become the table of contents.
CONTENTS_HEADING = "## Documentation"
_CAPTION = re.compile(r"^### (.+)$", re.MULTILINE)
_PAGE_LINK = re.compile(r"\[([^\]]+)\]\(([^)#\s:]+)\.md\)")


def contents_from_index(text: str) -> list[tuple[str, dict[str, str]]]:
    """Return ``(caption, {docname: link text})`` for each ``###`` list of the contents.

    The sidebar shows these short link texts rather than the pages' full titles; a page
    linked twice in one list keeps its first link's text.
    """
    start = text.find(CONTENTS_HEADING + "\n")
    if start < 0:
        return []
    section = text[start + len(CONTENTS_HEADING) :]
    end = re.search(r"^## ", section, re.MULTILINE)
    section = section[: end.start()] if end else section
    captions = list(_CAPTION.finditer(section))
    groups = []
    for i, caption in enumerate(captions):
        stop = captions[i + 1].start() if i + 1 < len(captions) else len(section)
        entries: dict[str, str] = {}
        for title, doc in _PAGE_LINK.findall(section[caption.end() : stop]):
            entries.setdefault(doc, title.replace("`", ""))
        groups.append((caption.group(1).strip(), entries))
    return groups


def _add_toctrees(app: Any, docname: str, source: list[str]) -> None:
    """Append hidden toctrees to the root page, from its contents lists.

    Pages that the lists leave out go into a last toctree of their own, so every page
    stays reachable and Sphinx has no orphan to warn about.
    """
    if docname != root_doc:
        return
    groups = contents_from_index(source[0])
    listed = {doc for _, entries in groups for doc in entries}
    rest = sorted(set(app.env.found_docs) - listed - {root_doc})
    if rest:
        groups.append(("More", {doc: "" for doc in rest}))
    trees = []
    for caption, entries in groups:
        lines = "\n".join(f"{title} <{doc}>" if title else doc for doc, title in entries.items())
        trees.append(f"```{{toctree}}\n:hidden:\n:caption: {caption}\n\n{lines}\n```\n")
    source[0] = source[0].rstrip("\n") + "\n\n" + "\n".join(trees)


def _link_code_to_api(app: Any, doctree: nodes.document, docname: str) -> None:
    """Link inline code naming a documented object (``combframe.X``, ``X()``) to its entry.

    Modules are left alone: ``combframe`` in the text is as often the command.
    """
    objects = app.env.get_domain("py").objects
    for literal in list(doctree.findall(nodes.literal)):
        if any(isinstance(a, nodes.reference) for a in _ancestors(literal)):
            continue
        name = literal.astext().removesuffix("()")
        entry = objects.get(name)
        if entry is None or entry.objtype == "module" or entry.docname == docname:
            continue
        uri = app.builder.get_relative_uri(docname, entry.docname) + "#" + entry.node_id
        reference = nodes.reference("", "", internal=True, refuri=uri, reftitle=name)
        literal.replace_self(reference)
        reference += literal


def _ancestors(node: nodes.Node) -> list[nodes.Node]:
    found = []
    while node.parent is not None:
        node = node.parent
        found.append(node)
    return found


#: MathJax's SVG output, relative to ``_static``: it draws every glyph from the script
#: itself, with no web fonts to fetch (which browsers refuse to pages opened from disk).
#: Set in :func:`setup`, after sphinx-mathjax-offline has set its own default.
MATHJAX_PATH = "mathjax/tex-svg.js"


def setup(app: Any) -> None:
    app.config.mathjax_path = MATHJAX_PATH
    app.connect("source-read", _add_toctrees)
    app.connect("doctree-resolved", _link_code_to_api)
