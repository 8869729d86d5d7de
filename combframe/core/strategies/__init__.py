r"""Gradient strategies: how the gradients of the per-pose predictions are obtained.

Each strategy runs the single-pose model over the flat list of poses of a batch of
compounds, ``chunk_size`` poses per pass, never holding more than one chunk's autograd
graph, and returns the detached ``(M,)`` predictions and a
:class:`~combframe.core.gradients.PoseGradients` that answers the backward.

=========  ===========================================  ===============================
strategy   held between forward and backward            losses supported
=========  ===========================================  ===============================
store      ``(M, P)`` per-pose gradients                any (combined and per-pose)
recompute  the poses and their RNG states; one ``P``    any
           accumulator during backward
stream     ``k`` running ``P``-sums per compound        combined predictions only
           (online softmax)
=========  ===========================================  ===============================

Gradients go to every input of the pose graph: the model's (and the readout's) trainable
parameters, tensors inside the poses that require grad, and leaf tensors the graph
reaches through a closure (found by walking the graph of the first chunk run with one).

The modules, read top-down: :mod:`.runner` (running a chunk, the :class:`Chunk` a
strategy asks), :mod:`.graph` (the graph walk), :mod:`.replay` (buffer, RNG and autocast
snapshots), :mod:`.base` (the contract), :mod:`.store` and its :mod:`.per_sample` path,
:mod:`.recompute`, :mod:`.stream` and its :mod:`.sums`, and :mod:`.auto`, which
chooses one of the three at the first forward.
"""

from __future__ import annotations

from combframe.core.strategies.auto import Auto
from combframe.core.strategies.base import Strategy
from combframe.core.strategies.chunk import Chunk
from combframe.core.strategies.recompute import Recompute
from combframe.core.strategies.replay import undo_side_effects
from combframe.core.strategies.runner import Collected, PoseRunner, Poses
from combframe.core.strategies.store import Store
from combframe.core.strategies.stream import Stream

__all__ = [
    "STRATEGIES",
    "Auto",
    "Chunk",
    "Collected",
    "PoseRunner",
    "Poses",
    "Recompute",
    "Store",
    "Strategy",
    "Stream",
    "resolve_strategy",
    "undo_side_effects",
]

#: The strategies by name: the one list every other place (configs, the CLI) reads.
STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Store, Recompute, Stream, Auto)}


def resolve_strategy(strategy: str | Strategy) -> Strategy:
    """Return a strategy instance for a name in :data:`STRATEGIES` (``"auto"`` among them).

    Any other string raises :class:`ValueError` naming the accepted ones.
    """
    if isinstance(strategy, Strategy):
        return strategy
    key = str(strategy).strip().lower()
    if key not in STRATEGIES:
        raise ValueError(
            f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)} "
            "or pass a combframe.core.strategies.Strategy instance"
        )
    return STRATEGIES[key]()
