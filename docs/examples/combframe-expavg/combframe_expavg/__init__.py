r"""Exponential (free-energy) average of the per-pose predictions.

With :math:`\beta = 1/kT`, the compound value treats the poses as states of one
ensemble:

.. math::

    h(y) = -\frac{1}{\beta}\log\frac{1}{N}\sum_j e^{-\beta y_j}, \qquad
    \frac{\partial h}{\partial y_i} = \operatorname{softmax}(-\beta y)_i .
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor

import combframe
from combframe.mtenn import mtenn_function


class ExpAverageParams(combframe.CombinationParams):
    """Parameters of :class:`ExpAverageCombination`."""

    kT: float = Field(0.6, gt=0, description="Thermal energy kT, in the predictions' units.")


class ExpAverageCombination(combframe.Combination[ExpAverageParams]):
    """Exponential (free-energy) average of the per-pose predictions."""

    name = "expavg"

    def value(self, preds: Tensor) -> Tensor:
        r"""Return :math:`h(y)`; ``logsumexp`` keeps large :math:`\beta y` finite."""
        beta = 1.0 / self.params.kT
        lse = torch.logsumexp(-beta * preds, dim=0) - math.log(preds.shape[0])
        return -lse / beta

    # Optional: closed-form pose weights; without this method autograd derives them.
    def pose_weights(self, preds: Tensor, combined: Tensor) -> Tensor:
        r"""Return :math:`\operatorname{softmax}(-\beta y)`."""
        return torch.softmax(-preds / self.params.kT, dim=0)

    # Optional: these two make the single-pass ``stream`` strategy available.
    def stream_terms(self, preds: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
        r"""Log weights :math:`-\beta y` and one constant feature."""
        return -preds / self.params.kT, torch.ones_like(preds).unsqueeze(-1)

    def stream_coefficients(self, combined: Tensor, center: Tensor) -> Tensor:
        """Return the single coefficient 1."""
        return torch.ones(1, dtype=combined.dtype, device=combined.device)


# Optional: mtenn's calling convention, ExpAverageCombinationFunc.apply(kT, pred_list, ...).
ExpAverageCombinationFunc = mtenn_function(ExpAverageCombination)
