"""What every command of the command line shares: exit statuses, usage errors, printing.

Messages go to stderr on rank 0 only under ``torchrun`` (:func:`say`); numbers, counts and
combinations are written one way everywhere. Nothing here imports torch.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from combframe.app.torchrun import environment_ranks
from combframe.errors import CombframeError

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "UsageError",
    "count",
    "describe",
    "fmt",
    "say",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
#: A closed standard output: 128 + SIGPIPE, what a shell reports for ``yes | head -1``.
EXIT_BROKEN_PIPE = 141


class UsageError(CombframeError):
    """Bad input from the command line; printed as one line, exit status 2.

    ``prog`` is the command the message is about, when the parser knows it.
    """

    def __init__(self, message: str, prog: str | None = None) -> None:
        super().__init__(message)
        self.prog = prog


def say(message: str, *, every_rank: bool = False) -> None:
    """Print ``message`` on stderr: on rank 0 only, or on every rank with its number."""
    rank, world, _ = environment_ranks()
    if world > 1 and every_rank:
        print(f"[rank {rank}] {message}", file=sys.stderr)
    elif rank == 0:
        print(message, file=sys.stderr)


def fmt(value: float | None, spec: str = ".3f") -> str:
    """Format a metric; ``n/a`` where it is undefined (None, NaN or infinite)."""
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def count(n: int, noun: str) -> str:
    """Return ``1 compound``, ``2 compounds``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def describe(combination: dict[str, Any]) -> str:
    """Write a resolved combination as ``max(negate_preds=True, pred_scale=1000.0)``.

    A learned parameter (named in ``"learn"``) is marked: ``boltzmann(kT=0.99278
    (learned))``, its value as the combination holds it (after training: the final one).
    """
    learned = set(combination.get("learn", ()))
    params = ", ".join(
        _learned(k, v) if k in learned else f"{k}={v!r}"
        for k, v in combination.items()
        if k not in ("name", "learn")
    )
    return f"{combination['name']}({params})"


def describe_learned(combination: dict[str, Any]) -> str:
    """Write the learned parameters of a resolved combination: ``kT=0.98559 (learned)``.

    Empty when it learns none; as :func:`describe` marks them.
    """
    return ", ".join(_learned(k, combination[k]) for k in combination.get("learn", ()))


def _learned(key: str, value: float) -> str:
    """Write one learned parameter and its value."""
    return f"{key}={value:.5g} (learned)"
