r"""Exponential (free-energy) mean of the per-pose predictions: an example plugin.

With :math:`\beta = 1/kT`:

.. math::

    h(y) = -\frac{1}{\beta} \log \frac{1}{N} \sum_j e^{-\beta y_j} .

This is the free energy of the pose ensemble with equal prior weights: it lies between
the minimum and the mean of the predictions. The pose weights are left to combframe's
default (autograd on the N-vector of predictions), and the plugin does not implement
the stream strategy, so it exercises those paths of the core.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor

import combframe

__all__ = ["ExpMeanCombination", "ExpMeanParams"]


class ExpMeanParams(combframe.CombinationParams):
    """Parameters of :class:`ExpMeanCombination`."""

    kT: float = Field(1.0, gt=0, description="Thermal energy kT, in the predictions' units.")


class ExpMeanCombination(combframe.BaseCombination):
    """Exponential mean over poses, -kT log mean exp(-y/kT)."""

    name = "exp_mean"
    aliases = ("exponential_mean",)
    deprecated_aliases = ("expavg",)
    Params = ExpMeanParams
    params: ExpMeanParams

    def value(self, preds: Tensor) -> Tensor:
        """Return the exponential mean of ``preds``."""
        beta = 1.0 / self.params.kT
        n = preds.shape[0]
        return -(torch.logsumexp(-beta * preds, dim=0) - math.log(n)) / beta


@combframe.hookimpl
def combframe_add_combinations() -> list[type[combframe.BaseCombination]]:
    """Register :class:`ExpMeanCombination`."""
    return [ExpMeanCombination]
