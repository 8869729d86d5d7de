"""The memory a training step needs, as ``combframe train`` reports it.

The peak of the tensors allocated during a training step (forward, backward and
optimizer step of one batch), above what was allocated before it: on CPU from the torch
profiler's memory events (:func:`combframe.testing.peak_tensor_bytes`) over the steps
``memory_steps`` picks (by default steps 1, 2, 4, 8, ... of the run: a logarithmic
number of profiled steps, so the cost stays small however long the run), on CUDA from
``torch.cuda.max_memory_allocated`` over the whole run, at no cost. It leaves
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

__all__ = [
    "CUDA_RUN_KIND",
    "MEMORY_STEPS",
    "cpu_kind",
    "format_bytes",
    "measure_step",
    "process_peak_rss_mb",
    "profiled",
    "run_peak",
]

#: Which training steps the CPU profile covers (the config's ``memory_steps``).
MEMORY_STEPS = ("first", "sampled", "every")


def profiled(number: int, memory_steps: str) -> bool:
    """Whether the run's training step ``number`` (from 1) is profiled on CPU.

    ``"first"``: step 1 only; ``"sampled"``: steps 1, 2, 4, 8, ... (powers of two, so a
    run of S steps profiles about log2(S) + 1 of them); ``"every"``: all of them.

    >>> [n for n in range(1, 20) if profiled(n, "sampled")]
    [1, 2, 4, 8, 16]
    """
    if memory_steps == "every":
        return True
    if memory_steps == "first":
        return number == 1
    return number > 0 and number & (number - 1) == 0


def cpu_kind(memory_steps: str) -> str:
    """Say what the CPU figure measures, for the summary and ``metrics.json``."""
    over = {
        "first": "the first step",
        "sampled": "the largest of steps 1, 2, 4, 8, ... of the run",
        "every": "the largest over every step",
    }[memory_steps]
    return f"CPU tensors of a training step (torch profiler), {over}"


T = TypeVar("T")


def measure_step(step: Callable[[], T]) -> tuple[T, int]:
    """Run ``step`` under the CPU profiler; return its result and its tensors' peak bytes."""
    from combframe.testing import peak_tensor_bytes

    box: list[T] = []
    with _without_profiler_log():
        peak = peak_tensor_bytes(lambda: box.append(step()))
    return box[0], peak


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

#: A line of the profiler's own log (kineto writes it to file descriptor 2), or the
#: allocator's note that a tensor made before this step was freed during it (its bytes
#: were never counted, so they are not subtracted either).
_PROFILER_LOG = re.compile(
    rb"[A-Z]+:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \S+\.cpp:\d+\] "
    rb"|\[W\d{4} [\d:.]+ CPUAllocator\.cpp:\d+\] Memory block of unknown size"
)


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
