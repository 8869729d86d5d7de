"""A chunk of poses run with a graph: what a strategy asks of it (its gradients)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, final

import torch
from torch import Tensor

from combframe.errors import StrategyError

if TYPE_CHECKING:
    from combframe.core.strategies.runner import PoseRunner

#: Stand-ins of the pose tensors that require grad, by id of the pose tensor.
Aliases = dict[int, Tensor]


@final
@dataclass(frozen=True, slots=True)
class Chunk:
    """A chunk of poses run by :meth:`PoseRunner.run_chunk`: what a strategy asks of it.

    ``start`` is the index of its first pose in the flat list, ``pred`` the ``(b,)``
    predictions (with a graph when run with one), ``aliases`` the stand-ins of the pose
    tensors that require grad, by id of the pose tensor.
    """

    runner: PoseRunner
    start: int
    pred: Tensor
    aliases: Aliases

    @property
    def stop(self) -> int:
        """One past the index of its last pose."""
        return self.start + self.pred.shape[0]

    def grads(
        self, weights: Tensor | None = None, retain: bool = False
    ) -> tuple[Sequence[Tensor], list[tuple[int, Tensor]]]:
        """Return the gradients of the predictions (weighted sum) w.r.t. every target."""
        with torch.enable_grad():
            return self.runner.grads(self.pred, self.aliases, weights, retain)

    def weighted_grads(self, weights: Tensor | None) -> tuple[Tensor, list[tuple[int, Tensor]]]:
        """Return the gradients of ``n`` weightings of the predictions, one backward each.

        ``weights`` is ``(n, *pred.shape)`` (``None``: one, of their sum). Returns the
        parameters' ``(n, P)`` and ``(slot, (n, *shape))`` per pose tensor: with the
        one-hot directions of a ``(1, d)`` prediction, the rows of its Jacobian.
        """
        layout = self.runner.targets.layout
        rows = 1 if weights is None else weights.shape[0]
        flat = layout.new_buffer(rows)
        pose: dict[int, list[Tensor]] = {}
        for r in range(rows):
            try:
                params, got = self.grads(
                    None if weights is None else weights[r], retain=r < rows - 1
                )
            except RuntimeError as exc:
                # torch's message for a compiled backward that frees its saved tensors
                if "donated buffers" not in str(exc):
                    raise
                raise StrategyError(
                    f"this step back-propagates one chunk {rows} times (stream: once per "
                    "running sum of a compound whose poses span chunks; store: once per "
                    "value of a vector prediction), but the model's backward allows one "
                    "pass: it was compiled with torch.compile, whose backward frees its "
                    "saved tensors (donated buffers). Set "
                    "torch._functorch.config.donated_buffer = False before the first call "
                    "of the compiled model, or use strategy='recompute', which "
                    "back-propagates each chunk once"
                ) from exc
            layout.flatten_into(params, flat[r])
            for slot, g in got:
                pose.setdefault(slot, []).append(g)
        return flat, [(slot, torch.stack(g)) for slot, g in pose.items()]
