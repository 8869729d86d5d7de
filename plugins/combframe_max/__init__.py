r"""Smooth maximum (or minimum) of the per-pose predictions, via LogSumExp.

With :math:`s = -1` when ``negate_preds`` (a smooth minimum, the best pose's
:math:`\Delta G`) and :math:`s = 1` otherwise, and :math:`t` = ``pred_scale``:

.. math::

    h(y) = \frac{s}{t}\log\sum_j e^{s t y_j}, \qquad
    \frac{\partial h}{\partial y_i} = \operatorname{softmax}(s t y)_i .

:math:`h` lies within :math:`\log(N)/t` of the true extreme.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor
from typing_extensions import override

import combframe
from combframe.segment import segment_logsumexp

__all__ = ["MaxCombination", "MaxCombinationFunc", "MaxParams"]


class MaxParams(combframe.CombinationParams):
    """Parameters of :class:`MaxCombination`."""

    negate_preds: bool = Field(True, description="Smooth minimum instead of maximum.")
    pred_scale: float = Field(
        1000.0, gt=0, allow_inf_nan=False, description="Sharpness t; larger is closer to max."
    )


class MaxCombination(combframe.BaseCombination):
    """Smooth maximum (or minimum, the default) of the per-pose predictions, via LogSumExp."""

    name = "max"
    Params = MaxParams
    params: MaxParams

    def __init__(self, negate_preds: bool = True, pred_scale: float = 1000.0) -> None:
        super().__init__(negate_preds=negate_preds, pred_scale=pred_scale)

    def _sign(self) -> float:
        return -1.0 if self.params.negate_preds else 1.0

    def _scaled(self, preds: Tensor) -> Tensor:
        return (self._sign() * self.params.pred_scale) * preds

    @override
    def segment_value(self, preds: Tensor, index: Tensor, num_segments: int) -> Tensor:
        lse = segment_logsumexp(self._scaled(preds), index, num_segments)
        return lse * (self._sign() / self.params.pred_scale)

    @override
    def pose_weights(self, preds: Tensor, combined: Tensor) -> Tensor:
        return torch.softmax(self._scaled(preds), dim=0)

    def stream_terms(self, preds: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
        """Log weights :math:`s t y` and one constant feature."""
        return self._scaled(preds), torch.ones_like(preds).unsqueeze(-1)

    def stream_coefficients(self, combined: Tensor, center: Tensor) -> Tensor:
        """Return the single coefficient 1."""
        return torch.ones(1, dtype=combined.dtype, device=combined.device)


class MaxCombinationFunc(combframe.CombinationFunction):
    """mtenn-compatible Function for :class:`MaxCombination`.

    ``apply(negate_preds, pred_scale, pred_list, grad_dict, param_names, *model_params)``
    returns ``(combined, per_pose)``; setup_context and backward are the shared ones.
    """

    combination_class = MaxCombination

    @staticmethod
    @override
    def forward(  # type: ignore[override]
        negate_preds: bool,
        pred_scale: float,
        pred_list: Any,
        grad_dict: Any,
        param_names: Any,
        *model_params: Tensor,
    ) -> tuple[Tensor, Tensor]:
        comb = MaxCombination(negate_preds=negate_preds, pred_scale=pred_scale)
        return combframe.CombinationFunction.forward(
            comb, pred_list, grad_dict, param_names, *model_params
        )


@combframe.hookimpl
def combframe_add_combinations() -> list[type[combframe.BaseCombination]]:
    """Register :class:`MaxCombination`."""
    return [MaxCombination]
