"""The stream strategy: one pass, per-compound running sums of weighted gradients."""

from __future__ import annotations

import functools
from typing import final

import torch
from torch import Tensor
from typing_extensions import override

from combframe.core.batch import Segments
from combframe.core.combination import Combination, StreamingCombination
from combframe.core.gradients import PoseGradients, contract_rows
from combframe.core.strategies.base import Strategy, check_flag
from combframe.core.strategies.chunk import Chunk
from combframe.core.strategies.per_sample import PerSampleVerdicts
from combframe.core.strategies.pieces import Piece, Plan, Split, aligned_chunks
from combframe.core.strategies.rerun import Reruns
from combframe.core.strategies.runner import Collected, PoseRunner, Poses
from combframe.core.strategies.sums import Fold, _StreamSums
from combframe.core.strategies.terms import StreamTerms
from combframe.core.weights import combined_values
from combframe.errors import StrategyError


@final
class Stream(Strategy):
    r"""Single pass with flat memory: per-compound running sums of weighted gradients.

    The combination must implement
    :class:`~combframe.core.combination.StreamingCombination`. Exact for losses on the
    combined predictions; a loss on the per-pose predictions raises in backward.

    A compound whose poses all lie in one chunk keeps no sums: its chunk runs without a
    graph (the last one with a graph kept for the backward) and is re-run in the
    backward once :math:`\partial L/\partial G` is known, back-propagated once with
    :math:`c_i = \partial L/\partial y_i` from autograd through the combination on the
    detached predictions, built in the forward (as recompute does:
    :mod:`combframe.core.strategies.rerun`). The chunks are the runner's, or, once the
    model is known to treat the poses of a batch independently, chunks of whole
    compounds (:func:`~combframe.core.strategies.pieces.aligned_chunks`): then only a
    compound of more than ``chunk_size`` poses keeps sums.

    For each compound whose poses span chunks, with log weights :math:`a_i`, features
    :math:`\phi_i` (centred on the compound's first prediction) and running maximum
    :math:`m`, a chunk holding poses :math:`i \in B` of the compound updates, as the
    online softmax of FlashAttention,

    .. math::

        m' = \max(m, \max_{i \in B} a_i), \quad
        Z \leftarrow e^{m - m'} Z + \sum_{i \in B} e^{a_i - m'}, \quad
        A_j \leftarrow e^{m - m'} A_j
            + \frac{\partial}{\partial\theta} \sum_{i \in B} e^{a_i - m'} \phi_{ij}\, y_i ,

    the last term for every compound and feature of a chunk being one backward of the
    chunk's graph whose ``grad_outputs`` are those weights, one per compound and feature
    (``is_grads_batched`` was measured slower; see docs/bench/core.md); where the
    chunk's Jacobian has fewer rows than that (poses times values per pose; one pose per
    compound), the rows are its poses' own gradients, contracted with the weights.
    Every exponent is at most zero, so nothing overflows however widely the predictions
    are spread. The scalar bookkeeping is done in float64 whatever the model's dtype;
    only the ``k`` sums of ``P`` numbers per compound use the parameters' dtype. A model
    with a gradient hook on an activation is refused. With ``d`` values per pose the
    sums are taken along per-pose directions in output space, an online softmax per
    column for a column-wise combination (:mod:`combframe.core.strategies.terms`).

    Parameters
    ----------
    check
        Compare every chunk re-run in the backward with the forward and raise
        :class:`~combframe.StrategyError` before any gradient is returned if they differ,
        as ``Recompute(check=True)`` does. Pass ``False`` for a model known to be
        deterministic.
    """

    name = "stream"
    supports_pose_losses = False

    def __init__(self, check: bool = True) -> None:
        self.check = check_flag("Stream", check)
        self._verdicts = PerSampleVerdicts()

    @override
    def check_combination(self, combination: Combination) -> None:
        if not isinstance(combination, StreamingCombination):
            raise StrategyError(
                f"combination {combination.name!r} does not support strategy='stream' (it "
                "does not implement stream_terms/stream_coefficients); use strategy='store' "
                "or strategy='recompute'"
            )

    @override
    def collect(
        self, runner: PoseRunner, poses: Poses, segments: Segments, combination: Combination
    ) -> Collected:
        self.check_combination(combination)
        assert isinstance(combination, StreamingCombination)
        device = runner.device
        split = Split(self._verdicts, runner, poses, segments)
        # Poses known to be independent: chunks that cut no compound of at most a chunk
        chunks = (
            aligned_chunks(segments.sizes, runner.chunk_size)
            if split.allowed
            else runner.chunks(len(poses))
        )
        plan = Plan(segments, chunks)
        sums = _StreamSums(plan.spanning.count, _scalar_dtype(device), device)
        reruns = None
        if plan.deferred is not None:  # compounds inside one chunk: re-run in the backward
            reruns = Reruns(runner, poses, ("stream", "Stream(check=False)"), self.check)
        preds: list[Tensor] = []
        # On the CPU reading a scalar costs nothing, so the bookkeeping runs on Python
        # floats there and backward rows whose weights are all zero (a sharp smooth-min
        # far from the best pose) are skipped.
        host = _host_scalars(device) and not getattr(combination, "pools", False)
        plan_pieces = plan.pieces(chunks, split.allowed)
        kept: Chunk | None = None
        k = 0
        while k < len(plan_pieces):
            piece = plan_pieces[k]
            s, e, a, b = piece
            spanning = a > s or b < e
            # The last piece, deferred alone, runs with a graph kept for the backward
            # (a batch of one chunk: one forward and one backward in all).
            keep = not spanning and k == len(plan_pieces) - 1
            snapshot = split.snapshot(piece)
            run = functools.partial(self._run, runner, poses, s, e, spanning or keep)
            chunk = run() if reruns is None else reruns.run(s, e, run, again=b > a)
            kept = chunk if keep else None
            if sums.terms is None:
                sums.shape(StreamTerms(combination, runner.width or 1))
            if snapshot is not None and split.decide(chunk, snapshot):
                rest = [(p[0], p[1]) for p in plan_pieces[k + 1 :]]
                plan_pieces[k + 1 :] = plan.pieces(rest, True)
            y = chunk.pred.detach()
            preds.append(y)
            if spanning:
                sums.allocate(runner.targets)  # found by the first run with a graph
                self._fold(sums, plan, chunk, piece, combination if host else None)
            del chunk  # free before the next chunk's graph is built
            k += 1
        sums.finish()
        stacked = torch.cat(preds)
        if reruns is not None:
            reruns.finish(stacked, kept)
        source = _StreamedGradients(runner, sums, plan, reruns, (combination, stacked, segments))
        source.watch(runner.leaves)
        return stacked, source

    def _run(self, runner: PoseRunner, poses: Poses, start: int, stop: int, graph: bool) -> Chunk:
        """Run a piece; the first run with a graph finds the targets."""
        if graph and not runner.discovered:
            return self.first_chunk(runner, poses, start, stop)
        return runner.run_chunk(poses, start, stop, graph)

    def _fold(
        self,
        sums: _StreamSums,
        plan: Plan,
        chunk: Chunk,
        piece: Piece,
        host: StreamingCombination | None,
    ) -> None:
        """Fold a piece's poses of spanning compounds into their sums.

        ``host``: the combination, to keep the bookkeeping on Python floats (the CPU).
        """
        s, e, a, b = piece
        y = chunk.pred.detach()
        inside = None
        if b > a:  # a chunk run whole: its spanning poses only
            inside = torch.cat([torch.arange(0, a - s), torch.arange(b - s, e - s)])
            y = y[inside.to(y.device)]
        first, last = (s if a > s else b), (e - 1 if e > b else a - 1)
        start, lo, hi = plan.where(first, last)
        segs = plan.spanning
        if host is not None and y.dim() == 1:
            fold = sums.update_host(host, segs, start, y)
        else:
            local = segs.index[start : start + y.shape[0]] - lo
            fold = sums.update(segs, start, y, lo, hi, local)
        if fold.rows:
            self._add(sums, fold, chunk, segs, start, inside)

    @staticmethod
    def _add(
        sums: _StreamSums,
        fold: Fold,
        chunk: Chunk,
        segments: Segments,
        start: int,
        inside: Tensor | None = None,
    ) -> None:
        """Add a chunk's gradients to the sums of its compounds.

        ``inside``: the positions in the chunk of the poses folded (all when None).
        """
        y = chunk.pred
        if inside is not None:  # one backward per row, zero on the other poses
            rows = fold.by_row.to(y.dtype)
            full = rows.new_zeros((rows.shape[0], *y.shape))
            full[:, inside.to(y.device)] = rows
            sums.add_rows(fold.rows, *chunk.weighted_grads(full))
            return
        b, values = y.shape[0], y[0].numel()
        # One backward per row of sums, or per row of the chunk's Jacobian: the fewer.
        if b * values >= len(fold.rows):
            sums.add_rows(fold.rows, *chunk.weighted_grads(fold.by_row.to(y.dtype)))
            return
        # Fewer Jacobian rows than sums (one pose per compound): each pose's own gradient,
        # or its Jacobian's d rows (one pose of one value alone: the gradient, unweighted).
        eye = torch.eye(b * values, dtype=y.dtype, device=y.device).reshape(-1, *y.shape)
        per_pose, pose = chunk.weighted_grads(None if eye.shape[0] == 1 else eye)
        if pose:
            by_row = fold.by_row
            sums.add_rows(fold.rows, None, [(k, _contract(by_row, g)) for k, g in pose])
        sums.add_poses(segments, start, fold.by_pose, per_pose.reshape(b, values, -1))

    def __repr__(self) -> str:
        return f"Stream(check={self.check})"


def _contract(weights: Tensor, grads: Tensor) -> Tensor:
    """``(n, *y.shape)`` directions times the ``(y.numel(), *shape)`` gradients: ``(n, *shape)``."""
    dims = weights.dim() - 1
    out: Tensor = torch.tensordot(
        weights.to(grads.dtype), grads.reshape(*weights.shape[1:], -1), dims=dims
    )
    return out.reshape(weights.shape[0], *grads.shape[1:])


def _host_scalars(device: torch.device) -> bool:
    """Whether stream may read scalars on the host per chunk (no sync cost)."""
    return device.type == "cpu"


def _scalar_dtype(device: torch.device) -> torch.dtype:
    """float64 for per-pose scalars, except on devices without it (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


@final
class _StreamedGradients(PoseGradients):
    supports_pose_losses = Stream.supports_pose_losses
    strategy = "stream"

    def __init__(
        self,
        runner: PoseRunner,
        sums: _StreamSums,
        plan: Plan,
        reruns: Reruns | None,
        local: tuple[Combination, Tensor, Segments],
    ) -> None:
        super().__init__(runner.targets, runner.used)
        self.sums = sums
        self.terms: StreamTerms | None = sums.terms
        self.coefficients: Tensor | None = None
        self.ids = plan.ids  # the compounds that span chunks
        self.deferred = plan.deferred
        self.reruns = reruns
        #: The combination, the predictions and the segments, until ``settle``.
        self.local: tuple[Combination, Tensor, Segments] | None = local
        #: The detached predictions and the combined values made from them (deferred poses).
        self.graph: tuple[Tensor, Tensor] | None = None

    def contract(self, coeffs: Tensor) -> list[Tensor | None]:  # pragma: no cover - guarded
        raise StrategyError(
            "the 'stream' strategy keeps only running sums, so it cannot weight poses "
            "individually; use strategy='store' or strategy='recompute'"
        )

    @override
    def settle(self, combined: Tensor) -> None:
        # The coefficients Lambda(G) with the combination as the forward used it: a
        # hyperparameter changed before backward (a schedule step) must not change them.
        sums = self.sums
        if self.terms is not None and self.ids.numel():
            with torch.no_grad():
                exact = combined.detach()[self.ids].to(sums.exact)
                self.coefficients = self.terms.coefficients(exact, sums.center).to(sums.exact)
        self.terms = None
        local, self.local = self.local, None
        if self.reruns is None or local is None:
            return
        # The deferred poses' c_i = dL/dG dG/dy_i: autograd through the combination as
        # the forward ran it, on a copy of the predictions (its parameters get their
        # gradient through ``combined``, not from this graph).
        combination, preds, segments = local
        with torch.enable_grad():
            y = preds.detach().to(torch.promote_types(preds.dtype, self.layout.dtype))
            y.requires_grad_(True)
            self.graph = (y, combined_values(combination, y, segments))

    def contract_combined(self, comb_grad: Tensor) -> list[Tensor | None]:
        params, pose = self._deferred(comb_grad)  # re-runs first: they may refuse
        sums = self.sums
        if self.coefficients is None:  # every compound inside one chunk: no sums
            return [*params, *pose]
        lam = self.coefficients  # (C, G, k, d_out), C the spanning compounds
        g = comb_grad[self.ids].to(sums.exact).reshape(lam.shape[0], -1)  # (C, d_out)
        coeffs = (lam @ g[:, None, :, None]).squeeze(-1) / sums.total[:, :, None]
        coeffs = coeffs.reshape(lam.shape[0], -1)  # (C, R): one per running sum
        summed = list(self.layout.unflatten(contract_rows(coeffs, sums.acc)))
        if params:  # the deferred compounds' part, added in the layout's dtype
            torch._foreach_add_(
                summed, [p.to(s.dtype) for p, s in zip(params, summed, strict=True)]
            )
        for (c, slot), t in sums.pose_acc.items():
            got = contract_rows(coeffs[c], t)
            prev = pose[slot]
            pose[slot] = got if prev is None else prev + got
        return [*summed, *pose]

    def _deferred(self, comb_grad: Tensor) -> tuple[list[Tensor], list[Tensor | None]]:
        """Return the deferred poses' part: their chunks re-run, each with its c_i."""
        if self.reruns is None or self.graph is None or self.deferred is None:
            return [], [None] * len(self.targets.pose_inputs)
        y, combined = self.graph
        (c,) = torch.autograd.grad(combined, y, comb_grad.to(combined.dtype), retain_graph=True)
        c = c * self.deferred.reshape(-1, *(1,) * (c.dim() - 1)).to(c.dtype)
        return self.reruns.gradients(c)
