"""What a run shows while it trains: a tqdm bar on a terminal, one line per epoch elsewhere.

The bar needs the ``progress`` extra (tqdm); nothing is drawn into a file or a pipe (logs,
``torchrun``'s output), where each epoch prints one line instead.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from combframe.app.building import Run

__all__ = [
    "epoch_line",
    "is_terminal",
    "progress_bar",
]


class _NoBar:
    """Stands in for a tqdm bar when tqdm is not installed (or progress is off)."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        return None


def progress_bar(total: int, desc: str, file: TextIO, enabled: bool) -> Any:
    """Return a tqdm progress bar on a terminal when tqdm is installed (``progress`` extra).

    Nothing is drawn into a file or a pipe (logs, torchrun's output); on a terminal
    without tqdm one line says how to get the bar.
    """
    if not enabled or not is_terminal(file):
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        print("note: no progress bar: pip install 'combframe[progress]' (tqdm)", file=file)
        return _NoBar()
    return tqdm(
        total=total,
        desc=desc,
        unit="step",
        file=file,
        leave=False,
        dynamic_ncols=True,
        mininterval=0.5,
    )


def is_terminal(stream: TextIO | None) -> bool:
    """Whether ``stream`` (default ``sys.stderr``) is a terminal."""
    file = stream if stream is not None else sys.stderr
    return bool(hasattr(file, "isatty") and file.isatty())


def epoch_line(run: Run, stream: TextIO | None) -> None:
    """One line per epoch where no progress bar is drawn (a log file, a pipe)."""
    row = run.progress.history[-1]
    cells = [f"epoch {row['epoch']:.0f}/{run.config.epochs}"]
    cells += [f"{k} {row[k]:.4g}" for k in ("train_rmse", "val_rmse", "test_rmse") if k in row]
    cells.append(f"{row['seconds']:.2f} s")
    print("  ".join(cells), file=stream if stream is not None else sys.stderr, flush=True)
