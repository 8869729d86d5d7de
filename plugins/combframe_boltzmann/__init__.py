r"""Boltzmann-weighted mean of the per-pose predictions.

With :math:`\beta = 1/kT`, :math:`w = \operatorname{softmax}(-\beta y + p)` (a log prior p):

.. math::

    h(y) = \sum_j w_j y_j, \qquad
    \frac{\partial h}{\partial y_i} = w_i\,\bigl(1 - \beta\,(y_i - h)\bigr).

Stream terms: log weights :math:`-\beta y_i`, features :math:`\phi_i = (1, y_i - c)` around
a centre :math:`c`, coefficients :math:`(1 + \beta(h - c), -\beta)`; moving the centre to
:math:`c'` maps :math:`\phi \mapsto ((1, 0), (c - c', 1))\,\phi`.
"""

from typing import Annotated, ClassVar

import torch
from pydantic import AfterValidator, Field
from torch import Tensor

import combframe
from combframe.mtenn import mtenn_function
from combframe.segment import segment_softmax, segment_sum, with_prior


def _finite_beta(kT: float) -> float:
    if 1.0 / kT == float("inf"):
        raise ValueError(f"1/kT overflows for kT={kT!r}; kT must be at least {1 / 1.7e308:.1e}")
    return kT


class BoltzmannParams(combframe.CombinationParams):
    """Parameters of :class:`BoltzmannCombination`."""

    kT: Annotated[float, AfterValidator(_finite_beta)] = Field(
        1.0, gt=0, allow_inf_nan=False, description="Thermal energy kT, in the predictions' units."
    )


class BoltzmannCombination(combframe.Combination[BoltzmannParams]):
    """Boltzmann-weighted mean of the per-pose predictions."""

    name = "boltzmann"
    mtenn_fields: ClassVar = {"boltzmann_comb_kT": "kT"}

    def value(self, preds: Tensor, prior: Tensor | None = None) -> Tensor:
        return (torch.softmax(with_prior(-preds / self.params.kT, prior), 0) * preds).sum(0)

    def segment_value(
        self, preds: Tensor, index: Tensor, num_segments: int, prior: Tensor | None = None
    ) -> Tensor:
        weights = segment_softmax(with_prior(-preds / self.params.kT, prior), index, num_segments)
        return segment_sum(weights * preds, index, num_segments)

    def stream_terms(self, preds: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
        return -preds / self.params.kT, torch.stack([torch.ones_like(preds), preds - center], -1)

    def stream_shift(self, old: Tensor, new: Tensor) -> Tensor:
        one, zero = torch.ones_like(old), torch.zeros_like(old)
        return torch.stack([torch.stack([one, zero]), torch.stack([old - new, one])])

    def stream_coefficients(self, combined: Tensor, center: Tensor) -> Tensor:
        beta = 1.0 / self.params.kT
        return torch.stack([1.0 + beta * (combined - center), torch.zeros_like(combined) - beta])


BoltzmannCombinationFunc = mtenn_function(BoltzmannCombination)
