r"""Arithmetic mean of the per-pose predictions.

.. math::

    h(y) = \frac{1}{N}\sum_j y_j, \qquad \frac{\partial h}{\partial y_i} = \frac{1}{N}.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

import combframe
from combframe.segment import segment_mean

__all__ = ["MeanCombination", "MeanCombinationFunc"]


class MeanCombination(combframe.BaseCombination):
    """Arithmetic mean of the per-pose predictions."""

    name = "mean"

    def __init__(self) -> None:
        super().__init__()

    @override
    def segment_value(self, preds: Tensor, index: Tensor, num_segments: int) -> Tensor:
        return segment_mean(preds, index, num_segments)

    @override
    def pose_weights(self, preds: Tensor, combined: Tensor) -> Tensor:
        return torch.full_like(preds, 1.0 / preds.shape[0])

    def stream_terms(self, preds: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
        """Equal log weights and one constant feature."""
        return torch.zeros_like(preds), torch.ones_like(preds).unsqueeze(-1)

    def stream_coefficients(self, combined: Tensor, center: Tensor) -> Tensor:
        """Return the single coefficient 1."""
        return torch.ones(1, dtype=combined.dtype, device=combined.device)


class MeanCombinationFunc(combframe.CombinationFunction):
    """mtenn-compatible Function: ``apply(pred_list, grad_dict, param_names, *model_params)``."""

    combination_class = MeanCombination

    @staticmethod
    @override
    def forward(  # type: ignore[override]
        pred_list: Any, grad_dict: Any, param_names: Any, *model_params: Tensor
    ) -> tuple[Tensor, Tensor]:
        return combframe.CombinationFunction.forward(
            MeanCombination(), pred_list, grad_dict, param_names, *model_params
        )


@combframe.hookimpl
def combframe_add_combinations() -> list[type[combframe.BaseCombination]]:
    """Register :class:`MeanCombination`."""
    return [MeanCombination]
