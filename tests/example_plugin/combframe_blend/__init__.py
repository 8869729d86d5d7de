r"""Blend of the mean and the smooth minimum of the per-pose predictions: an example plugin.

With :math:`\alpha` = ``alpha`` and :math:`t` = ``pred_scale``:

.. math::

    h(y) = \alpha \, \frac{1}{N}\sum_j y_j
         + (1 - \alpha)\left(-\frac{1}{t}\log\sum_j e^{-t y_j}\right).

:math:`\alpha = 0` is the smooth minimum, :math:`\alpha = 1` the mean. The pose weights
are left to combframe's default (autograd on the N-vector of predictions) and the
plugin does not implement the stream strategy, so it exercises those paths of the core.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

import combframe

__all__ = ["BlendCombination", "BlendParams"]


class BlendParams(combframe.CombinationParams):
    """Parameters of :class:`BlendCombination`."""

    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the mean; 0 is the softmin.")
    pred_scale: float = Field(10.0, gt=0, description="Sharpness t of the smooth minimum.")


class BlendCombination(combframe.Combination):
    """Blend of the mean and the smooth minimum over poses."""

    name = "blend"
    aliases = ("mean-min-blend",)
    deprecated_aliases = ("mixmin",)
    Params = BlendParams
    params: BlendParams

    def value(self, preds: Tensor) -> Tensor:
        """Return the blended value of ``preds``."""
        t = self.params.pred_scale
        softmin = -torch.logsumexp(-t * preds, dim=0) / t
        return self.params.alpha * preds.mean() + (1.0 - self.params.alpha) * softmin
