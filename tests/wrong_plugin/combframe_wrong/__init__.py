r"""A deliberately wrong combination, for testing ``combframe check``.

Its value is the smooth minimum of the ``max`` combination, but its pose weights are the
mean's :math:`1/N` instead of :math:`\operatorname{softmax}(-t y)_i`, so every gradient
through it is wrong while the forward values are right. ``combframe check wrong_weights``
must fail.

The folder above this package holds a hand-written ``.dist-info``, so putting that folder
on ``PYTHONPATH`` installs the plugin through the ``combframe`` entry-point group exactly
as ``pip install`` would. A second one, ``combframe-broken-plugin``, points its entry point
at a module that does not exist, so ``combframe list`` has a load error to report.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

import combframe


class WrongParams(combframe.CombinationParams):
    pred_scale: float = Field(2.0, gt=0, description="Sharpness t of the smooth minimum.")


class WrongWeightsCombination(combframe.Combination):
    """Smooth minimum whose pose weights are (wrongly) uniform."""

    name = "wrong_weights"
    Params = WrongParams

    def value(self, preds: Tensor) -> Tensor:
        t = self.params.pred_scale  # type: ignore[attr-defined]
        return -torch.logsumexp(-t * preds, dim=0) / t

    def pose_weights(self, preds: Tensor, combined: Tensor) -> Tensor:
        return torch.full_like(preds, 1.0 / preds.numel())  # wrong on purpose
