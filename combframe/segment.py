r"""Segment reductions: one value per compound from a flat vector of per-pose values.

The poses of a batch of compounds are laid out flat, ``M`` of them, with ``index[i]`` the
compound of pose ``i`` (``0 <= index[i] < num_segments``, sorted, as PyTorch Geometric's
aggregations take an ``index``). These functions reduce such a vector per compound without
a Python loop over compounds, and are ordinary autograd operations, so a combination built
from them is differentiable to any order. Values are ``(M,)``, or ``(M, d)`` for ``d``
values per pose, reduced column by column into ``(num_segments, d)``.

>>> import torch
>>> from combframe.segment import segment_sum, segment_logsumexp
>>> y = torch.tensor([1.0, 2.0, 3.0, 10.0])
>>> index = torch.tensor([0, 0, 0, 1])
>>> segment_sum(y, index, 2)
tensor([ 6., 10.])
>>> segment_logsumexp(y, index, 2).round(decimals=4)
tensor([ 3.4076, 10.0000])
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "segment_logsumexp",
    "segment_max",
    "segment_mean",
    "segment_softmax",
    "segment_sum",
    "with_prior",
]


def with_prior(log_weights: Tensor, prior: Tensor | None) -> Tensor:
    """Return log weights plus the per-pose log prior, if one is given (a masked pose: -inf).

    ``log_weights`` is ``(M,)`` or ``(M, d)`` (one column per output); the ``(M,)`` prior
    is added to every column.
    """
    if prior is None:
        return log_weights
    return log_weights + prior.reshape(-1, *(1,) * (log_weights.dim() - 1))


def segment_sum(values: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Return the per-segment sums, shape ``(num_segments, *values.shape[1:])``."""
    out = values.new_zeros((num_segments, *values.shape[1:]))
    return out.index_add(0, index, values)


def segment_mean(values: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Return the per-segment means, shape ``(num_segments, *values.shape[1:])``."""
    ones = torch.ones_like(values)
    return segment_sum(values, index, num_segments) / segment_sum(ones, index, num_segments)


def segment_max(values: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Return the per-segment maxima of ``values`` (detached), ``-inf`` for empty segments.

    Used as the shift that keeps :func:`segment_logsumexp` and :func:`segment_softmax`
    finite; both are exactly invariant to it, so it carries no gradient.
    """
    out = values.new_full((num_segments, *values.shape[1:]), float("-inf"))
    spread = index.reshape(-1, *(1,) * (values.dim() - 1)).expand(values.shape)
    return out.scatter_reduce(0, spread, values.detach(), reduce="amax", include_self=True)


def segment_logsumexp(values: Tensor, index: Tensor, num_segments: int) -> Tensor:
    r"""Return :math:`\log\sum_{i \in s} e^{x_i}` per segment, stable for large values."""
    shift = segment_max(values, index, num_segments)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    total = segment_sum(torch.exp(values - shift[index]), index, num_segments)
    return torch.log(total) + shift


def segment_softmax(values: Tensor, index: Tensor, num_segments: int) -> Tensor:
    r"""Return :math:`e^{x_i} / \sum_{j \in s(i)} e^{x_j}`, shape of ``values``."""
    shift = segment_max(values, index, num_segments)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    weights = torch.exp(values - shift[index])
    return weights / segment_sum(weights, index, num_segments)[index]
