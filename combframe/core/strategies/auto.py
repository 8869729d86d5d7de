"""The auto strategy: store, recompute or stream, chosen at the first forward that needs one.

The choice, read top-down (the table of ``docs/strategies.md``; the times are those of
``docs/bench/auto.md``):

1. A module backward hook on the model, or a gradient hook on an activation found in
   the first chunk: **recompute**, the one strategy that honours them.
2. ``chunk_size > 1`` (or a ``collate``): **recompute**. Within 1.0-1.5x of the batched
   full graph in every case measured, with one chunk graph of memory; store's per-pose
   gradients of a chunk are per-sample gradients (2-6x), and stream runs ``k`` backward
   passes per chunk and holds ``k`` sums per compound (1.0-6x).
3. One pose per pass and store's ``(M, P)`` buffer within the memory budget: **store**
   (the fastest of the three at one pose per pass, any loss). With ``d`` values per pose
   the buffer is ``(M, d, P)`` (each pose's Jacobian); the first pose, run once without a
   graph before the choice, gives ``d``.
4. Over the budget, ``losses="combined"``, a streaming combination and stream's
   ``C x k x P`` running sums within it, ``C`` the compounds of more than one pose (at
   one pose per pass a compound of one pose lies inside its chunk and is re-run, not
   summed): **stream** (no per-pose gradients held; ``k`` per column for ``d`` values
   combined column-wise, ``2d + 1`` for attention).
5. Otherwise **recompute** (one chunk graph and one ``P``-vector, any loss).
"""

from __future__ import annotations

import logging
import os
from typing import Literal, final

import torch
from typing_extensions import override

from combframe.core.batch import Segments
from combframe.core.combination import Combination, StreamingCombination
from combframe.core.strategies.base import Strategy
from combframe.core.strategies.graph import _module_backward_hooks
from combframe.core.strategies.recompute import Recompute
from combframe.core.strategies.replay import BufferSnapshot, undo_side_effects
from combframe.core.strategies.runner import Collected, PoseRunner, Poses
from combframe.core.strategies.store import Store
from combframe.core.strategies.stream import Stream
from combframe.core.strategies.terms import StreamTerms
from combframe.errors import StrategyError

_log = logging.getLogger("combframe")

Losses = Literal["combined", "per_pose"]
_LOSSES = ("combined", "per_pose")
#: The share of the device's memory the held gradients may take by default.
BUDGET_SHARE = 0.25


@final
class Auto(Strategy):
    """Choose store, recompute or stream from the model, the loss, the chunk size and memory.

    The choice is made at the first forward that needs gradients, when the poses are
    seen, and kept for every later forward (build a new ``Auto`` to choose again); it is
    logged at debug level on the ``"combframe"`` logger and shown by ``repr``, and
    :attr:`chosen` and :attr:`reason` say what and why.

    Parameters
    ----------
    losses
        The losses the user will take: ``"per_pose"`` (the default, the safe choice: the
        per-pose predictions may enter the loss too, so stream is never chosen) or
        ``"combined"`` (only the combined predictions; a loss on the per-pose
        predictions then raises in backward if stream was chosen).
    memory_budget
        Bytes the held gradients (store's ``(M, P)`` buffer, stream's ``C x k x P``
        sums) may take; default a quarter of the device's total memory.

    Raises
    ------
    ValueError
        If ``losses`` or ``memory_budget`` is not one of the accepted values.
    """

    name = "auto"
    activation_hooks = True

    def __init__(self, losses: Losses = "per_pose", memory_budget: int | None = None) -> None:
        if losses not in _LOSSES:
            raise ValueError(
                f"losses must be 'per_pose' (the loss may use the per-pose predictions) or "
                f"'combined' (only the combined predictions); got {losses!r}"
            )
        if memory_budget is not None and (
            isinstance(memory_budget, bool)
            or not isinstance(memory_budget, int)
            or memory_budget < 0
        ):
            raise ValueError(f"memory_budget must be a number of bytes >= 0; got {memory_budget!r}")
        self.losses: Losses = losses
        self.memory_budget = memory_budget
        #: The strategy chosen, ``None`` until the first forward that needs gradients.
        self.chosen: Strategy | None = None
        #: Why it was chosen, in words.
        self.reason = ""

    @override
    def collect(
        self, runner: PoseRunner, poses: Poses, segments: Segments, combination: Combination
    ) -> Collected:
        if self.chosen is not None:
            return self.chosen.collect(runner, poses, segments, combination)
        try:
            return self._first(runner, poses, segments, combination)
        except BaseException:
            self.chosen, self.reason = None, ""  # a forward that fails decides nothing
            raise

    def _first(
        self, runner: PoseRunner, poses: Poses, segments: Segments, combination: Combination
    ) -> Collected:
        """Choose, and run the first forward with the choice (recompute if a hook shows)."""
        # stream is considered at one pose per pass only: a compound of several poses
        # spans chunks (running sums), one of one pose is re-run
        spanning = sum(n > 1 for n in segments.sizes)
        self._choose(*choose(runner, poses, spanning, combination, self))
        assert self.chosen is not None
        if isinstance(self.chosen, Recompute):
            return self.chosen.collect(runner, poses, segments, combination)
        snapshot = BufferSnapshot.of(runner.modules)
        try:
            return self.chosen.collect(runner, poses, segments, combination)
        except StrategyError:
            if not runner.activation_hooks:
                raise
        # A hook registered inside forward shows itself only when the first chunk runs.
        snapshot.restore()
        self._choose(Recompute(), "the model registers a gradient hook on an activation")
        return self.chosen.collect(runner, poses, segments, combination)

    def _choose(self, strategy: Strategy, reason: str) -> None:
        self.chosen, self.reason = strategy, reason
        _log.debug("strategy='auto' chose %r: %s", strategy.name, reason)

    def __repr__(self) -> str:
        chosen = (
            "undecided" if self.chosen is None else f"chose {self.chosen.name!r}: {self.reason}"
        )
        return f"Auto(losses={self.losses!r}, {chosen})"


def choose(
    runner: PoseRunner, poses: Poses, count: int, combination: Combination, auto: Auto
) -> tuple[Strategy, str]:
    """Return the strategy for the poses, and why (the table above).

    ``count`` is the number of compounds stream would keep running sums for.
    """
    if any(map(_module_backward_hooks, runner.modules)):
        return Recompute(), "the model has a module backward hook"
    if runner.batched:
        return Recompute(), (
            f"chunk_size={runner.chunk_size}: store would take per-sample gradients and "
            "stream re-runs compounds inside a chunk as recompute does (and takes a backward "
            "per running sum for the others), recompute is the fastest with chunks"
        )
    layout = runner.targets.layout
    width = _width(runner, poses)
    row = layout.numel * layout.dtype.itemsize
    budget = auto.memory_budget if auto.memory_budget is not None else _budget(runner.device)
    held = len(poses) * width * row
    shape = "(M, P)" if width == 1 else f"(M, d={width}, P)"
    if held <= budget:
        return (
            Store(),
            f"one pose per pass, an {shape} buffer of {_size(held)} within {_size(budget)}",
        )
    over = f"store's {shape} buffer of {_size(held)} is over the budget of {_size(budget)}"
    if auto.losses == "combined" and isinstance(combination, StreamingCombination):
        sums = count * StreamTerms(combination, width).rows(runner.device) * row
        if sums <= budget:
            return Stream(), f"{over}; a combined loss, running sums of {_size(sums)}"
    return Recompute(), over


def _width(runner: PoseRunner, poses: Poses) -> int:
    """Return ``d``, the values the model gives per pose: one pose run, leaving no trace.

    Store's buffer grows by ``d`` (each pose's Jacobian); the first pose, run without a
    graph with its random draws and buffer updates undone, tells.
    """
    with undo_side_effects(runner.modules, runner.device), torch.no_grad():
        out = runner.predict(poses[:1], 0)
    runner.outputs.width = None  # the forward's own first chunk sets it again
    return int(out[0].numel())


def _budget(device: torch.device) -> int:
    """Return a quarter of the device's total memory (of the host's, for the CPU)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * BUDGET_SHARE)


def _size(n: int) -> str:
    """Return ``n`` bytes in words: ``"12.0 MiB"``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
