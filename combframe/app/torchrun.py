"""What ``torchrun`` tells a process about its place, read without importing torch.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; the command line reads them
to print on rank 0 only (before torch is loaded, or without it), and
:func:`combframe.app.distributed.from_environment` to join the training processes.
"""

from __future__ import annotations

import os

__all__ = ["environment_ranks"]


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    return int(text) if text.strip().isdigit() else default


def environment_ranks() -> tuple[int, int, int]:
    """Return this process's rank, the number of processes and its local rank.

    Rank 0 of 1 (local rank 0) where ``torchrun`` set nothing, or set something that is
    not a non-negative integer.
    """
    world = max(1, _env_int("WORLD_SIZE", 1))
    return _env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0)
