"""An out-of-tree example plugin (``combframe-blend``) and a helper that installs it.

The plugin's package and its ``*.dist-info`` (``METADATA`` + ``entry_points.txt``) live
next to this file, as pip would install them; :func:`install_example_plugin` copies both
into a temporary directory on ``sys.path`` with :func:`combframe.testing.fake_distribution`,
so discovery goes through real entry-point metadata.
"""

from __future__ import annotations

import configparser
import email.parser
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from combframe.testing import fake_distribution

HERE = Path(__file__).parent
DIST_INFO = HERE / "combframe_blend-0.2.0.dist-info"
PACKAGE = HERE / "combframe_blend"


@contextmanager
def install_example_plugin(tmp_path: Path) -> Iterator[Path]:
    meta = email.parser.Parser().parsestr(
        (DIST_INFO / "METADATA").read_text(encoding="utf-8"), headersonly=True
    )
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DIST_INFO / "entry_points.txt", encoding="utf-8")
    entry_points = {group: dict(parser[group]) for group in parser.sections()}
    files = {
        str(path.relative_to(HERE)): path.read_text(encoding="utf-8")
        for path in PACKAGE.rglob("*.py")
    }
    with fake_distribution(tmp_path, meta["Name"], meta["Version"], entry_points, files) as root:
        yield root
