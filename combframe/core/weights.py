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
import weakref
from collections.abc import Sequence
from typing import Any, TypeAlias

import torch
from torch import Tensor
from typing_extensions import override

from combframe.core.batch import CompoundPredictions, Segments
from combframe.core.combination import Combination
from combframe.errors import CombinationError
from combframe.segment import segment_max

__all__ = ["CallPrior", "PerPose", "combined_values", "log_prior", "pose_weights", "result_weights"]

#: A per-pose input: a flat ``(M,)`` tensor, one tensor per compound, or ``None``.
PerPose: TypeAlias = Tensor | Sequence[Tensor] | None


def _flat(name: str, value: PerPose, segments: Segments) -> Tensor | None:
    """Return a per-pose input as one ``(M,)`` tensor on the device, or raise."""
    if value is None:
        return None
    m = len(segments.owner)
    if isinstance(value, Tensor):
        flat = value
    else:
        parts = [torch.as_tensor(v) for v in value]
        _check_parts(name, parts, segments.sizes)
        flat = torch.cat([v.reshape(-1) for v in parts])
    if flat.dim() == 2 and flat.shape[0] == m:
        raise CombinationError(
            f"{name} has shape {tuple(flat.shape)}: it takes one value per pose, a flat "
            f"({m},) tensor, not one per column of the predictions (the same {name} "
            "weighs a pose in every column)"
        )
    if flat.shape != (m,):
        raise CombinationError(
            f"{name} has shape {tuple(flat.shape)}, but the call has {m} poses: give one "
            f"value per pose, a flat ({m},) tensor or one tensor per compound"
        )
    return flat.detach().to(segments.index.device)


def _check_parts(name: str, parts: list[Tensor], sizes: Sequence[int]) -> None:
    """Refuse a per-compound ``name`` whose tensors do not match the compounds' pose counts."""
    if len(parts) != len(sizes):
        raise CombinationError(
            f"{name} has {len(parts)} tensors (one per compound), but the call has "
            f"{len(sizes)} compounds: give one tensor per compound, or a flat tensor"
        )
    pairs = enumerate(zip(parts, sizes, strict=True))
    wrong = [(c, tuple(v.shape), n) for c, (v, n) in pairs if v.shape != (n,)]
    if wrong:
        each = "; ".join(f"compound {c} has {n} poses but {shape}" for c, shape, n in wrong[:10])
        raise CombinationError(
            f"{name} for each compound must hold one value per pose of that compound: {each}"
        )


def log_prior(
    combination: Combination, prior: PerPose, mask: PerPose, segments: Segments
) -> Segments:
    """Return ``segments`` with the log prior of every pose (``prior``, ``-inf`` if masked).

    Raises
    ------
    CombinationError
        If the combination does not take a prior (``takes_prior``), a shape does not
        match the poses, a prior is NaN or ``+inf``, a mask holds a value other than 0
        and 1 (a mask keeps or drops a pose; a fractional weight is a prior), or a
        compound has every pose masked.
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
    odd = torch.zeros_like(p, dtype=torch.bool)  # mask values other than 0 and 1
    if keep is not None:
        odd = (keep != 0) & (keep != 1)
        p = p.masked_fill(keep != 1, -torch.inf)
    finite = p.nan_to_num(nan=torch.inf, posinf=torch.inf, neginf=-torch.inf)
    best = segment_max(finite, segments.index, segments.count)
    checks = [(best == torch.inf).any(), (best == -torch.inf).any(), odd.any()]
    bad = torch.stack(checks).tolist()
    if bad[2]:
        poses = torch.nonzero(odd).flatten().tolist()
        raise CombinationError(
            f"the mask holds values other than 0 and 1 at poses {poses[:10]}: a mask keeps "
            "(1, True) or drops (0, False) a pose; for fractional weights give a prior "
            "(prior=, a log weight per pose)"
        )
    if bad[0]:
        poses = torch.nonzero(finite == torch.inf).flatten().tolist()
        raise CombinationError(
            f"the prior holds NaN or +inf at poses {poses[:10]}; give finite log weights "
            "(-inf, or the mask, drops a pose)"
        )
    if bad[1]:
        empty = torch.nonzero(best == -torch.inf).flatten().tolist()
        raise CombinationError(
            f"compounds {empty[:10]} (their index in the call) have every pose masked (or a "
            "prior of -inf): keep at least one pose of each compound, or leave the compound out"
        )
    return dataclasses.replace(segments, prior=p)


class CallPrior:
    """The log prior a forward call used, kept for :func:`pose_weights` of its ``per_pose``.

    Holds the per-pose predictions weakly (it keeps no graph alive) and pickles empty:
    it is no part of a model's state.
    """

    def __init__(self, per_pose: Tensor | None = None, prior: Tensor | None = None) -> None:
        self._ref = None if per_pose is None else weakref.ref(per_pose)
        self.prior = prior

    def of(self, per_pose: object) -> Tensor | None:
        """Return the prior if ``per_pose`` is the call's own predictions, else ``None``."""
        return self.prior if self._ref is not None and self._ref() is per_pose else None

    def __reduce__(self) -> tuple[Any, ...]:
        return (CallPrior, ())


def result_weights(
    combination: Combination,
    per_pose: Tensor | CompoundPredictions,
    index: Tensor | None,
    latest: CallPrior,
    options: dict[str, Any],
) -> Tensor:
    """Return :func:`pose_weights` for a forward's result (``MultiPoseModel.pose_weights``).

    ``per_pose`` is a :class:`~combframe.CompoundPredictions` (with its own index and
    prior) or a tensor; a tensor the ``latest`` call returned gets that call's prior.
    The call's prior (masked poses at ``-inf``) is used unless ``options`` give a
    ``prior`` or ``mask``.
    """
    if isinstance(per_pose, CompoundPredictions):
        if index is not None:
            raise TypeError(
                "pose_weights takes a CompoundPredictions (which holds the index) or "
                "per_pose and index; got a CompoundPredictions and an index"
            )
        preds, index, used = per_pose.per_pose, per_pose.index, per_pose.prior
    else:
        preds, used = per_pose, latest.of(per_pose)
    if used is not None and "prior" not in options and "mask" not in options:
        options = {**options, "prior": used}
    return pose_weights(combination, preds, index, **options)


class _SegmentValue(torch.nn.Module):
    """``combination.segment_value`` as a module's forward, for ``functional_call``."""

    def __init__(self, combination: Combination) -> None:
        super().__init__()
        self.combination = combination

    @override
    def forward(self, preds: Tensor, index: Tensor, count: int, prior: Tensor | None) -> Tensor:
        return _segment_value(self.combination, preds, index, count, prior)


def _segment_value(
    combination: Combination, preds: Tensor, index: Tensor, count: int, prior: Tensor | None
) -> Tensor:
    """``combination.segment_value`` with the prior, if any, in the predictions' dtype."""
    if prior is None:
        return combination.segment_value(preds, index, count)
    return combination.segment_value(preds, index, count, prior=prior.to(preds.dtype))


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
    if not held:  # the combination's own parameters: no module around it is needed
        return _segment_value(combination, *args)
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
    r"""Return :math:`\partial G_c/\partial y_i` for every pose of every compound.

    Shape ``(M,)``; ``(M, d)`` for ``(M, d)`` predictions (per column); a pooling
    combination's are ``(M,)`` whatever the shape of the predictions (each pose's share of
    the pooled vector; see "Vector outputs" in :mod:`combframe.core.weights`).

    Parameters
    ----------
    combination
        The combination that made the combined values (``model.combination``).
    per_pose
        The ``per_pose`` of a :class:`~combframe.MultiPoseModel` call, ``(M,)`` or ``(M, d)``.
    index
        The compound of each pose, sorted (``CompoundPredictions.index``); ``None`` for
        the poses of one compound.
    prior, mask
        The forward call's per-pose log prior and mask, if any ("Priors and masks" in
        :mod:`combframe.core.weights`); ``model.pose_weights(out)`` passes the call's own.
    create_graph
        Return weights that are differentiable with respect to ``per_pose`` (and so the
        model, through the per-pose path) and the combination's own parameters, for a
        loss on the weights: a cross-entropy against the pose closest to the crystal
        structure, ``-weights[i_true].clamp_min(1e-12).log()``. Otherwise (the default)
        the weights are detached, for inspection.

    Raises
    ------
    CombinationError
        If ``per_pose`` is neither ``(M,)`` nor ``(M, d)``, ``index`` is not ``(M,)``,
        or the prior or mask is refused (see :func:`log_prior`).
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
