r"""Arithmetic mean of the per-pose predictions.

.. math::

    h(y) = \frac{1}{N}\sum_j y_j, \qquad \frac{\partial h}{\partial y_i} = \frac{1}{N}.

For the stream strategy: equal log weights, one constant feature and coefficient.
"""

import torch
from torch import Tensor

import combframe
from combframe.mtenn import mtenn_function
from combframe.segment import segment_mean, segment_softmax, segment_sum, with_prior


class MeanCombination(combframe.Combination[combframe.CombinationParams]):
    """Arithmetic mean of the per-pose predictions."""

    name = "mean"

    def value(self, preds: Tensor, prior: Tensor | None = None) -> Tensor:
        if prior is None:
            return preds.mean(dim=0)
        return (torch.softmax(with_prior(torch.zeros_like(preds), prior), dim=0) * preds).sum(0)

    def segment_value(
        self, preds: Tensor, index: Tensor, num_segments: int, prior: Tensor | None = None
    ) -> Tensor:
        if prior is None:
            return segment_mean(preds, index, num_segments)
        weights = segment_softmax(with_prior(torch.zeros_like(preds), prior), index, num_segments)
        return segment_sum(weights * preds, index, num_segments)

    def stream_terms(self, preds: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(preds), torch.ones_like(preds).unsqueeze(-1)

    def stream_coefficients(self, combined: Tensor, center: Tensor) -> Tensor:
        return combined.new_ones(1)


MeanCombinationFunc = mtenn_function(MeanCombination)
