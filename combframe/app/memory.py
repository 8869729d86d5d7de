"""The memory a training step needs, as ``combframe train`` reports it.

The peak of the tensors allocated during one training step (forward, backward and
optimizer step of the run's first batch), above what was allocated before it: on CPU
from the torch profiler's memory events (:func:`combframe.testing.peak_tensor_bytes`),
on CUDA from ``torch.cuda.max_memory_allocated`` reset just before the step. It leaves
out the model, the data and torch itself, so it shows what the gradient strategy holds
(``store`` keeps N per-pose gradients, ``recompute`` and ``stream`` a few parameter-sized
vectors) and is the same whether a run comes first or last in ``--compare``.

The process's peak resident set size is reported next to it, labelled as such: it is
dominated by importing torch and only grows over the life of a process.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

__all__ = ["format_bytes", "measure_step", "process_peak_rss_mb", "run_peak"]

T = TypeVar("T")


def measure_step(step: Callable[[], T], device: torch.device) -> tuple[T, int, str]:
    """Run ``step`` and return its result, the peak bytes of its tensors and how measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return result, peak, "CUDA tensors of a training step (torch.cuda.max_memory_allocated)"
    from combframe.testing import peak_tensor_bytes

    box: list[T] = []
    with _without_profiler_log():
        peak = peak_tensor_bytes(lambda: box.append(step()))
    return box[0], peak, "CPU tensors of a training step (torch profiler)"


@contextmanager
def run_peak(device: torch.device) -> Iterator[list[int]]:
    """Measure the CUDA allocator's peak over the ``with`` block, above what was there.

    The list yielded receives the peak in bytes when the block ends. It costs nothing
    per step: the allocator keeps its peak anyway.
    """
    box: list[int] = []
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        yield box
    finally:
        torch.cuda.synchronize(device)
        box.append(torch.cuda.max_memory_allocated(device) - before)


#: What the CUDA peak over a run measures.
CUDA_RUN_KIND = "CUDA tensors over the run (torch.cuda.max_memory_allocated)"

#: A line of the profiler's own log (kineto writes it to file descriptor 2).
_PROFILER_LOG = re.compile(rb"[A-Z]+:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \S+\.cpp:\d+\] ")


@contextmanager
def _without_profiler_log() -> Iterator[None]:
    """Drop the profiler's ``STAGE:``/``USDT:`` log lines from stderr; keep everything else.

    Kineto reads its log level once, when torch is imported, so the lines are filtered
    from file descriptor 2 while the step runs instead.
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file: nothing reaches it
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().splitlines(keepends=True)
            kept = b"".join(line for line in lines if not _PROFILER_LOG.match(line))
            if kept:
                os.write(fd, kept)


def process_peak_rss_mb() -> float | None:
    """Return the process's peak resident set size so far, in MiB; None where unknown."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 2**20 if sys.platform == "darwin" else 2**10  # bytes on macOS, KiB elsewhere
    return peak / scale


def format_bytes(n: float | None) -> str:
    """Format ``n`` bytes for people: ``512 B``, ``41.2 KiB``, ``3.1 MiB``, ``1.25 GiB``."""
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{n:.0f} B"
