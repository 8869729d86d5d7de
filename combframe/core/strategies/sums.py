"""Stream's running sums: the per-compound online-softmax state, on tensors or floats."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import final

import torch
from torch import Tensor

from combframe.core.batch import Segments
from combframe.core.combination import StreamingCombination
from combframe.core.gradients import GradTargets, ParamLayout
from combframe.core.strategies.terms import StreamTerms
from combframe.segment import segment_max, segment_sum, with_prior


@final
class Fold:
    """A chunk's weights, as :meth:`_StreamSums.update` returns them.

    Attributes
    ----------
    rows
        The ``(compound, feature)`` of each backward row.
    by_row
        ``(n, *y.shape)``: each row's direction on the chunk's predictions (zero on
        other compounds' poses), made when first asked for.
    by_pose
        ``(b, R, d)``: each pose's direction for each of its compound's ``R`` sums.
    """

    def __init__(
        self, rows: list[tuple[int, int]], by_row: Callable[[], Tensor], by_pose: Tensor
    ) -> None:
        self.rows = rows
        self._by_row = by_row
        self.by_pose = by_pose

    @functools.cached_property
    def by_row(self) -> Tensor:
        """``(n, b)``: each row's weights on the chunk's poses."""
        return self._by_row()


@final
class _StreamSums:
    """The per-compound online-softmax state of the stream strategy."""

    def __init__(self, count: int, exact: torch.dtype, device: torch.device) -> None:
        self.count = count
        self.exact = exact
        self.running_max = torch.full((count,), float("-inf"), dtype=exact, device=device)
        self.total = torch.zeros(count, dtype=exact, device=device)
        self.center = torch.zeros(count, dtype=exact, device=device)
        #: The combination's terms for this call (:meth:`shape`, after the first chunk).
        self.terms: StreamTerms | None = None
        # the same state as Python floats, for the CPU's host bookkeeping
        self.host_max = [-math.inf] * count
        self.host_total = [0.0] * count
        self.host_center = [0.0] * count
        self.on_host = False
        self.targets = GradTargets(ParamLayout(()))
        self.acc = torch.zeros(0)
        self.pose_acc: dict[tuple[int, int], Tensor] = {}

    def allocate(self, targets: GradTargets) -> None:
        """Fix the targets (known once the first chunk's graph was walked)."""
        self.targets = targets

    def shape(self, terms: StreamTerms) -> None:
        """Size the state for ``G`` groups and ``d`` values per pose (known after a chunk)."""
        exact, device, count = self.exact, self.running_max.device, self.count
        self.terms = terms
        self.running_max = torch.full((count, terms.groups), -torch.inf, dtype=exact, device=device)
        self.total = torch.zeros((count, terms.groups), dtype=exact, device=device)
        self.center = torch.zeros((count, terms.width), dtype=exact, device=device)

    @torch.no_grad()
    def update(
        self, segments: Segments, start: int, y: Tensor, lo: int, hi: int, local: Tensor
    ) -> Fold:
        """Fold a chunk's predictions into the state; return its backward rows.

        The rows are every ``(compound, group x feature)`` of the chunk, with their
        ``(n, *y.shape)`` directions (zero on another compound's poses).
        """
        terms, b, n = self.terms, y.shape[0], hi - lo
        assert terms is not None, "shape() runs after the first chunk, before any update"
        values = y.reshape(b, -1).to(self.exact)  # (b, d)
        # Compounds that start in this chunk (a contiguous range) take their first
        # prediction as centre; device-side indexing, so no host sync per chunk.
        first = lo if segments.starts[lo] >= start else lo + 1
        if first < hi:
            self.center[first:hi] = values[segments.start_index[first:hi] - start]
        centers = self.center[lo:hi].clone()  # (n, d)
        log_w, dirs = terms.terms(y, centers[local])  # (b, G), (b, G, k, d)
        log_w = _with_prior(log_w.to(self.exact), segments, start)
        groups, k = dirs.shape[1], dirs.shape[2]
        self._allocate(groups * k)
        old = self.running_max[lo:hi].clone()
        chunk_max = segment_max(log_w, local, n)
        new = torch.maximum(old, chunk_max)
        scale = torch.where(torch.isinf(old), torch.zeros_like(old), torch.exp(old - new))
        w = torch.exp(log_w - new[local]).nan_to_num(nan=0.0)  # 0 for masked poses
        self.total[lo:hi] = self.total[lo:hi] * scale + segment_sum(w, local, n)
        self.running_max[lo:hi] = new
        self._rescale(lo, hi, scale.repeat_interleave(k, dim=1))
        if terms.shifts:
            # Centre every compound (every column's group) on its best pose so far (no
            # host sync: where the best pose is not in this chunk the move is the identity).
            position = torch.arange(b, device=y.device)[:, None].expand(b, groups)
            best = torch.full((n, groups), b - 1, dtype=torch.long, device=y.device)
            best = best.scatter_reduce(
                0,
                local[:, None].expand(b, groups),
                torch.where(log_w == chunk_max[local], position, b - 1),
                reduce="amin",
            )
            moved = values.gather(0, best.expand(n, terms.width))
            ahead = (chunk_max > old).expand(n, terms.width)
            moved = torch.where(ahead, moved, centers)
            move = terms.shift(centers, moved).to(self.exact)  # (n, G, k, k)
            self._move_rows(lo, hi, move)
            dirs = move[local].to(dirs.dtype) @ dirs
            self.center[lo:hi] = moved
        weights = (w[:, :, None, None].to(dirs.dtype) * dirs).reshape(b, groups * k, -1)
        mine = torch.nn.functional.one_hot(local, n).T.to(weights.dtype)  # (n, b)
        rows = groups * k
        pairs = [(c, j) for c in range(lo, hi) for j in range(rows)]
        shape = (n * rows, *y.shape)

        def by_row() -> Tensor:
            return (mine[:, None, :, None] * weights.transpose(0, 1)[None]).reshape(shape)

        return Fold(pairs, by_row, weights)

    def _rescale(self, lo: int, hi: int, scale: Tensor) -> None:
        """Multiply the sums of compounds ``lo..hi-1`` by their rows' ``(n, R)`` scales."""
        self.acc[lo:hi].mul_(scale.to(self.acc.dtype)[:, :, None])
        for (c, _), t in self.pose_acc.items():
            if lo <= c < hi:
                t.mul_(scale[c - lo].to(t.dtype).reshape(-1, *(1,) * (t.dim() - 1)))

    def _move_rows(self, lo: int, hi: int, move: Tensor) -> None:
        """Re-express compounds ``lo..hi-1``'s sums for new centres: per group, ``A <- M A``."""
        n, groups, k = move.shape[:3]
        acc = self.acc[lo:hi].view(n, groups, k, -1)
        self.acc[lo:hi] = (move.to(acc.dtype) @ acc).reshape(n, groups * k, -1)
        for (c, _), t in self.pose_acc.items():
            if lo <= c < hi:
                rows = t.reshape(groups, k, -1)
                t.copy_((move[c - lo].to(t.dtype) @ rows).reshape(t.shape))

    @torch.no_grad()
    def update_host(
        self, combination: StreamingCombination, segments: Segments, start: int, pred: Tensor
    ) -> Fold:
        """:meth:`update` on Python floats; rows whose weights are all zero are left out.

        For one value per pose and a combination that does not pool.
        """
        self.on_host = True
        y = pred.to(self.exact)
        values = y.tolist()
        owners = segments.owner[start : start + len(values)]
        for c in range(owners[0], owners[-1] + 1):
            if start <= segments.starts[c]:
                self.host_center[c] = values[segments.starts[c] - start]
        centers = torch.tensor([self.host_center[o] for o in owners], dtype=self.exact)
        log_w, feats = combination.stream_terms(y, centers)
        log_w = _with_prior(log_w, segments, start)
        self._allocate(feats.shape[-1])
        logs, phis = log_w.tolist(), feats.tolist()
        shift = getattr(combination, "stream_shift", None)
        rows: list[tuple[int, int]] = []
        weights: list[list[float]] = []
        by_pose = [[0.0] * len(phis[0]) for _ in values]
        for c in range(owners[0], owners[-1] + 1):
            mine = [i for i, o in enumerate(owners) if o == c]
            best = max(mine, key=lambda i: logs[i])
            old = self.host_max[c]
            new = max(old, logs[best])
            scale = math.exp(old - new) if old > -math.inf else 0.0
            if scale != 1.0 and old > -math.inf:  # a compound's first poses: its sums are 0
                self._scale(c, scale)
            features = [phis[i] for i in mine]
            if shift is not None and logs[best] > old and values[best] != self.host_center[c]:
                # The best pose so far is in this chunk: centre the features on it.
                move = shift(
                    torch.tensor(self.host_center[c], dtype=self.exact),
                    torch.tensor(values[best], dtype=self.exact),
                ).to(self.exact)
                self._move(c, move)
                features = (torch.tensor(features, dtype=self.exact) @ move.T).tolist()
                self.host_center[c] = values[best]
            w = [math.exp(logs[i] - new) if logs[i] > -math.inf else 0.0 for i in mine]
            self.host_total[c] = self.host_total[c] * scale + math.fsum(w)
            self.host_max[c] = new
            for j in range(len(features[0])):
                row = [0.0] * len(values)
                for i, wi, f in zip(mine, w, features, strict=True):
                    row[i] = by_pose[i][j] = wi * f[j]
                if any(row):
                    rows.append((c, j))
                    weights.append(row)
        shape = (len(rows), len(values))
        by_row = lambda: torch.tensor(weights, dtype=self.exact).reshape(shape)  # noqa: E731
        return Fold(rows, by_row, torch.tensor(by_pose, dtype=self.exact)[:, :, None])

    def _scale(self, c: int, scale: float | Tensor) -> None:
        """Multiply compound ``c``'s sums by ``scale`` (a new running maximum)."""
        self.acc[c].mul_(scale)
        for (owner, _), t in self.pose_acc.items():
            if owner == c:
                t.mul_(scale)

    def _move(self, c: int, move: Tensor) -> None:
        """Re-express compound ``c``'s sums for a new centre: ``A <- M A`` (k x k)."""
        self.acc[c] = move.to(self.acc.dtype) @ self.acc[c]
        for (owner, _), t in self.pose_acc.items():
            if owner == c:
                t.copy_(torch.tensordot(move.to(t.dtype), t, dims=1))

    def finish(self) -> None:
        """Bring the host bookkeeping into the tensors the backward reads."""
        if self.on_host:
            self.total = torch.tensor(self.host_total, dtype=self.exact)[:, None]
            self.center = torch.tensor(self.host_center, dtype=self.exact)[:, None]

    def _allocate(self, features: int) -> None:
        """Allocate the sums once ``k`` is known, before the first backward (flat peak)."""
        if self.acc.numel() == 0:
            layout = self.targets.layout
            self.acc = torch.zeros(
                (self.count, features, layout.numel), dtype=layout.dtype, device=layout.device
            )

    def add_poses(self, segments: Segments, start: int, weights: Tensor, grads: Tensor) -> None:
        """Add each pose's own Jacobian (``(b, d, P)``), along its ``(b, R, d)`` directions.

        The poses from ``start`` on, to their compounds' ``R`` sums. One contraction over
        the ``b_c`` poses and ``d`` values per compound of the chunk (never a dense
        compounds-by-poses one, nor a scaled copy of the gradients).
        """
        stop = start + grads.shape[0]
        weights = weights.to(grads.dtype)
        for c in range(segments.owner[start], segments.owner[stop - 1] + 1):
            first = max(segments.starts[c], start) - start
            last = min(segments.starts[c] + segments.sizes[c], stop) - start
            mine = weights[first:last].transpose(0, 1)  # (R, b_c, d)
            self.acc[c].add_(torch.tensordot(mine, grads[first:last], dims=2))

    def add_rows(
        self, rows: list[tuple[int, int]], flat: Tensor | None, pose: list[tuple[int, Tensor]]
    ) -> None:
        """Add one backward's gradients, row ``n`` to the sums of ``rows[n]`` (compound, feature).

        ``flat`` is ``(n, P)`` (or None: the parameters' are added otherwise); ``pose``
        holds ``(slot, (n, *shape))`` per pose tensor.
        """
        k = self.acc.shape[1]
        acc = self.acc.view(-1, self.acc.shape[-1])
        (c0, j0), (c1, j1) = rows[0], rows[-1]
        if flat is None or not flat.shape[1]:
            pass
        elif len(rows) == (c1 - c0) * k + j1 - j0 + 1:  # consecutive rows
            acc[c0 * k + j0 : c1 * k + j1 + 1].add_(flat)
        else:
            index = torch.tensor([c * k + j for c, j in rows], device=acc.device)
            acc.index_add_(0, index, flat)
        for slot, g in pose:
            for n, (c, j) in enumerate(rows):
                key = (c, slot)
                if key not in self.pose_acc:
                    self.pose_acc[key] = g.new_zeros((k, *g.shape[1:]))
                self.pose_acc[key][j].add_(g[n])


def _with_prior(log_w: Tensor, segments: Segments, start: int) -> Tensor:
    """Add the chunk's log prior weights (from pose ``start`` on) to its log weights.

    ``log_w`` is ``(b,)`` or ``(b, G)``: the prior counts in every group.
    """
    if segments.prior is None:
        return log_w
    return with_prior(log_w, segments.prior[start : start + log_w.shape[0]].to(log_w.dtype))
