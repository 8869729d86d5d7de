"""The recompute strategy: forward without graphs, each chunk re-run in backward."""

from __future__ import annotations

import functools
from typing import final

import torch
from torch import Tensor
from typing_extensions import override

from combframe.core.batch import Segments
from combframe.core.combination import Combination
from combframe.core.gradients import PoseGradients
from combframe.core.strategies.base import Strategy, check_flag
from combframe.core.strategies.chunk import Chunk
from combframe.core.strategies.rerun import Reruns
from combframe.core.strategies.runner import Collected, PoseRunner, Poses


@final
class Recompute(Strategy):
    r"""Forward without graphs; backward re-runs each chunk and back-propagates its ``c``.

    Memory stays flat in the number of poses: one chunk graph and one ``P``-sized
    accumulator (none when a single chunk contributes: its gradients are returned as
    ``autograd.grad`` gives them). The last chunk runs with a graph in the forward (to
    validate the prediction and find what it depends on) and that graph is kept for the
    backward, which starts with it; the other chunks are re-run. Each chunk's backward is one
    ``autograd.grad`` with
    ``grad_outputs`` = the chunk's coefficients :math:`c_i = \partial L/\partial y_i`
    (``(b, d)`` for ``d`` values per pose: one backward whatever ``d``).
    The RNG state of each chunk is saved and restored, so dropout replays identically,
    and the autocast state of the forward is restored. Each chunk's re-run starts
    from the buffers (batch-norm running statistics) as they were before
    that chunk's forward, on copies swapped in for the re-run, so the buffers are updated
    once per chunk and the model's own are never written back.
    A pose tensor modified in place between forward and backward is refused (its version
    counter moved, as autograd checks for saved tensors). Chunks whose coefficients are
    all exactly zero (a sharp smooth-max far from the best pose) are not re-run: they
    contribute nothing. Gradient hooks on activations see what the full graph gives them.

    Parameters
    ----------
    check
        Compare every re-run prediction with the forward's (to within a few units in the
        last place, so non-deterministic GPU reductions pass) and raise
        :class:`~combframe.StrategyError` naming the poses if they differ, before any
        gradient is returned: a model that is not deterministic under the restored RNG
        state (a private ``torch.Generator``) would otherwise get gradients of another
        function. One host sync per backward. Pass ``False`` for a model known to be
        deterministic. Chunks skipped because their coefficients are zero are not
        checked.
    """

    name = "recompute"
    activation_hooks = True

    def __init__(self, check: bool = True) -> None:
        self.check = check_flag("Recompute", check)

    @override
    def collect(
        self, runner: PoseRunner, poses: Poses, segments: Segments, combination: Combination
    ) -> Collected:
        chunks = runner.chunks(len(poses))
        reruns = Reruns(runner, poses, ("recompute", "Recompute(check=False)"), self.check)
        preds = []
        kept: Chunk | None = None
        last = len(chunks) - 1
        for k, (s, e) in enumerate(chunks):
            # The last chunk runs with a graph, so that a prediction that does not
            # depend on anything trainable is refused now, not in backward, and the
            # leaves the graph reaches become targets. Its graph is kept for the
            # backward, which starts with it: one chunk graph alive at any time.
            chunk = reruns.run(
                s,
                e,
                functools.partial(self.first_chunk, runner, poses, s, e)
                if k == last
                else functools.partial(runner.run_chunk, poses, s, e, graph=False),
            )
            kept = chunk if k == last else None
            preds.append(chunk.pred.detach())
            del chunk
        stacked = torch.cat(preds)
        reruns.finish(stacked, kept)
        return stacked, _RecomputedGradients(reruns)

    def __repr__(self) -> str:
        return f"Recompute(check={self.check})"


@final
class _RecomputedGradients(PoseGradients):
    strategy = "recompute"

    def __init__(self, reruns: Reruns) -> None:
        super().__init__(reruns.runner.targets, reruns.runner.used)
        self.reruns = reruns
        self.watch(reruns.runner.leaves)

    def contract(self, coeffs: Tensor) -> list[Tensor | None]:
        params, pose = self.reruns.gradients(coeffs)
        return [*self.layout.own_dtypes(params), *pose]
