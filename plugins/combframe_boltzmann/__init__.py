r"""Boltzmann-weighted mean of the per-pose predictions.

With :math:`\beta = 1/kT` and :math:`w = \operatorname{softmax}(-\beta y)`:

.. math::

    h(y) = \sum_j w_j y_j, \qquad
    \frac{\partial h}{\partial y_i} = w_i\,\bigl(1 - \beta\,(y_i - h)\bigr).

For the stream strategy the weights are written with features
:math:`\phi_i = (1,\ y_i - c)` around a centre :math:`c` and coefficients
:math:`\lambda = (1 + \beta(h - c),\ -\beta)`. The centre follows the best pose seen so
far (``stream_shift`` re-expresses the sums exactly), which keeps the two running sums
from cancelling whatever the order of the poses.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import Tensor
from typing_extensions import override

import combframe
from combframe.segment import segment_softmax, segment_sum

__all__ = ["BoltzmannCombination", "BoltzmannCombinationFunc", "BoltzmannParams"]


class BoltzmannParams(combframe.CombinationParams):
    """Parameters of :class:`BoltzmannCombination`."""

    kT: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="Thermal energy kT, in the predictions' units."
    )

    @field_validator("kT")
    @classmethod
    def _beta_is_finite(cls, kT: float) -> float:
        if not math.isfinite(1.0 / kT):
            raise ValueError(f"1/kT overflows for kT={kT!r}; kT must be at least {1 / 1.7e308:.1e}")
        return kT


class BoltzmannCombination(combframe.BaseCombination):
    """Boltzmann-weighted mean of the per-pose predictions, weights softmax(-y / kT)."""

    name = "boltzmann"
    Params = BoltzmannParams
    params: BoltzmannParams

    def __init__(self, kT: float = 1.0) -> None:
        super().__init__(kT=kT)

    @override
    def segment_value(self, preds: Tensor, index: Tensor, num_segments: int) -> Tensor:
        weights = segment_softmax(-preds / self.params.kT, index, num_segments)
        return segment_sum(weights * preds, index, num_segments)

    @override
    def pose_weights(self, preds: Tensor, combined: Tensor) -> Tensor:
        weights = torch.softmax(-preds / self.params.kT, dim=0)
        return weights * (1.0 - (preds - combined) / self.params.kT)

    def stream_terms(self, preds: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
        r"""Log weights :math:`-\beta y` and features :math:`(1, y - c)`."""
        return -preds / self.params.kT, torch.stack(
            [torch.ones_like(preds), preds - center], dim=-1
        )

    def stream_shift(self, old: Tensor, new: Tensor) -> Tensor:
        r"""Move the centre: :math:`\phi(c') = M \phi(c)`, :math:`M = ((1, 0), (c - c', 1))`."""
        one, zero = torch.ones_like(old), torch.zeros_like(old)
        return torch.stack([torch.stack([one, zero]), torch.stack([old - new, one])])

    def stream_coefficients(self, combined: Tensor, center: Tensor) -> Tensor:
        r"""Coefficients :math:`(1 + \beta (h - c), -\beta)`."""
        beta = 1.0 / self.params.kT
        return torch.stack([1.0 + beta * (combined - center), torch.full_like(combined, -beta)])


class BoltzmannCombinationFunc(combframe.CombinationFunction):
    """mtenn-compatible Function for :class:`BoltzmannCombination`.

    ``apply(kT, pred_list, grad_dict, param_names, *model_params)`` returns
    ``(combined, per_pose)``; setup_context and backward are the shared ones.
    """

    combination_class = BoltzmannCombination

    @staticmethod
    @override
    def forward(  # type: ignore[override]
        kT: float, pred_list: Any, grad_dict: Any, param_names: Any, *model_params: Tensor
    ) -> tuple[Tensor, Tensor]:
        return combframe.CombinationFunction.forward(
            BoltzmannCombination(kT=kT), pred_list, grad_dict, param_names, *model_params
        )


@combframe.hookimpl
def combframe_add_combinations() -> list[type[combframe.BaseCombination]]:
    """Register :class:`BoltzmannCombination`."""
    return [BoltzmannCombination]
