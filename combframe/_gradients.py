r"""Per-pose gradient bookkeeping shared by every combination and strategy.

The backward of every combination needs

.. math::

    \frac{\partial L}{\partial\theta} = \sum_i c_i \frac{\partial y_i}{\partial\theta},
    \qquad c_i = \frac{\partial L}{\partial G}\frac{\partial h}{\partial y_i}
                 + \frac{\partial L}{\partial y_i}.

A :class:`PoseGradients` object knows how to produce that sum for its strategy: from a
stored ``(N, P)`` buffer (one matrix-vector product), by re-running the poses, or from
running sums kept during the forward pass. :class:`ParamLayout` maps between the flat
``P``-vector and the parameter tensors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, final

import torch
from torch import Tensor

from combframe._errors import CombinationError

if TYPE_CHECKING:
    from combframe._combination import BaseCombination

__all__ = ["ParamLayout", "PoseGradients", "StoredGradients", "validate_grad_dict"]


@final
class ParamLayout:
    """The flat layout of a list of parameter tensors.

    Parameters
    ----------
    params
        The parameters whose gradients are collected. They must share one dtype and one
        device, since their per-pose gradients live in one contiguous buffer.

    Raises
    ------
    CombinationError
        If the parameters mix dtypes or devices.
    """

    __slots__ = ("device", "dtype", "numel", "params", "shapes", "sizes")

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = tuple(params)
        self.shapes = tuple(p.shape for p in self.params)
        self.sizes = tuple(p.numel() for p in self.params)
        self.numel = sum(self.sizes)
        kinds = {(p.dtype, p.device) for p in self.params}
        if len(kinds) > 1:
            found = ", ".join(sorted(f"{d} on {dev}" for d, dev in kinds))
            raise CombinationError(
                "all trainable parameters must share one dtype and device, since their "
                f"per-pose gradients are kept in one buffer; found {found}. Convert the "
                "model with model.to(dtype) / model.to(device) first."
            )
        first = self.params[0] if self.params else torch.empty(0)
        self.dtype = first.dtype
        self.device = first.device

    def new_buffer(self, rows: int) -> Tensor:
        """Return an uninitialised ``(rows, P)`` buffer in the parameters' dtype and device."""
        return torch.empty((rows, self.numel), dtype=self.dtype, device=self.device)

    def flatten_into(self, grads: Sequence[Tensor], out: Tensor) -> None:
        """Write one pose's parameter gradients into the ``P``-row ``out`` (one kernel)."""
        torch.cat([g.detach().reshape(-1) for g in grads], out=out)

    def views(self, flat: Tensor) -> list[Tensor]:
        """Split a flat ``P``-vector into parameter-shaped views (no copy)."""
        return [
            chunk.view(shape)
            for chunk, shape in zip(flat.split(self.sizes), self.shapes, strict=True)
        ]


class PoseGradients(ABC):
    r"""Source of :math:`\sum_i c_i \, \partial y_i/\partial\theta` for one compound.

    Subclasses implement one gradient strategy. ``layout`` describes the parameters.
    """

    #: Whether per-pose loss terms (a non-zero ``pose_grads``) can be honoured.
    supports_pose_losses: bool = True
    #: Name of the strategy, used in error messages.
    strategy: str = "store"

    def __init__(self, layout: ParamLayout) -> None:
        self.layout = layout

    @abstractmethod
    def contract(self, coeffs: Tensor) -> Tensor:
        r"""Return the flat ``P``-vector :math:`\sum_i c_i\,\partial y_i/\partial\theta`."""

    def contract_combined(
        self, comb_grad: Tensor, combination: BaseCombination, preds: Tensor, combined: Tensor
    ) -> Tensor:
        r"""Return :math:`\frac{\partial L}{\partial G} \sum_i w_i \, \partial y_i/\partial\theta`.

        Here :math:`w_i = \partial h/\partial y_i` are the combination's pose weights.

        The default forms the pose weights and calls :meth:`contract`; a strategy that
        keeps only running sums (stream) overrides it.
        """
        return self.contract(comb_grad * combination.pose_weights(preds, combined))


@final
class StoredGradients(PoseGradients):
    """Per-pose gradients held in one contiguous ``(N, P)`` buffer (the store strategy).

    Parameters
    ----------
    layout
        Layout of the parameters (the buffer's columns).
    buffer
        Row ``i`` holds pose ``i``'s flattened gradient.
    """

    strategy = "store"

    def __init__(self, layout: ParamLayout, buffer: Tensor) -> None:
        super().__init__(layout)
        self.buffer = buffer

    def contract(self, coeffs: Tensor) -> Tensor:
        return torch.mv(self.buffer.t(), coeffs.to(self.buffer.dtype))

    @classmethod
    def from_grad_dict(
        cls,
        grad_dict: Mapping[str, Sequence[Tensor]],
        param_names: Sequence[str],
        model_params: Sequence[Tensor],
        n_poses: int,
    ) -> StoredGradients:
        """Build the buffer from mtenn's ``{name: [N gradients]}``, after validating it.

        Raises
        ------
        CombinationError
            As :func:`validate_grad_dict`, or if a gradient has the wrong number of
            elements for its parameter.
        """
        validate_grad_dict(grad_dict, param_names, model_params, n_poses)
        layout = ParamLayout(model_params)
        for name, p in zip(param_names, model_params, strict=True):
            bad = [i for i, g in enumerate(grad_dict[name]) if g.numel() != p.numel()]
            if bad:
                raise CombinationError(
                    f"gradient {bad[0]} of {name!r} has {grad_dict[name][bad[0]].numel()} "
                    f"elements; the parameter has {p.numel()}"
                )
        if not model_params:
            return cls(layout, layout.new_buffer(n_poses))
        buffer = torch.cat(
            [
                torch.stack([g.detach().reshape(-1) for g in grad_dict[n]]).to(layout.dtype)
                for n in param_names
            ],
            dim=1,
        )
        return cls(layout, buffer)


def validate_grad_dict(
    grad_dict: Mapping[str, Sequence[Tensor]],
    param_names: Sequence[str],
    model_params: Sequence[Tensor],
    n_poses: int,
) -> None:
    """Check mtenn-style gradients against the names, parameters and number of poses.

    Raises
    ------
    CombinationError
        If names and parameters disagree in number, keys are missing or extra, or a
        list does not hold ``n_poses`` gradients.
    """
    names = list(param_names)
    if len(names) != len(model_params):
        raise CombinationError(
            f"param_names has {len(names)} names but {len(model_params)} model_params "
            "were given; pass one name per parameter, in the same order"
        )
    missing = [n for n in names if n not in grad_dict]
    extra = [k for k in grad_dict if k not in set(names)]
    if missing or extra:
        raise CombinationError(
            f"grad_dict keys do not match param_names: missing {missing[:5]}, extra {extra[:5]}"
        )
    wrong = [(n, len(grad_dict[n])) for n in names if len(grad_dict[n]) != n_poses]
    if wrong:
        raise CombinationError(
            f"grad_dict must hold {n_poses} gradients per parameter (one per prediction "
            "in pred_list); got " + ", ".join(f"{n!r}: {k}" for n, k in wrong[:5])
        )
