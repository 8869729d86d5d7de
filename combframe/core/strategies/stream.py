"""The stream strategy: one pass, per-compound running sums of weighted gradients."""

from __future__ import annotations

import itertools
from typing import final

import torch
from torch import Tensor
from typing_extensions import override

from combframe.core.batch import Segments
from combframe.core.combination import Combination, StreamingCombination
from combframe.core.gradients import PoseGradients, contract_rows
from combframe.core.strategies.base import Strategy
from combframe.core.strategies.chunk import Chunk
from combframe.core.strategies.per_sample import UPDATES_BUFFERS, PerSampleVerdicts, ragged
from combframe.core.strategies.replay import BufferSnapshot, RngState, undo_side_effects
from combframe.core.strategies.runner import Collected, PoseRunner, Poses
from combframe.core.strategies.sums import Fold, _StreamSums
from combframe.core.strategies.terms import StreamTerms
from combframe.errors import StrategyError


@final
class Stream(Strategy):
    r"""Single pass with flat memory: per-compound running sums of weighted gradients.

    The combination must implement
    :class:`~combframe.core.combination.StreamingCombination`. Exact for losses on the
    combined predictions; a loss on the per-pose predictions raises in backward.

    For each compound, with log weights :math:`a_i`, features :math:`\phi_i` (centred on
    the compound's first prediction) and running maximum :math:`m`, a chunk holding poses
    :math:`i \in B` of the compound updates, as the online softmax of FlashAttention,

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
    """

    name = "stream"
    supports_pose_losses = False

    def __init__(self) -> None:
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
        sums = _StreamSums(segments.count, _scalar_dtype(device), device)
        preds: list[Tensor] = []
        # On the CPU reading a scalar costs nothing, so the bookkeeping runs on Python
        # floats there and backward rows whose weights are all zero (a sharp smooth-min
        # far from the best pose) are skipped.
        on_host = _host_scalars(device)
        split = _Split(self._verdicts, runner, poses, segments)
        plan = split.plan()
        k = 0
        while k < len(plan):
            s, e = plan[k]
            lo, hi = segments.owner[s], segments.owner[e - 1] + 1
            snapshot = split.snapshot(s, e)
            chunk = (
                self.first_chunk(runner, poses, s, e) if k == 0 else runner.run_chunk(poses, s, e)
            )
            if k == 0:
                sums.allocate(runner.targets)
                sums.shape(StreamTerms(combination, runner.width or 1))
            if snapshot is not None and split.decide(chunk, snapshot):
                plan[k + 1 :] = split.pieces(plan[k + 1 :])
            y = chunk.pred.detach()
            preds.append(y)
            if on_host and y.dim() == 1 and not getattr(combination, "pools", False):
                fold = sums.update_host(combination, segments, s, y)
            else:
                fold = sums.update(segments, s, y, lo, hi, segments.index[s:e] - lo)
            if fold.rows:
                self._add(sums, fold, chunk, segments, s)
            del chunk  # free before the next chunk's graph is built
            k += 1
        sums.finish()
        source = _StreamedGradients(sums, runner.used)
        source.watch(runner.leaves)
        return torch.cat(preds), source

    @staticmethod
    def _add(sums: _StreamSums, fold: Fold, chunk: Chunk, segments: Segments, start: int) -> None:
        """Add a chunk's gradients to the sums of its compounds."""
        y = chunk.pred
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
        return "Stream()"


@final
class _Split:
    """Whether chunks of several compounds may run one compound at a time.

    A chunk of ``n`` compounds needs ``n k`` weighted sums of its poses' gradients: one
    backward of the whole chunk each, or one backward of each compound's poses. The
    second is allowed for a model that treats the poses of a batch independently: the
    first chunk of several compounds run whole (with a graph) and one compound at a time
    (without, leaving no trace) must give the same predictions, draw no random numbers
    and write no buffer. Decided on the first step for a model, kept with its structure
    (:class:`~combframe.core.strategies.per_sample.PerSampleVerdicts`).
    """

    def __init__(
        self, verdicts: PerSampleVerdicts, runner: PoseRunner, poses: Poses, segments: Segments
    ) -> None:
        self.verdicts = verdicts
        self.runner = runner
        self.poses = poses
        self.segments = segments
        self.known, verdict = verdicts.get(runner, ragged(runner, 0, len(poses)))
        self.allowed = self.known and verdict is None

    def plan(self) -> list[tuple[int, int]]:
        """Return the chunks to run: the runner's, split at compounds when allowed."""
        chunks = self.runner.chunks(len(self.poses))
        return self.pieces(chunks) if self.allowed else chunks

    def pieces(self, chunks: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Return ``chunks`` split where a compound starts."""
        starts, owner, out = self.segments.starts, self.segments.owner, []
        for s, e in chunks:
            inside = starts[owner[s] + 1 : owner[e - 1] + 1]  # compounds that start in it
            out += list(itertools.pairwise([s, *inside, e]))
        return out

    def snapshot(self, start: int, stop: int) -> BufferSnapshot | None:
        """Return a snapshot before the chunk that decides (the first of several compounds)."""
        owner = self.segments.owner
        if self.known or owner[stop - 1] == owner[start]:
            return None
        return BufferSnapshot.of(self.runner.modules)

    def decide(self, chunk: Chunk, snapshot: BufferSnapshot) -> bool:
        """Decide on ``chunk`` (run whole); return whether later chunks may be split."""
        runner, verdict = self.runner, None
        if snapshot.changed():
            verdict = UPDATES_BUFFERS
        else:
            with undo_side_effects(runner.modules, runner.device), torch.no_grad():
                drawn = RngState.capture(runner.device)
                alone = [
                    runner.predict(self.poses[s:e], s)
                    for s, e in self.pieces([(chunk.start, chunk.stop)])
                ]
                if RngState.capture(runner.device, drawn) is not drawn:
                    verdict = "the model draws random numbers"
            want = chunk.pred.detach()
            got = torch.cat(alone).to(want.dtype)
            tol = max(1e3 * torch.finfo(want.dtype).eps, 1e-9)
            if verdict is None and not bool(
                ((got - want).abs() <= tol * want.abs().clamp_min(1.0)).all()
            ):
                verdict = "the model mixes the poses of a batch"
        seen = ragged(runner, chunk.start, chunk.stop)
        self.verdicts.set(runner, verdict, seen)
        # decided on poses of one shape: later chunks of other shapes are not covered
        self.known = True
        self.allowed = verdict is None and (seen or not ragged(runner, 0, len(self.poses)))
        return self.allowed


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

    def __init__(self, sums: _StreamSums, used: set[int]) -> None:
        super().__init__(sums.targets, used)
        self.sums = sums
        self.terms: StreamTerms | None = sums.terms
        self.coefficients: Tensor | None = None

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
        assert self.terms is not None, "settle is called once, by the forward"
        with torch.no_grad():
            exact = combined.detach().to(sums.exact)
            self.coefficients = self.terms.coefficients(exact, sums.center).to(sums.exact)
        self.terms = None

    def contract_combined(self, comb_grad: Tensor) -> list[Tensor | None]:
        sums = self.sums
        assert self.coefficients is not None, "settle runs in the forward, before any backward"
        lam = self.coefficients  # (C, G, k, d_out)
        g = comb_grad.to(sums.exact).reshape(lam.shape[0], -1)  # (C, d_out)
        coeffs = (lam @ g[:, None, :, None]).squeeze(-1) / sums.total[:, :, None]
        coeffs = coeffs.reshape(lam.shape[0], -1)  # (C, R): one per running sum
        grads: list[Tensor | None] = list(self.layout.unflatten(contract_rows(coeffs, sums.acc)))
        pose: list[Tensor | None] = [None] * len(self.targets.pose_inputs)
        for (c, slot), t in sums.pose_acc.items():
            got = contract_rows(coeffs[c], t)
            prev = pose[slot]
            pose[slot] = got if prev is None else prev + got
        return grads + pose
