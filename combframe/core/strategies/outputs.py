"""The shape of the model's outputs: one value per pose, or a vector of ``d``."""

from __future__ import annotations

from typing import final

from torch import Tensor

from combframe.errors import CombinationError


def what(start: int, b: int) -> str:
    """Name pose ``start`` or the chunk of ``b`` poses from it, for messages."""
    return f"pose {start}" if b == 1 else f"the chunk of poses {start}..{start + b - 1}"


@final
class OutputShape:
    """Checks each chunk's output and keeps ``d``, the values per pose, for the call.

    Attributes
    ----------
    width
        ``d`` (1 for one value per pose), ``None`` until a chunk ran.
    first
        The first pose of the chunk that gave it, for messages.
    """

    def __init__(self) -> None:
        self.width: int | None = None
        self.first = 0

    def check(self, out: Tensor, start: int, b: int, batched: bool, chunk_size: int) -> Tensor:
        """Return the chunk's output as ``(b,)`` (one value per pose) or ``(b, d)`` (d > 1).

        ``b`` elements of any shape are one value per pose; ``(b, d)``, ``(b, 1, d)`` (poses
        stacked) and, for one pose, ``(d,)`` are ``d`` values per pose.

        Raises
        ------
        CombinationError
            If the shape is neither, or ``d`` differs from that of the poses run before.
        """
        if out.numel() == b:
            out, width = out.reshape(b), 1
        elif (out.dim() >= 2 and out.shape[0] == b and out.shape[1:-1].numel() == 1) or (
            b == 1 and out.dim() == 1
        ):  # (b, d), (b, 1, d) (poses stacked), or one pose's (d,)
            out = out.reshape(b, -1)
            width = out.shape[1]
        elif not batched:
            raise CombinationError(
                f"the model's prediction for pose {start} has shape {tuple(out.shape)}; "
                "it must have one element (or d values, shape (d,) or (1, d)). Reduce it "
                "in the model (e.g. .sum()) or pass pred_readout"
            )
        else:
            raise CombinationError(
                f"the model returned shape {tuple(out.shape)} for "
                f"{what(start, b)}; with chunk_size={chunk_size} it must "
                f"return one prediction per pose of the collated batch ({b} elements, or "
                f"({b}, d) for d values per pose), e.g. a per-graph sum over the batch vector"
            )
        if self.width is None:
            self.width, self.first = width, start
        elif width != self.width:
            raise CombinationError(
                f"{what(start, b)} returned d={width} values per pose, but pose "
                f"{self.first} returned d={self.width}: every pose of a call must "
                "return the same number of values (one, or a vector of d)"
            )
        return out
