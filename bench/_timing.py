"""Timing the contenders of a case side by side: interleaved, in a new order each round."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping


def wall(step: Callable[[], object]) -> float:
    """Seconds of wall-clock time one call of ``step`` takes."""
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def cpu(step: Callable[[], object]) -> float:
    """Seconds of CPU time of this thread one call of ``step`` takes.

    With one intra-op thread the step runs on this thread: its wall time on an idle
    machine, without the time lost while other programs use the cores.
    """
    t0 = time.thread_time()
    step()
    return time.thread_time() - t0


def interleaved(
    steps: Mapping[str, Callable[[], object]],
    reps: int,
    order: random.Random,
    timer: Callable[[Callable[[], object]], float] = wall,
) -> dict[str, list[float]]:
    """Seconds of every step in each of ``reps`` rounds, the steps shuffled per round.

    Interleaving spreads the machine's drift (other work, frequency changes) over every
    contender alike, so the ratios of their medians are what a shared machine can tell.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        names = list(steps)
        order.shuffle(names)
        for name in names:
            times[name].append(timer(steps[name]))
    return times
