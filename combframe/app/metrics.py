"""Held-out metrics of ``combframe train``, their intervals, when undefined, and divergence.

:func:`held_out_metrics` gives MAE, RMSE, Pearson, Spearman and Kendall's tau-b of the
held-out compounds, each with a 95% percentile bootstrap interval over resampled
compounds (:func:`bootstrap_intervals`); the resamples are evaluated together, as rows of
one tensor. Correlations need at least two held-out compounds and predictions and values
that are not all equal; :func:`undefined_correlation` says why when they are not defined,
and the command prints ``n/a`` with that reason instead of ``nan``. With fewer than
:data:`MIN_INTERVAL_COMPOUNDS` held-out compounds, or an interval of zero width, a note
says the intervals are not meaningful (:func:`interval_note`).

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
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BOOTSTRAP_SAMPLES",
    "DIVERGENCE_FACTOR",
    "MIN_INTERVAL_COMPOUNDS",
    "baseline_note",
    "bootstrap_intervals",
    "divergence",
    "held_out_metrics",
    "interval_note",
    "kendall",
    "mae",
    "multi_target_metrics",
    "pearson",
    "per_target",
    "rmse",
    "spearman",
    "squared_errors",
    "undefined_correlation",
]

#: Resamples of the bootstrap confidence intervals.
BOOTSTRAP_SAMPLES = 1000
#: Elements of the pairwise-sign blocks of Kendall's tau computed at once.
_BLOCK = 2**22

#: How many times the spread of the values the final RMSE may reach before training
#: counts as diverged.
DIVERGENCE_FACTOR = 10.0


def rmse(pred: Tensor, target: Tensor) -> float:
    """Root mean squared error; several targets ``(C, d)``: the mean of their RMSEs.

    Each target's RMSE is over the compounds with a value for it (NaN: missing); the
    mean over targets is what selects the best model and stops early.
    """
    if target.dim() < 2:
        return float(((pred.double() - target.double()) ** 2).mean().sqrt())
    errors = squared_errors(pred.double(), target.double())
    per_target = (errors.sum(dim=0) / target.isfinite().sum(dim=0)).sqrt()
    return float(per_target.mean())


def squared_errors(pred: Tensor, target: Tensor) -> Tensor:
    """``(pred - target)²``, 0 where the value is missing (NaN), with a finite gradient.

    The missing values are replaced before the subtraction, so no NaN reaches autograd
    (a NaN behind :func:`torch.where` would still make the gradient NaN).
    """
    present = target.isfinite()
    return torch.where(present, (pred - torch.where(present, target, 0.0)) ** 2, 0.0)


def per_target(
    pred: Tensor, target: Tensor, names: Sequence[str]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Split ``(C, d)`` predictions and values into each target's compounds with a value."""
    out = {}
    for j, name in enumerate(names):
        present = target[:, j].isfinite()
        out[name] = (pred[:, j][present], target[:, j][present])
    return out


def mae(pred: Tensor, target: Tensor) -> float:
    """Mean absolute error."""
    return float((pred.double() - target.double()).abs().mean())


def _pearson_rows(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation of each row of ``x`` with that of ``y``; NaN for a constant row."""
    x = x - x.mean(dim=-1, keepdim=True)
    y = y - y.mean(dim=-1, keepdim=True)
    denom = x.norm(dim=-1) * y.norm(dim=-1)
    return torch.where(denom > 0, (x * y).sum(dim=-1) / denom, torch.nan)


def _ranks_rows(x: Tensor) -> Tensor:
    """Ranks within each row, starting at 0, ties sharing their average rank."""
    ordered = x.sort(dim=-1).values
    below = torch.searchsorted(ordered, x.contiguous(), right=False)
    up_to = torch.searchsorted(ordered, x.contiguous(), right=True)
    return (below + up_to - 1).double() / 2


def _kendall_rows(x: Tensor, y: Tensor) -> Tensor:
    r"""Kendall's :math:`\tau_b` of each row pair; NaN for a constant row.

    :math:`\tau_b = \sum_{i,j} s^x_{ij} s^y_{ij} / \sqrt{\sum s^x_{ij}{}^2 \sum s^y_{ij}{}^2}`
    with :math:`s_{ij} = \operatorname{sign}(v_i - v_j)`: concordant minus discordant
    pairs over the pairs not tied in each variable, as ``scipy.stats.kendalltau``.
    """
    n = x.shape[-1]
    rows = max(1, _BLOCK // max(n * n, 1))
    sums = torch.zeros(3, x.shape[0], dtype=torch.float64)
    for r in range(0, x.shape[0], rows):
        xr, yr = x[r : r + rows], y[r : r + rows]
        step = max(1, _BLOCK // max(len(xr) * n, 1))
        for i in range(0, n, step):
            sx = torch.sign(xr[:, i : i + step, None] - xr[:, None, :])
            sy = torch.sign(yr[:, i : i + step, None] - yr[:, None, :])
            sums[:, r : r + rows] += torch.stack(
                [(sx * sy).sum((1, 2)), (sx * sx).sum((1, 2)), (sy * sy).sum((1, 2))]
            )
    denom = (sums[1] * sums[2]).sqrt()
    return torch.where(denom > 0, sums[0] / denom, torch.nan)


def _rows(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    return pred.double().cpu().reshape(1, -1), target.double().cpu().reshape(1, -1)


def pearson(pred: Tensor, target: Tensor) -> float:
    """Pearson correlation; NaN when either side is constant."""
    return float(_pearson_rows(*_rows(pred, target))[0])


def spearman(pred: Tensor, target: Tensor) -> float:
    """Spearman rank correlation (Pearson of average ranks); NaN when either is constant."""
    x, y = _rows(pred, target)
    return float(_pearson_rows(_ranks_rows(x), _ranks_rows(y))[0])


def kendall(pred: Tensor, target: Tensor) -> float:
    """Kendall's tau-b (ties accounted for, as scipy's default); NaN when either is constant."""
    return float(_kendall_rows(*_rows(pred, target))[0])


def _all_metrics(x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Every metric of each row pair of ``x`` (predictions) and ``y`` (values)."""
    error = x - y
    return {
        "mae": error.abs().mean(dim=-1),
        "rmse": (error**2).mean(dim=-1).sqrt(),
        "pearson": _pearson_rows(x, y),
        "spearman": _pearson_rows(_ranks_rows(x), _ranks_rows(y)),
        "kendall": _kendall_rows(x, y),
    }


def bootstrap_intervals(
    pred: Tensor, target: Tensor, *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> dict[str, list[float] | None]:
    """95% percentile bootstrap intervals of every metric, over resampled compounds.

    Each of ``samples`` resamples draws ``n`` compounds with replacement (from a
    generator seeded with ``seed``); an interval is the 2.5th and 97.5th percentile of
    the metric over the resamples where it is defined, None with fewer than 2
    compounds.
    """
    x, y = _rows(pred, target)
    n = x.shape[-1]
    if n < 2:
        return dict.fromkeys(("mae", "rmse", "pearson", "spearman", "kendall"))
    gen = torch.Generator().manual_seed(seed)
    index = torch.randint(n, (samples, n), generator=gen)
    values = _all_metrics(x[0][index], y[0][index])
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    out: dict[str, list[float] | None] = {}
    for name, v in values.items():
        defined = v[~v.isnan()]
        out[name] = torch.quantile(defined, q).tolist() if defined.numel() else None
    return out


def held_out_metrics(
    pred: Tensor, target: Tensor, *, seed: int = 0
) -> tuple[dict[str, Any], list[str]]:
    """MAE, RMSE, Pearson, Spearman, Kendall and their 95% intervals, with notes.

    Correlations are None where undefined, and a note says why.
    """
    x, y = _rows(pred, target)
    values = {k: float(v[0]) for k, v in _all_metrics(x, y).items()}
    notes = []
    undefined = undefined_correlation(pred, target)
    if undefined is not None:
        notes.append(f"Pearson, Spearman and Kendall are n/a: {undefined}")
    out: dict[str, Any] = {
        k: None if undefined and k in ("pearson", "spearman", "kendall") else v
        for k, v in values.items()
    }
    out["compounds"] = int(x.shape[-1])
    out["ci95"] = bootstrap_intervals(pred, target, seed=seed)
    note = interval_note(out["compounds"], out["ci95"])
    if note is not None:
        notes.append(note)
    return out, notes


def multi_target_metrics(
    pred: Tensor, target: Tensor, names: Sequence[str], *, seed: int = 0
) -> tuple[dict[str, Any], list[str]]:
    """:func:`held_out_metrics` of each target, keyed by name, and their mean over targets.

    Each target is measured on the compounds with a value for it. The top-level MAE,
    RMSE and correlations are the means over the targets (None if one is undefined);
    ``targets`` holds each target's metrics with its intervals; notes name their target.
    """
    targets, notes = {}, []
    for name, (p, y) in per_target(pred, target, names).items():
        targets[name], found = held_out_metrics(p, y, seed=seed)
        notes += [f"{name}: {note}" for note in found]
    out: dict[str, Any] = {}
    for key in ("mae", "rmse", "pearson", "spearman", "kendall"):
        each = [t[key] for t in targets.values()]
        out[key] = None if None in each else sum(each) / len(each)
    out["compounds"] = int(target.shape[0])
    out["targets"] = targets
    return out, notes


#: Fewer held-out compounds than this make bootstrap intervals that are not meaningful.
MIN_INTERVAL_COMPOUNDS = 10


def interval_note(n: int, ci95: dict[str, list[float] | None]) -> str | None:
    """Say when the 95% intervals are not meaningful: few compounds, or zero width.

    With fewer than :data:`MIN_INTERVAL_COMPOUNDS` held-out compounds the resamples
    repeat a handful of values; an interval of zero width (every resample gave the same
    value) says nothing of the uncertainty either.
    """
    if n < 2:
        return None  # no interval at all; the correlations' note says why
    flat = [k for k, ci in ci95.items() if ci is not None and ci[0] == ci[1]]
    if n >= MIN_INTERVAL_COMPOUNDS and not flat:
        return None
    if n < MIN_INTERVAL_COMPOUNDS:
        return (
            f"the 95% intervals are not meaningful: only {n} held-out compounds, whose "
            "bootstrap resamples repeat a handful of values; hold out more compounds (more "
            "compounds or a larger test_fraction)"
        )
    return (
        f"the 95% intervals of {', '.join(flat)} are not meaningful: every bootstrap "
        "resample gave the same value (an interval of zero width)"
    )


def undefined_correlation(pred: Tensor, target: Tensor) -> str | None:
    """Say why the correlations are undefined for these values; None when defined."""
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
