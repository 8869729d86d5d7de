r"""Which pose was picked: the weight :math:`\partial G_c/\partial y_i` of every pose.

For a compound :math:`c` with combined value :math:`G_c = h(y_{c,1}, \dots, y_{c,N_c})`,
the weight of pose :math:`i` is :math:`w_i = \partial G_c / \partial y_i`: for the smooth
minimum the softmax of :math:`-y/t` (nearly 1 for the pose the model picked), for the
mean :math:`1/N`, for Boltzmann :math:`p_i (1 - (y_i - G)/kT)` with :math:`p =
\operatorname{softmax}(-y/kT)`. They need the per-pose predictions only: one autograd
pass through the combination's batched value on the ``(M,)`` vector, never the model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from combframe.core.combination import Combination
from combframe.errors import CombinationError

__all__ = ["pose_weights"]


def pose_weights(
    combination: Combination,
    per_pose: Tensor,
    index: Tensor | None = None,
    *,
    create_graph: bool = False,
) -> Tensor:
    r"""Return :math:`\partial G_c/\partial y_i` for every pose of every compound, shape ``(M,)``.

    Parameters
    ----------
    combination
        The combination that made the combined values (``model.combination``).
    per_pose
        The per-pose predictions, shape ``(M,)``: ``per_pose`` of a
        :class:`~combframe.MultiPoseModel` call.
    index
        The compound of each pose, sorted (``CompoundPredictions.index``); ``None`` for
        the poses of one compound.
    create_graph
        Return weights that are differentiable with respect to ``per_pose`` (and so the
        model, through the per-pose path) and the combination's own parameters, for a
        loss on the weights: a cross-entropy against the pose closest to the crystal
        structure, ``-weights[i_true].clamp_min(1e-12).log()``. Otherwise (the default)
        the weights are detached, for inspection.

    Raises
    ------
    CombinationError
        If ``per_pose`` is not one-dimensional or ``index`` does not match it.
    """
    if per_pose.dim() != 1 or (index is not None and index.shape != per_pose.shape):
        got = "none" if index is None else tuple(index.shape)
        raise CombinationError(
            f"pose_weights takes the (M,) per-pose predictions and their (M,) compound "
            f"index; got per_pose of shape {tuple(per_pose.shape)} and index {got}"
        )
    if index is None:
        index = torch.zeros(per_pose.shape, dtype=torch.long, device=per_pose.device)
    count = int(index[-1]) + 1 if len(index) else 0  # sorted: the last compound is the largest
    keep = create_graph and per_pose.requires_grad
    with torch.enable_grad():
        y = per_pose if keep else per_pose.detach().requires_grad_(True)
        combined = combination.segment_value(y, index, count)
        (weights,) = torch.autograd.grad(combined.sum(), y, create_graph=create_graph)
    return weights
