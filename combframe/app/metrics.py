"""Held-out metrics of ``combframe train``, when they are undefined, and divergence.

Pearson and Spearman correlations need at least two held-out compounds and predictions
and values that are not all equal; :func:`undefined_correlation` says why when they are
not defined, and the command prints ``n/a`` with that reason instead of ``nan``.

:func:`divergence` is the rule that ends a run with exit status 1: training diverged
when the final training RMSE or the held-out RMSE is more than :data:`DIVERGENCE_FACTOR`
times the standard deviation of all the compounds' values (the RMSE of predicting
their mean). Predicting about the mean is where training starts (the output bias is set
to the mean training value), so a run ending ten times worse has moved away from every
sensible model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "DIVERGENCE_FACTOR",
    "baseline_note",
    "divergence",
    "pearson",
    "rmse",
    "spearman",
    "undefined_correlation",
]

#: How many times the spread of the values the final RMSE may reach before training
#: counts as diverged.
DIVERGENCE_FACTOR = 10.0


def rmse(pred: Tensor, target: Tensor) -> float:
    """Root mean squared error."""
    return float(((pred.double() - target.double()) ** 2).mean().sqrt())


def pearson(pred: Tensor, target: Tensor) -> float:
    """Pearson correlation; NaN when either side is constant."""
    x = pred.double() - pred.double().mean()
    y = target.double() - target.double().mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 0 else math.nan


def _ranks(values: Tensor) -> Tensor:
    """Ranks starting at 0, ties sharing their average rank."""
    v = values.double().cpu()
    order = torch.argsort(v, stable=True)
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(len(v), dtype=torch.float64)
    uniq, inverse = torch.unique(v, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(
        0, inverse, torch.ones_like(ranks)
    )
    return (sums / counts)[inverse]


def spearman(pred: Tensor, target: Tensor) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    return pearson(_ranks(pred), _ranks(target))


def undefined_correlation(pred: Tensor, target: Tensor) -> str | None:
    """Say why Pearson and Spearman are undefined for these values; None when defined."""
    n = pred.numel()
    if n < 2:
        return (
            f"only {n} held-out compound; a correlation needs at least 2 "
            "(more compounds or a larger test_fraction)"
        )
    if bool((pred == pred.flatten()[0]).all()):
        return "the model predicts the same value for every held-out compound"
    if bool((target == target.flatten()[0]).all()):
        return "every held-out compound has the same value"
    return None


def baseline_note(test_rmse: float, baseline_rmse: float) -> str | None:
    """Return a note when the model does worse on held-out compounds than a constant."""
    if not test_rmse > baseline_rmse:
        return None
    return (
        f"the held-out RMSE {test_rmse:.3g} is above {baseline_rmse:.3g}, that of predicting "
        "the mean training value for every compound: the model has not learned yet (more "
        "epochs or compounds) or the learning rate is too high (lower lr)"
    )


def divergence(final_train_rmse: float, test_rmse: float, values: Sequence[float]) -> str | None:
    """Describe a diverged run, or return None; the rule is in the module docstring."""
    spread = float(torch.tensor(values, dtype=torch.float64).std(correction=0))
    pairs = ((final_train_rmse, "training"), (test_rmse, "held-out"))
    for value, where in pairs:
        if not math.isfinite(value):
            return f"the {where} RMSE is {value}"
    worst, where = max(pairs)
    if spread > 0 and worst > DIVERGENCE_FACTOR * spread:
        return (
            f"the {where} RMSE {worst:.4g} is more than {DIVERGENCE_FACTOR:g} times the "
            f"spread of the values ({spread:.3g}, their standard deviation)"
        )
    return None
