r"""Chunks run in the forward without keeping their graph, re-run in the backward.

The one home of that machinery, used by recompute (every chunk) and by stream (the
chunks of compounds whose poses all lie in one chunk). :class:`Reruns` notes what a
re-run needs while the forward runs a chunk (its RNG state, the buffer values it
started from, the autocast state) and, in the backward, re-runs each chunk with a graph
and back-propagates it once with ``grad_outputs`` = its coefficients
:math:`c_i = \partial L/\partial y_i`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, final

import torch
from torch import Tensor

from combframe.core.gradients import ParamLayout
from combframe.core.strategies.chunk import Chunk
from combframe.core.strategies.replay import (
    AutocastState,
    BufferLog,
    RngState,
    module_buffers,
    stand_in_buffers,
    training,
)
from combframe.core.strategies.runner import PoseRunner, Poses
from combframe.errors import StrategyError


@final
class Reruns:
    """The chunks a backward re-runs, and what it needs to re-run them as the forward did.

    Parameters
    ----------
    runner
        The runner of the forward.
    poses
        The flat poses.
    strategy
        The strategy's name and repr, for messages: ``(name, how to opt out of check)``.
    check
        Compare every re-run prediction with the forward's (see ``Recompute``).
    """

    def __init__(
        self, runner: PoseRunner, poses: Poses, strategy: tuple[str, str], check: bool
    ) -> None:
        self.runner = runner
        self.poses: list[Any] = list(poses)
        self.strategy = strategy
        self.check = check
        #: ``(start, stop)`` of each chunk to re-run.
        self.chunks: list[tuple[int, int]] = []
        self.rng: list[RngState] = []
        self.logged: list[int] = []  # each chunk's entry in the buffer log
        self.autocast = AutocastState.capture(runner.device.type)
        self.log = BufferLog(module_buffers(runner.modules), by_value=training(runner.modules))
        #: The last chunk's graph, kept from the forward for the backward (or None).
        self.kept: Chunk | None = None
        self.preds = torch.zeros(0)
        self.deviation: list[tuple[int, int, Tensor]] = []

    def run(self, start: int, stop: int, run: Callable[[], Chunk], again: bool = True) -> Chunk:
        """Run poses ``[start, stop)`` in the forward by ``run()``, noting the buffers it wrote.

        With ``again`` the chunk is re-run in the backward: its RNG state is noted too.
        Every chunk of the forward passes here, so each re-run starts from the buffers
        as the chunks before it left them.
        """
        if again:
            previous = self.rng[-1] if self.rng else None
            self.rng.append(RngState.capture(self.runner.device, previous))
            self.chunks.append((start, stop))
            self.logged.append(len(self.log.chunks))
        self.log.start_chunk()
        chunk = run()
        self.log.end_chunk()
        return chunk

    def finish(self, preds: Tensor, kept: Chunk | None) -> None:
        """End the forward: ``preds`` are the ``(M,)`` predictions, ``kept`` the last chunk."""
        self.log.finish()
        self.preds = preds
        self.kept = kept

    def _rerun(self, k: int) -> Chunk:
        """Chunk ``k`` with a graph: kept from the forward, or re-run."""
        runner = self.runner
        if k == len(self.chunks) - 1 and self.kept is not None:
            kept, self.kept = self.kept, None  # used once; a second backward re-runs
            return kept
        s, e = self.chunks[k]
        stand_ins = self.log.before(self.logged[k])
        with (
            stand_in_buffers(runner.modules, stand_ins),
            self.rng[k].replay(runner.device),
            torch.enable_grad(),
            self.autocast.restore(),
        ):
            aliases = runner.aliases(s, e)
            pred = runner.predict(self.poses[s:e], s, aliases)
        runner.require_grad(
            pred,
            s,
            " (found when the backward re-ran it: the forward of "
            f"strategy={self.strategy[0]!r} ran it without a graph; no gradient has been "
            "written)",
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
        name, opt_out = self.strategy
        raise StrategyError(
            f"the backward re-ran poses {bad[:10]} and got different predictions than the "
            f"forward (for pose {bad[0]}: {self.preds[bad[0]].item()!r} in the forward): "
            "the model is not deterministic under the restored RNG state and buffers, so "
            f"{name} would return the gradients of another function. Likely causes: a "
            "private torch.Generator or another source of randomness that is not the global "
            "RNG, state the model changes outside its buffers, or the model changed between "
            "the forward and the backward (train()/eval(), a submodule replaced, an "
            "attribute its forward reads: change it after the backward). Use "
            f"strategy='store' (no re-run), or {opt_out} if the difference is "
            "known to be harmless"
        )

    def _order(self, coeffs: Tensor) -> tuple[list[int], set[int]]:
        """Return the chunks to re-run (the kept one first) and those only probed."""
        runner, chunks = self.runner, self.chunks
        # One host sync per backward: chunks whose c_i are all zero contribute nothing.
        nonzero = coeffs.reshape(coeffs.shape[0], -1).ne(0).any(1)  # (M,)
        ends = torch.tensor([(s, e) for s, e in chunks], device=nonzero.device).T
        counts = torch.nn.functional.pad(nonzero.cumsum(0), (1, 0))
        live = (counts[ends[1]] - counts[ends[0]]).gt(0).tolist()
        active = [k for k, on in enumerate(live) if on]
        # A skipped chunk still runs forward if it holds a pose tensor no graph has
        # reached yet: reached, the tensor gets a gradient of zeros, as in the full graph.
        inputs = runner.targets.pose_inputs
        unseen = {
            i for k, t in enumerate(inputs) if id(t) not in runner.used for i in runner.readers[k]
        }
        probe = {k for k, (s, e) in enumerate(chunks) if unseen and not live[k]}
        probe = {k for k in probe if unseen & {*range(*chunks[k])}}
        order = sorted([*active, *probe])
        if self.kept is not None and order and order[-1] == len(chunks) - 1:
            order = [order[-1], *order[:-1]]  # the kept graph first, then re-runs
        else:
            self.kept = None  # the last chunk contributes nothing: free its graph
        return order, probe

    def _probe_unreached(self, done: list[int]) -> None:
        """Run skipped chunks forward while a parameter is reached by no graph yet.

        A parameter that only poses of coefficient zero reach (a head for masked poses)
        gets a gradient of zeros, as in the full graph, not ``None``; the probes stop
        as soon as every parameter has been reached.
        """
        runner = self.runner
        used = runner.used
        unreached = [p for p in runner.targets.layout.params if id(p) not in used]
        for k in sorted(set(range(len(self.chunks))).difference(done)):
            if not unreached:
                return
            self._rerun(k)  # its graph is walked (the targets it reaches), then freed
            unreached = [p for p in unreached if id(p) not in used]

    def gradients(self, coeffs: Tensor) -> tuple[list[Tensor], list[Tensor | None]]:
        r"""Return :math:`\sum_i c_i\,\partial y_i/\partial x` over the chunks' poses.

        ``coeffs`` is ``(M,)`` or ``(M, d)``, for every pose (those of no chunk here are
        not read). Returns one gradient per parameter of the layout (in its widest dtype;
        zeros if no chunk contributes) and one gradient (or None) per pose tensor. Raises,
        before returning anything, if a re-run differs from the forward (``check``).
        """
        layout = self.runner.targets.layout
        pose_acc: list[Tensor | None] = [None] * len(self.runner.targets.pose_inputs)
        if not self.chunks:
            return _ParamSums(layout, 0).result(), pose_acc
        order, probe = self._order(coeffs)
        sums = _ParamSums(layout, len(order) - len(probe))
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
            self._probe_unreached(order)
            self._verify()
        finally:
            self.deviation = []
        return sums.result(), pose_acc


@final
class _ParamSums:
    """The parameters' gradients summed over ``n`` chunks, in the layout's (widest) dtype.

    With one chunk its gradients are kept as ``autograd.grad`` gave them: no buffer, no
    copy. With more, the first chunk's are copied once into owned sums (they may be views
    of one another or of the coefficients, so they are never written) and each later
    chunk is added in place: one ``P``-sized sum beside one chunk's gradients, as a
    zeroed buffer would hold, and the same values (:math:`0 + g = g`).
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
        """Return the sums (zeros in the layout's dtype when no chunk contributed)."""
        if self.sums is not None:
            return self.sums
        layout = self.layout
        return [torch.zeros(p.shape, dtype=layout.dtype, device=p.device) for p in layout.params]
