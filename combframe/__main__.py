"""``python -m combframe``: the same as the ``combframe`` command."""

from __future__ import annotations

import sys

from combframe.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
