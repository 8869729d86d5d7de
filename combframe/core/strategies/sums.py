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
from combframe.segment import segment_max, segment_sum


@final
class Fold:
    """A chunk's weights, as :meth:`_StreamSums.update` returns them.

    Attributes
    ----------
    rows
        The ``(compound, feature)`` of each backward row.
    by_row
        ``(n, b)``: each row's weights on the chunk's poses (zero for other compounds'),
        made when first asked for.
    by_pose
        ``(b, k)``: each pose's weight on its compound's ``k`` sums.
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

    @torch.no_grad()
    def update(
        self,
        combination: StreamingCombination,
        segments: Segments,
        start: int,
        y: Tensor,
        lo: int,
        hi: int,
        local: Tensor,
    ) -> Fold:
        """Fold a chunk's predictions into the state; return its backward rows.

        The rows are every ``(compound, feature)`` of the chunk, with their ``(n, b)``
        weights (zero for another compound's poses).
        """
        # Compounds that start in this chunk (a contiguous range) take their first
        # prediction as centre; device-side indexing, so no host sync per chunk.
        first = lo if segments.starts[lo] >= start else lo + 1
        if first < hi:
            rows = segments.start_index[first:hi] - start
            self.center[first:hi] = y[rows]
        centers = self.center[lo:hi].clone()
        log_w, feats = combination.stream_terms(y, centers[local])
        log_w = _with_prior(log_w, segments, start)
        self._allocate(feats.shape[-1])
        old = self.running_max[lo:hi].clone()
        chunk_max = segment_max(log_w, local, hi - lo)
        new = torch.maximum(old, chunk_max)
        scale = torch.where(torch.isinf(old), torch.zeros_like(old), torch.exp(old - new))
        w = torch.exp(log_w - new[local]).nan_to_num(nan=0.0)  # 0 for masked poses
        self.total[lo:hi] = self.total[lo:hi] * scale + segment_sum(w, local, hi - lo)
        self.running_max[lo:hi] = new
        self.acc[lo:hi].mul_(scale.to(self.acc.dtype)[:, None, None])
        for (c, _), t in self.pose_acc.items():
            if lo <= c < hi:
                t.mul_(scale[c - lo].to(t.dtype))
        shift = getattr(combination, "stream_shift", None)
        if shift is not None:
            # Centre every compound on its best pose so far (no host sync: where the
            # best pose is not in this chunk the move is the identity).
            b = y.shape[0]
            position = torch.arange(b, device=y.device)
            best = torch.full((hi - lo,), b - 1, dtype=torch.long, device=y.device)
            best = best.scatter_reduce(
                0, local, torch.where(log_w == chunk_max[local], position, b - 1), reduce="amin"
            )
            moved = torch.where(chunk_max > old, y[best], centers)
            move = torch.vmap(shift)(centers, moved).to(self.exact)  # (n, k, k)
            self.acc[lo:hi] = torch.bmm(move.to(self.acc.dtype), self.acc[lo:hi])
            for (c, _), t in self.pose_acc.items():
                if lo <= c < hi:
                    t.copy_(torch.tensordot(move[c - lo].to(t.dtype), t, dims=1))
            feats = torch.bmm(move[local], feats.unsqueeze(-1)).squeeze(-1)
            self.center[lo:hi] = moved
        weights = w[:, None] * feats  # (b, k)
        mine = torch.nn.functional.one_hot(local, hi - lo).T.to(weights.dtype)  # (n, b)
        k = weights.shape[1]
        pairs = [(c, j) for c in range(lo, hi) for j in range(k)]
        n = (hi - lo) * k
        return Fold(pairs, lambda: (mine[:, None, :] * weights.T[None]).reshape(n, -1), weights)

    @torch.no_grad()
    def update_host(
        self, combination: StreamingCombination, segments: Segments, start: int, pred: Tensor
    ) -> Fold:
        """:meth:`update` on Python floats; rows whose weights are all zero are left out."""
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
        return Fold(rows, by_row, torch.tensor(by_pose, dtype=self.exact))

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
            self.total = torch.tensor(self.host_total, dtype=self.exact)
            self.center = torch.tensor(self.host_center, dtype=self.exact)

    def _allocate(self, features: int) -> None:
        """Allocate the sums once ``k`` is known, before the first backward (flat peak)."""
        if self.acc.numel() == 0:
            layout = self.targets.layout
            self.acc = torch.zeros(
                (self.count, features, layout.numel), dtype=layout.dtype, device=layout.device
            )

    def add_poses(self, segments: Segments, start: int, weights: Tensor, grads: Tensor) -> None:
        """Add each pose's own gradient (``(b, P)``), weighted (``(b, k)``), to its compound's sums.

        The poses from ``start`` on. One ``k x b_c`` by ``b_c x P`` product per compound
        of the chunk (never a dense compounds-by-poses one, nor a scaled copy of the
        gradients).
        """
        stop = start + grads.shape[0]
        weights = weights.to(grads.dtype)
        for c in range(segments.owner[start], segments.owner[stop - 1] + 1):
            first = max(segments.starts[c], start) - start
            last = min(segments.starts[c] + segments.sizes[c], stop) - start
            self.acc[c].addmm_(weights[first:last].T, grads[first:last])

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
    """Add the chunk's log prior weights (from pose ``start`` on) to its log weights."""
    if segments.prior is None:
        return log_w
    return log_w + segments.prior[start : start + log_w.shape[0]].to(log_w.dtype)
