r"""How stream runs the poses of a batch: which compounds span chunks, and the pieces run.

A compound whose poses all lie in one chunk is *deferred*: its chunk is re-run in the
backward, once :math:`\partial L/\partial G` is known, like recompute's. A compound whose
poses span chunks keeps running sums. :class:`Plan` says which is which and cuts the
chunks into pieces; :class:`Split` says whether a chunk of several compounds may run one
piece at a time, and then :func:`aligned_chunks` gives chunks that cut no compound of at
most a chunk's poses.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Sequence
from typing import final

import torch
from torch import Tensor

from combframe.core.batch import Segments
from combframe.core.strategies.chunk import Chunk
from combframe.core.strategies.per_sample import UPDATES_BUFFERS, PerSampleVerdicts, ragged
from combframe.core.strategies.replay import BufferSnapshot, RngState, undo_side_effects
from combframe.core.strategies.runner import PoseRunner, Poses

#: A piece of a chunk, ``(s, e, a, b)``: poses ``[s, e)``, of which ``[a, b)`` are
#: deferred and ``[s, a)`` and ``[b, e)`` belong to compounds that span chunks.
Piece = tuple[int, int, int, int]


@final
class Plan:
    """Which compounds span chunks, and the pieces of each chunk.

    Parameters
    ----------
    segments
        The compounds of the batch.
    chunks
        ``(start, stop)`` of each chunk run, in order, covering the batch's poses: a
        compound *spans* when it crosses a boundary between two of them.

    Attributes
    ----------
    spanning
        The segments of the compounds that span chunks alone, their poses one after
        another (what the running sums are kept for), with their priors.
    deferred
        ``(M,)``: whether each pose belongs to a deferred compound; None if none does.
    """

    def __init__(self, segments: Segments, chunks: Sequence[tuple[int, int]]) -> None:
        self.segments = segments
        starts, sizes = segments.starts, segments.sizes
        cuts = [e for _, e in chunks[:-1]]  # ascending
        self.spans = [
            (k := bisect.bisect_right(cuts, s)) < len(cuts) and cuts[k] < s + n
            for s, n in zip(starts, sizes, strict=True)
        ]
        ids = [c for c, spans in enumerate(self.spans) if spans]
        #: Each spanning compound's rank among them and its first pose in their list.
        self.rank: dict[int, tuple[int, int]] = {}
        for r, (c, first) in enumerate(
            zip(ids, itertools.accumulate((sizes[c] for c in ids), initial=0), strict=False)
        ):
            self.rank[c] = (r, first)
        device = segments.index.device
        self.spanning = segments  # every compound spans chunks: the batch's own
        self.deferred: Tensor | None = None
        if len(ids) < segments.count:
            flags = torch.tensor(self.spans, device=device)
            self.deferred = ~flags[segments.index]
            spanning = Segments.from_sizes([sizes[c] for c in ids], device)
            if segments.prior is not None:
                kept = segments.prior[~self.deferred]
                spanning = dataclasses.replace(spanning, prior=kept)
            self.spanning = spanning
        self.ids = torch.tensor(ids, dtype=torch.long, device=device)

    def pieces(self, chunks: list[tuple[int, int]], split: bool) -> list[Piece]:
        """Return the pieces of ``chunks``: whole, or (``split``) cut around the deferred."""
        owner, starts, sizes, spans = (
            self.segments.owner,
            self.segments.starts,
            self.segments.sizes,
            self.spans,
        )
        out: list[Piece] = []
        for s, e in chunks:
            first, last = owner[s], owner[e - 1]
            a = min(starts[first] + sizes[first], e) if spans[first] else s
            b = starts[last] if spans[last] and last != first else e
            if not split:
                out.append((s, e, a, b))
                continue
            out += [(s, a, a, a)] if a > s else []
            out += [(a, b, a, b)] if b > a else []
            out += [(b, e, e, e)] if e > b else []
        return out

    def where(self, first: int, last: int) -> tuple[int, int, int]:
        """Return where spanning poses ``first`` to ``last`` lie among the spanning poses.

        Their first's place, and the ranks of their first compound and one past their last.
        """
        owner, starts = self.segments.owner, self.segments.starts
        rank, place = self.rank[owner[first]]
        return place + first - starts[owner[first]], rank, self.rank[owner[last]][0] + 1


def aligned_chunks(sizes: Sequence[int], step: int) -> list[tuple[int, int]]:
    """Return chunks of at most ``step`` poses that cut no compound of at most ``step``.

    Greedily, a chunk takes whole compounds, in order, while they fit in ``step`` poses;
    a compound of more than ``step`` poses runs alone, cut into chunks of ``step`` poses
    (the last one shorter), and the compounds after it start a new chunk. Only for a
    model that treats the poses of a batch independently (:class:`Split`), whose
    predictions do not depend on which poses share a chunk.

    Parameters
    ----------
    sizes
        The number of poses of each compound, in order.
    step
        The chunk size, at least 1.

    Returns
    -------
    list of tuple of int
        ``(start, stop)`` of each chunk, covering ``sum(sizes)`` poses in order.

    Examples
    --------
    >>> aligned_chunks([3, 3, 3, 7, 2], 6)
    [(0, 6), (6, 9), (9, 15), (15, 16), (16, 18)]
    """
    out: list[tuple[int, int]] = []
    start = stop = 0  # the open chunk
    for n in sizes:
        if stop + n - start > step and stop > start:  # does not fit: close it
            out.append((start, stop))
            start = stop
        stop += n
        if n > step:  # alone, in chunks of step poses
            out += [(s, min(s + step, stop)) for s in range(start, stop, step)]
            start = stop
    return [*out, (start, stop)] if stop > start else out


@final
class Split:
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

    def pieces(self, chunks: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Return ``chunks`` split where a compound starts."""
        starts, owner, out = self.segments.starts, self.segments.owner, []
        for s, e in chunks:
            inside = starts[owner[s] + 1 : owner[e - 1] + 1]  # compounds that start in it
            out += list(itertools.pairwise([s, *inside, e]))
        return out

    def snapshot(self, piece: Piece) -> BufferSnapshot | None:
        """Return a snapshot before the chunk that decides.

        The first chunk of several compounds where one spans chunks (splitting it is
        what the verdict allows).
        """
        s, e, a, b = piece
        owner = self.segments.owner
        if self.known or owner[e - 1] == owner[s] or (a == s and b == e):
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
