r"""Smooth maximum (or minimum) of the per-pose predictions, via LogSumExp.

With :math:`s = -1` when ``negate_preds`` (a smooth minimum, the best pose's
:math:`\Delta G`), :math:`s = 1` otherwise, and :math:`t` = ``pred_scale``:

.. math::

    h(y) = \frac{1}{st}\log\sum_j e^{s t y_j}, \qquad
    \frac{\partial h}{\partial y_i} = \operatorname{softmax}(s t y)_i ,

within :math:`\log(N)/t` of the true extreme. For the stream strategy: log weights
:math:`s t y_i`, one constant feature and coefficient.
"""

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

import combframe
from combframe.mtenn import mtenn_function
from combframe.segment import segment_logsumexp, with_prior


class MaxParams(combframe.CombinationParams):
    """Parameters of :class:`MaxCombination`."""

    negate_preds: bool = Field(True, description="Smooth minimum instead of maximum.")
    pred_scale: float = Field(
        1000.0, gt=0, allow_inf_nan=False, description="Sharpness t; larger is closer to max."
    )


class MaxCombination(combframe.Combination[MaxParams]):
    """Smooth maximum (or minimum, the default) of the per-pose predictions."""

    name = "max"
    mtenn_fields: ClassVar = {"max_comb_neg": "negate_preds", "max_comb_scale": "pred_scale"}

    def _st(self) -> float:
        return (-1.0 if self.params.negate_preds else 1.0) * self.params.pred_scale

    def value(self, preds: Tensor, prior: Tensor | None = None) -> Tensor:
        return torch.logsumexp(with_prior(self._st() * preds, prior), dim=0) / self._st()

    def segment_value(
        self, preds: Tensor, index: Tensor, num_segments: int, prior: Tensor | None = None
    ) -> Tensor:
        log_w = with_prior(self._st() * preds, prior)
        return segment_logsumexp(log_w, index, num_segments) / self._st()

    def stream_terms(self, preds: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
        return self._st() * preds, torch.ones_like(preds).unsqueeze(-1)

    def stream_coefficients(self, combined: Tensor, center: Tensor) -> Tensor:
        return combined.new_ones(1)


MaxCombinationFunc = mtenn_function(MaxCombination)
