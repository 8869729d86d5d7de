"""The recompute strategy: forward without graphs, each chunk re-run in backward."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, final

import torch
from torch import Tensor
from typing_extensions import override

from combframe.core.batch import Segments
from combframe.core.combination import Combination
from combframe.core.gradients import ParamLayout, PoseGradients
from combframe.core.strategies.base import Strategy
from combframe.core.strategies.chunk import Chunk
from combframe.core.strategies.replay import (
    AutocastState,
    BufferLog,
    RngState,
    module_buffers,
    stand_in_buffers,
    training,
)
from combframe.core.strategies.runner import Collected, PoseRunner, Poses
from combframe.errors import StrategyError


@final
class Recompute(Strategy):
    r"""Forward without graphs; backward re-runs each chunk and back-propagates its ``c``.

    Memory stays flat in the number of poses: one chunk graph and one ``P``-sized
    accumulator (none when a single chunk contributes: its gradients are returned as
    ``autograd.grad`` gives them). The last chunk runs with a graph in the forward (to validate the
    prediction and find what it depends on) and that graph is kept for the backward,
    which starts with it; the other chunks are re-run. Each chunk's backward is one
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
        self.check = check

    @override
    def collect(
        self, runner: PoseRunner, poses: Poses, segments: Segments, combination: Combination
    ) -> Collected:
        chunks = runner.chunks(len(poses))
        rng: list[RngState] = []
        preds = []
        autocast = AutocastState.capture(runner.device.type)
        kept: Chunk | None = None
        last = len(chunks) - 1
        log = BufferLog(module_buffers(runner.modules), by_value=training(runner.modules))
        for k, (s, e) in enumerate(chunks):
            rng.append(RngState.capture(runner.device, rng[-1] if rng else None))
            log.start_chunk()
            # The last chunk runs with a graph, so that a prediction that does not
            # depend on anything trainable is refused now, not in backward, and the
            # leaves the graph reaches become targets. Its graph is kept for the
            # backward, which starts with it: one chunk graph alive at any time.
            chunk = (
                self.first_chunk(runner, poses, s, e)
                if k == last
                else runner.run_chunk(poses, s, e, graph=False)
            )
            kept = chunk if k == last else None
            log.end_chunk()
            preds.append(chunk.pred.detach())
            del chunk
        log.finish()
        stacked = torch.cat(preds)
        state = _ChunkState(rng, autocast, log)
        return stacked, _RecomputedGradients(
            runner, list(poses), chunks, state, stacked, self.check, kept
        )

    def __repr__(self) -> str:
        return f"Recompute(check={self.check})"


@final
class _RecomputedGradients(PoseGradients):
    strategy = "recompute"

    def __init__(
        self,
        runner: PoseRunner,
        poses: list[Any],
        chunks: list[tuple[int, int]],
        state: _ChunkState,
        preds: Tensor,
        check: bool,
        kept: Chunk | None,
    ) -> None:
        super().__init__(runner.targets, runner.used)
        self.runner = runner
        self.poses = poses
        self.chunks = chunks
        self.state = state
        self.preds = preds
        self.check = check
        self.kept = kept
        self.deviation: list[tuple[int, int, Tensor]] = []
        self.watch(runner.leaves)

    def _rerun(self, k: int) -> Chunk:
        """Chunk ``k`` with a graph: kept from the forward, or re-run."""
        runner = self.runner
        if k == len(self.chunks) - 1 and self.kept is not None:
            kept, self.kept = self.kept, None  # used once; a second backward re-runs
            return kept
        s, e = self.chunks[k]
        state = self.state
        stand_ins = state.buffers.before(k)
        with (
            stand_in_buffers(runner.modules, stand_ins),
            state.rng[k].replay(runner.device),
            torch.enable_grad(),
            state.autocast.restore(),
        ):
            aliases = runner.aliases(s, e)
            pred = runner.predict(self.poses[s:e], s, aliases)
        runner.require_grad(
            pred,
            s,
            " (found when the backward re-ran it: recompute's forward runs only its last "
            "chunk with a graph; no gradient has been written)",
        )
        if self.check:  # compared once for all chunks, at the end of the backward
            got, want = pred.detach(), self.preds[s:e].to(pred.dtype)
            tol = min(64 * torch.finfo(got.dtype).eps, 1e-3)
            ratio = (got - want).abs() / (tol * want.abs().clamp_min(1.0))
            self.deviation.append((s, e, ratio.reshape(e - s, -1).amax(1)))  # one per pose
        return Chunk(runner, s, pred, aliases)

    def _verify(self) -> None:
        """Raise if a re-run prediction left the tolerance (one host sync)."""
        if not self.deviation:
            return
        poses = [i for s, e, _ in self.deviation for i in range(s, e)]
        ratios = torch.cat([d for *_, d in self.deviation])
        self.deviation = []
        if not bool((ratios > 1).any()):
            return
        bad = [poses[i] for i in torch.nonzero(ratios > 1).flatten().tolist()]
        raise StrategyError(
            f"the backward re-ran poses {bad[:10]} and got different predictions than the "
            f"forward (for pose {bad[0]}: {self.preds[bad[0]].item()!r} in the forward): "
            "the model is not deterministic under the restored RNG state and buffers, so "
            "recompute would return the gradients of another function. Likely causes: a "
            "private torch.Generator or another source of randomness that is not the global "
            "RNG, state the model changes outside its buffers, or the model changed between "
            "the forward and the backward (train()/eval(), a submodule replaced, an "
            "attribute its forward reads: change it after the backward). Use "
            "strategy='store' (no re-run), or Recompute(check=False) if the difference is "
            "known to be harmless"
        )

    def contract(self, coeffs: Tensor) -> list[Tensor | None]:
        runner = self.runner
        pose_acc: list[Tensor | None] = [None] * len(self.targets.pose_inputs)
        # One host sync per backward: chunks whose c_i are all zero contribute nothing.
        step = runner.chunk_size
        nonzero = coeffs.reshape(coeffs.shape[0], -1).ne(0).any(1)  # (M,) or (M, d)
        hit = torch.nonzero(nonzero).flatten() // step  # the chunk of each, ascending
        active: list[int] = hit.unique_consecutive().tolist()
        # A skipped chunk still runs forward if it holds a pose tensor no graph has
        # reached yet: reached, the tensor gets a gradient of zeros, as in the full graph.
        unseen = [
            runner.readers[slot]
            for slot, t in enumerate(self.targets.pose_inputs)
            if id(t) not in runner.used
        ]
        probe = sorted({i // step for poses in unseen for i in poses} - set(active))
        order = sorted(active + probe)
        if self.kept is not None and order and order[-1] == len(self.chunks) - 1:
            order = [order[-1], *order[:-1]]  # the kept graph first, then re-runs
        else:
            self.kept = None  # the last chunk contributes nothing: free its graph
        sums = _ParamSums(self.layout, len(order) - len(probe))
        try:
            for k in order:
                s, e = self.chunks[k]
                chunk = self._rerun(k)
                if k in probe:
                    del chunk
                    continue
                params, pose = chunk.grads(coeffs[s:e].to(chunk.pred.dtype))
                sums.add(params)
                for slot, g in pose:
                    prev = pose_acc[slot]
                    pose_acc[slot] = g if prev is None else prev + g
                del params, pose, chunk  # free before the next chunk's graph
            self._verify()
        finally:
            self.deviation = []
        return [*sums.result(), *pose_acc]


@final
class _ParamSums:
    """The parameters' gradients summed over ``n`` chunks, in the layout's (widest) dtype.

    With one chunk its gradients are returned as ``autograd.grad`` gave them: no
    buffer, no copy. With more, the first chunk's are copied once into owned sums (they
    may be views of one another or of the coefficients, so they are never written) and
    each later chunk is added in place: one ``P``-sized sum beside one chunk's
    gradients, as a zeroed buffer would hold, and the same values (:math:`0 + g = g`).
    """

    def __init__(self, layout: ParamLayout, n: int) -> None:
        self.layout = layout
        self.n = n
        self.sums: list[Tensor] | None = None

    def add(self, grads: Sequence[Tensor]) -> None:
        """Add one chunk's gradients (one per parameter of the layout)."""
        dtype = self.layout.dtype
        if self.sums is not None:
            torch._foreach_add_(self.sums, list(grads))
        elif self.n > 1:
            self.sums = [g.to(dtype, copy=True) for g in grads]
        else:
            self.sums = [g if g.dtype == dtype else g.to(dtype) for g in grads]

    def result(self) -> list[Tensor]:
        """Each parameter's gradient in its own dtype (zeros when no chunk contributed)."""
        params = self.layout.params
        if self.sums is None:
            return [torch.zeros_like(p) for p in params]
        return [
            g if g.dtype == p.dtype else g.to(p.dtype)
            for g, p in zip(self.sums, params, strict=True)
        ]


@dataclass(frozen=True)
class _ChunkState:
    """What recompute needs to re-run a chunk as the forward ran it."""

    rng: list[RngState]
    autocast: AutocastState
    buffers: BufferLog
