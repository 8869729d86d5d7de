"""Screenshot built pages with a headless Chromium, to look at math, code and tables.

Build the docs first (``sphinx-build docs docs/_build/html``), then::

    python docs/check_render.py                         # index, math, plugin guide at 1280 px
    python docs/check_render.py registry cli --width 1000 --width 1920

PNGs go to ``docs/_build/screenshots`` (``--out``). Needs ``chromium`` (or
``chromium-browser``, ``google-chrome``) on ``PATH``; the pages load nothing from the
network, so this works offline. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HTML = Path(__file__).resolve().parent / "_build" / "html"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
#: Headless, as root too, and nothing fetched: no updates, sync or background requests.
#: The virtual-time budget lets MathJax typeset before the screenshot.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]
FLAGS += ["--disable-background-networking", "--disable-component-update"]
FLAGS += ["--virtual-time-budget=5000"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="*", default=["index", "math", "plugin-guide"])
    parser.add_argument("--width", type=int, action="append", help="window width in px")
    parser.add_argument("--height", type=int, default=1600)
    parser.add_argument("--out", type=Path, default=HTML.parent / "screenshots")
    args = parser.parse_args()
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        sys.exit(f"no browser found; install one of {BROWSERS}")
    args.out.mkdir(parents=True, exist_ok=True)
    for page in args.pages:
        source = HTML / f"{page.removesuffix('.html')}.html"
        if not source.is_file():
            sys.exit(f"{source} does not exist; build the docs first")
        for width in args.width or [1280]:
            target = args.out / f"{source.stem}-{width}.png"
            with tempfile.TemporaryDirectory() as profile:
                window = [f"--window-size={width},{args.height}", f"--screenshot={target}"]
                subprocess.run(
                    [browser, *FLAGS, f"--user-data-dir={profile}", *window, source.as_uri()],
                    check=True,
                    capture_output=True,
                    timeout=120,
                )
            print(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
