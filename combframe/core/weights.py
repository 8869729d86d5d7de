r"""Per-pose inputs to the combination (a prior, a mask) and the weight of every pose.

**Priors and masks.** Beside the predictions :math:`y_i` a pose may carry a log prior
weight :math:`p_i = \log\pi_i` (a docking confidence); a masked pose has
:math:`\pi_i = 0`. A combination that takes them (``takes_prior = True``) adds
:math:`p_i` to its log weights: the smooth minimum becomes
:math:`G = -t \log \sum_i \pi_i e^{-y_i/t}`, Boltzmann weights are
:math:`\propto \pi_i e^{-y_i/kT}`, the mean is weighted by :math:`\pi`. For the stream
strategy :math:`p_i` enters the online-softmax log weight :math:`a_i + p_i`, so the pass
stays exact. The prior is data: no gradient flows to it.

**Pose weights.** For a compound :math:`c` with combined value
:math:`G_c = h(y_{c,1}, \dots, y_{c,N_c})`, the weight of pose :math:`i` is
:math:`w_i = \partial G_c / \partial y_i`: for the smooth minimum the softmax of
:math:`-y/t + p` (nearly 1 for the pose the model picked), for the mean :math:`1/N`
(:math:`\operatorname{softmax}(p)` with a prior), for Boltzmann
:math:`q_i (1 - (y_i - G)/kT)` with :math:`q = \operatorname{softmax}(-y/kT + p)`. They
need the per-pose predictions only: one autograd pass through the combination's batched
value on the ``(M,)`` vector, never the model.

**Vector outputs.** With ``d`` values per pose (``(M, d)`` predictions) a combination
that combines each column on its own gives ``(M, d)`` weights:
:math:`\partial G_{cl}/\partial y_{il}`, the weight of pose :math:`i` in column
:math:`l` (which pose was picked, per target). A pooling combination (``pools = True``,
attention) gives its own closed-form ``(M,)`` weights
(:meth:`~combframe.Combination.pool_weights`: attention's :math:`\alpha_i`), the share
of each pose in the pooled vector: which pose it picked for the whole vector.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TypeAlias

import torch
from torch import Tensor
from typing_extensions import override

from combframe.core.batch import Segments
from combframe.core.combination import Combination
from combframe.errors import CombinationError
from combframe.segment import segment_max

__all__ = ["PerPose", "combined_values", "log_prior", "pose_weights"]

#: A per-pose input: a flat ``(M,)`` tensor, one tensor per compound, or ``None``.
PerPose: TypeAlias = Tensor | Sequence[Tensor] | None


def _flat(name: str, value: PerPose, segments: Segments) -> Tensor | None:
    """Return a per-pose input as one ``(M,)`` tensor on the device, or raise."""
    if value is None:
        return None
    flat = value if isinstance(value, Tensor) else torch.cat([torch.as_tensor(v) for v in value])
    m = len(segments.owner)
    if flat.shape != (m,):
        raise CombinationError(
            f"{name} has shape {tuple(flat.shape)}, but the call has {m} poses: give one "
            f"value per pose, a flat ({m},) tensor or one tensor per compound"
        )
    return flat.detach().to(segments.index.device)


def log_prior(
    combination: Combination, prior: PerPose, mask: PerPose, segments: Segments
) -> Segments:
    """Return ``segments`` with the log prior of every pose (``prior``, ``-inf`` if masked).

    Raises
    ------
    CombinationError
        If the combination does not take a prior (``takes_prior``), a shape does not
        match the poses, a prior is NaN or ``+inf``, or a compound has every pose masked.
    """
    p, keep = _flat("prior", prior, segments), _flat("mask", mask, segments)
    if p is None and keep is None:
        return segments
    if not combination.takes_prior:
        raise CombinationError(
            f"combination {combination.name!r} takes no per-pose prior or mask; leave "
            "prior= and mask= out, or use a combination that takes them (max, mean, "
            "boltzmann)"
        )
    if p is None:
        p = torch.zeros(len(segments.owner), device=segments.index.device)
    p = p.to(torch.promote_types(p.dtype, torch.float32))
    if keep is not None:
        p = p.masked_fill(~keep.bool(), -torch.inf)
    finite = p.nan_to_num(nan=torch.inf, posinf=torch.inf, neginf=-torch.inf)
    best = segment_max(finite, segments.index, segments.count)
    bad = torch.stack([(best == torch.inf).any(), (best == -torch.inf).any()]).tolist()
    if bad[0] or bad[1]:
        raise CombinationError(
            "the prior holds NaN or +inf; give finite log weights (-inf, or the mask, drops a pose)"
            if bad[0]
            else "a compound has every pose masked (or a prior of -inf): keep at least one"
        )
    return dataclasses.replace(segments, prior=p)


class _SegmentValue(torch.nn.Module):
    """``combination.segment_value`` as a module's forward, for ``functional_call``."""

    def __init__(self, combination: Combination) -> None:
        super().__init__()
        self.combination = combination

    @override
    def forward(self, preds: Tensor, index: Tensor, count: int, prior: Tensor | None) -> Tensor:
        if prior is None:
            return self.combination.segment_value(preds, index, count)
        return self.combination.segment_value(preds, index, count, prior=prior.to(preds.dtype))


def combined_values(
    combination: Combination,
    preds: Tensor,
    segments: Segments,
    held: dict[str, Tensor] | None = None,
) -> Tensor:
    """Return :math:`G_c` of every compound, with the segments' prior, shape ``(C,)``.

    ``held`` replaces the combination's own parameters (by name) for this evaluation.
    """
    args = (preds, segments.index, segments.count, segments.prior)
    if not held:
        value: Tensor = _SegmentValue(combination)(*args)
        return value
    named = {f"combination.{n}": v for n, v in held.items()}
    out: Tensor = torch.func.functional_call(_SegmentValue(combination), named, args)
    return out


def pose_weights(
    combination: Combination,
    per_pose: Tensor,
    index: Tensor | None = None,
    *,
    prior: PerPose = None,
    mask: PerPose = None,
    create_graph: bool = False,
) -> Tensor:
    r"""Return :math:`\partial G_c/\partial y_i` for every pose of every compound, shape ``(M,)``.

    ``(M, d)`` for ``(M, d)`` predictions, or a pooling combination's ``(M,)`` (the
    module's text), whatever the shape of the predictions.

    Parameters
    ----------
    combination
        The combination that made the combined values (``model.combination``).
    per_pose
        The per-pose predictions, shape ``(M,)`` or ``(M, d)``: ``per_pose`` of a
        :class:`~combframe.MultiPoseModel` call.
    index
        The compound of each pose, sorted (``CompoundPredictions.index``); ``None`` for
        the poses of one compound.
    prior, mask
        The per-pose inputs the call was given, if any (see the module's text).
    create_graph
        Return weights that are differentiable with respect to ``per_pose`` (and so the
        model, through the per-pose path) and the combination's own parameters, for a
        loss on the weights: a cross-entropy against the pose closest to the crystal
        structure, ``-weights[i_true].clamp_min(1e-12).log()``. Otherwise (the default)
        the weights are detached, for inspection.

    Raises
    ------
    CombinationError
        If ``per_pose`` is not one-dimensional, ``index`` does not match it, or the
        prior or mask is refused (see :func:`log_prior`).
    """
    m = per_pose.shape[0] if per_pose.dim() else 0
    if per_pose.dim() not in (1, 2) or (index is not None and index.shape != (m,)):
        got = "none" if index is None else tuple(index.shape)
        raise CombinationError(
            f"pose_weights takes the (M,) or (M, d) per-pose predictions and their (M,) "
            f"compound index; got per_pose of shape {tuple(per_pose.shape)} and index {got}"
        )
    if index is None:
        index = torch.zeros(m, dtype=torch.long, device=per_pose.device)
    sizes = torch.bincount(index).tolist()
    segments = log_prior(combination, prior, mask, Segments.from_sizes(sizes, index.device))
    keep = create_graph and per_pose.requires_grad
    with torch.enable_grad():
        y = per_pose if keep else per_pose.detach().requires_grad_(True)
        if combination.pools:  # its own weights, for (M,) predictions (dim=1) too
            weights = combination.pool_weights(y, index, len(sizes), segments.prior)
            return weights if create_graph else weights.detach()
        combined = combined_values(combination, y, segments)
        (weights,) = torch.autograd.grad(combined.sum(), y, create_graph=create_graph)
    return weights
