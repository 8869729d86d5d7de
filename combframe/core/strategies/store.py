"""The store strategy: each pose's gradient kept in one ``(M, P)`` buffer until backward."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import final

import torch
from torch import Tensor
from typing_extensions import override

from combframe.core.batch import Segments
from combframe.core.combination import Combination
from combframe.core.gradients import StoredGradients
from combframe.core.strategies.base import Strategy
from combframe.core.strategies.chunk import Chunk
from combframe.core.strategies.per_sample import (
    HIDDEN_PARAMETERS,
    UNDECIDED,
    UPDATES_BUFFERS,
    PerSampleVerdicts,
    Verdict,
    check_independent,
    hidden_parameters,
    obstacle,
    per_sample_chunks,
    preview,
    ragged,
)
from combframe.core.strategies.replay import BufferSnapshot
from combframe.core.strategies.runner import Collected, PoseRunner, Poses
from combframe.errors import CombframeError, CombinationError, StrategyWarning, user_stacklevel


@final
class Store(Strategy):
    """Store each pose's gradient in one preallocated ``(M, P)`` buffer.

    Costs M forward and backward passes plus one ``M x P`` matrix-vector product, and
    ``M * P`` numbers of memory between forward and backward. A model returning ``d``
    values per pose costs ``d`` backward passes per pose and ``M * d * P`` numbers (each
    pose's Jacobian).

    With ``chunk_size > 1`` per-pose gradients are per-sample gradients: they are
    computed for a whole chunk at once with :func:`torch.func.vmap` when the model can be
    vmapped over poses of one shape (the default collate, no pose tensor requiring grad,
    no parameter reached through a closure or a readout module, no randomness and no
    buffer updated in place). Otherwise store runs one pose per pass (each pose collated
    alone) and warns once per model with :class:`~combframe.errors.StrategyWarning`.

    A model with a gradient hook on an activation is refused (each pose's gradient is
    taken before the loss is known); hooks on parameters run once, on the total.
    """

    name = "store"

    def __init__(self) -> None:
        self._warned: set[int] = set()
        self._verdicts = PerSampleVerdicts()

    @override
    def collect(
        self, runner: PoseRunner, poses: Poses, segments: Segments, combination: Combination
    ) -> Collected:
        m = len(poses)
        chunked = runner.batched and m > 1
        known, verdict = (
            self._verdicts.get(runner, ragged(runner, 0, m)) if chunked else (True, None)
        )
        # The first step for a model checks, without a trace, that it treats the poses
        # of a batch independently (per-pose gradients assume it).
        first = preview(runner, poses) if chunked and not known else None
        snapshot = BufferSnapshot.of(runner.modules) if chunked else None
        with _one_pose_errors(runner, 0):
            chunk = self.first_chunk(runner, poses, 0, 1)
        targets = runner.targets
        layout = targets.layout
        width = runner.width or 1
        # (M, P), or (M, d, P) for d values per pose: each pose's Jacobian
        buffer = layout.new_buffer(m * width).view((m, width, -1) if width > 1 else (m, -1))
        rows = _PoseRows(runner, layout.device)
        self._warn_shared(runner, rows, buffer)
        preds = [chunk.pred.detach()]
        self._store(chunk, buffer, rows)
        del chunk
        start, compared = 1, m
        if snapshot is not None:
            mutated = bool(snapshot.changed())
            del snapshot
            if mutated:
                compared = 1  # pose 1 on starts from the buffers pose 0 left
            verdict, done = self._in_chunks(runner, poses, buffer, preds, mutated, verdict)
            start = m if done else 1
        for i in range(start, m):
            with _one_pose_errors(runner, i):
                chunk = runner.run_chunk(poses, i, i + 1)
                self._store(chunk, buffer, rows)
            preds.append(chunk.pred.detach())
            del chunk  # free before the next pose's graph is built
        if first is not None:
            check_independent(runner, torch.cat(preds), first, compared)
        if chunked:
            self._verdicts.set(runner, verdict, ragged(runner, 0, min(m, runner.chunk_size)))
        source = StoredGradients(targets, buffer, rows.pairs(), runner.used)
        source.watch(runner.leaves)
        return torch.cat(preds), source

    def _in_chunks(
        self,
        runner: PoseRunner,
        poses: Poses,
        buffer: Tensor,
        preds: list[Tensor],
        mutated: bool,
        verdict: Verdict,
    ) -> tuple[Verdict, bool]:
        """Fill the rows of poses 1 on by per-sample gradients of whole chunks, if possible.

        ``verdict``: what an earlier step decided for this model (see
        :class:`~combframe.core.strategies.per_sample.PerSampleVerdicts`). Returns the
        verdict now and whether it filled the rows; otherwise it warns why (once per
        model) and leaves ``preds`` holding pose 0's prediction only.
        """
        reason = obstacle(runner) or (UPDATES_BUFFERS if mutated else None)
        if reason is None and verdict in (None, UNDECIDED):
            compare = verdict is UNDECIDED
            if compare and hidden_parameters(runner, poses[0]):
                verdict = HIDDEN_PARAMETERS
            else:
                try:
                    verdict = per_sample_chunks(runner, poses, buffer, preds, compare)
                except Exception as exc:  # not vmappable: fall back for the rest
                    verdict = f"torch.func.vmap failed ({type(exc).__name__}: {exc})"
        reason = reason or verdict
        if reason is None:
            return verdict, True
        del preds[1:]  # whatever the attempt computed is dropped; it wrote no buffer
        self._warn(runner, reason)
        return verdict, False

    @staticmethod
    def _store(chunk: Chunk, buffer: Tensor, rows: _PoseRows) -> None:
        if chunk.pred.dim() == 2:  # d values: the d rows of the pose's Jacobian
            d = chunk.pred.shape[1]
            eye = torch.eye(d, dtype=chunk.pred.dtype, device=chunk.pred.device)
            jacobian, pose = chunk.weighted_grads(eye.view(d, 1, d))
            buffer[chunk.start].copy_(jacobian)
            rows.write(chunk.start, pose)
            return
        params, grads = chunk.grads()
        chunk.runner.targets.layout.flatten_into(params, buffer[chunk.start])
        rows.write(chunk.start, grads)

    def _warn_shared(self, runner: PoseRunner, rows: _PoseRows, buffer: Tensor) -> None:
        """Warn once per model when copies of shared pose tensors' gradients dominate."""
        shared = rows.shared_bytes()
        if shared <= max(buffer.numel() * buffer.element_size(), 1 << 20):
            return
        key = -id(runner.model)
        if key in self._warned:
            return
        self._warned.add(key)
        warnings.warn(
            f"strategy='store' keeps each pose's gradient with respect to the pose tensors "
            f"that several poses share: {shared / 2**20:.1f} MiB until backward, more than "
            "the per-pose gradients of the parameters. Each pose's coefficient is known "
            "only in backward, so store cannot sum them as they come; strategy="
            "'recompute' or 'stream' keep one copy",
            StrategyWarning,
            stacklevel=user_stacklevel(),
        )

    def _warn(self, runner: PoseRunner, reason: str) -> None:
        if id(runner.model) in self._warned:
            return
        self._warned.add(id(runner.model))
        warnings.warn(
            f"strategy='store' with chunk_size={runner.chunk_size} runs one pose per pass "
            f"for this model: {reason}. Per-pose gradients of a chunk need a model that "
            "torch.func.vmap can map over poses of one shape. strategy='recompute' or "
            "'stream' run whole chunks for any model.",
            StrategyWarning,
            stacklevel=user_stacklevel(),
        )


@final
class _PoseRows:
    """Each pose's gradients with respect to the pose tensors it holds, stacked per tensor.

    One ``(k, *shape)`` tensor per pose tensor held by ``k`` poses, allocated once and
    written as the poses run (never a list of gradients stacked again at the end).
    """

    def __init__(self, runner: PoseRunner, device: torch.device) -> None:
        inputs = runner.targets.pose_inputs
        rows = () if (runner.width or 1) == 1 else (runner.width,)  # a Jacobian's d rows
        self.index = [torch.tensor(r, dtype=torch.long, device=device) for r in runner.readers]
        self.row = [{i: k for k, i in enumerate(r)} for r in runner.readers]
        self.stacked = [
            torch.empty((len(r), *rows, *t.shape), dtype=t.dtype, device=t.device)
            for r, t in zip(runner.readers, inputs, strict=True)
        ]

    def write(self, i: int, pose: Sequence[tuple[int, Tensor]]) -> None:
        """Write pose ``i``'s gradients (``(slot, gradient)`` pairs)."""
        for slot, g in pose:
            self.stacked[slot][self.row[slot][i]] = g.detach()

    def shared_bytes(self) -> int:
        """Bytes held for pose tensors that more than one pose holds."""
        return sum(t.numel() * t.element_size() for t in self.stacked if t.shape[0] > 1)

    def pairs(self) -> list[tuple[Tensor, Tensor]]:
        """``(poses, stacked gradients)`` per pose tensor, as StoredGradients takes them."""
        return list(zip(self.index, self.stacked, strict=True))


@contextlib.contextmanager
def _one_pose_errors(runner: PoseRunner, index: int) -> Iterator[None]:
    """Say why store ran a pose alone when the model fails on a batch of one."""
    try:
        yield
    except CombframeError:  # already says what is wrong (a refused hook, a bad prediction)
        raise
    except Exception as exc:
        if not runner.batched:
            raise
        raise CombinationError(
            f"strategy='store' runs pose {index} alone to get its own gradient, and the "
            f"model failed on that batch of one ({type(exc).__name__}: {exc}). A model "
            "that needs several poses per batch (batch norm in training mode) cannot give "
            "per-pose gradients; use strategy='recompute' or 'stream', which run whole chunks"
        ) from exc
