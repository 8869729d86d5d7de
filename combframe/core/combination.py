r"""The combination protocol and the base class every combination derives from.

A combination turns N per-pose predictions :math:`y_1 \dots y_N` into one value
:math:`G = h(y)`. It supplies exactly two things: the value :math:`h(y)` and the pose
weights :math:`\partial h / \partial y_i`. Everything else (collecting per-pose gradients,
contracting them, handing gradients to the parameters) is shared and lives in
:mod:`combframe.core.function` and :mod:`combframe.core.strategies`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor
from typing_extensions import override

from combframe.errors import CombinationError

if TYPE_CHECKING:
    from combframe.core.gradients import PoseGradients

__all__ = [
    "BaseCombination",
    "Combination",
    "CombinationParams",
    "StreamingCombination",
    "implements_value",
]


class CombinationParams(BaseModel):
    """Base of every combination's parameter model.

    Unknown fields are rejected and instances are immutable; subclasses declare their
    fields with :func:`pydantic.Field` bounds (``gt=0`` and the like), so a bad value is
    reported with the field name and the bound.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


@runtime_checkable
class Combination(Protocol):
    r"""What a combination implements.

    Attributes
    ----------
    name
        The registered name, lower case (``"max"``, ``"mean"``, ...).
    Params
        The pydantic model of the combination's parameters.
    params
        This instance's validated parameters.
    """

    name: ClassVar[str]
    Params: ClassVar[type[CombinationParams]]
    params: CombinationParams

    def value(self, preds: Tensor) -> Tensor:
        r"""Return :math:`h(y)` as a 0-d tensor, for ``preds`` of shape ``(N,)``."""
        ...

    def pose_weights(self, preds: Tensor, combined: Tensor) -> Tensor:
        r"""Return :math:`\partial h/\partial y_i`, shape ``(N,)``, for ``combined = h(preds)``."""
        ...


@runtime_checkable
class StreamingCombination(Combination, Protocol):
    r"""Optional extension: a combination that the ``"stream"`` strategy can run.

    The stream strategy never stores per-pose gradients. It keeps, for ``k`` features,
    running sums :math:`A_j = \sum_i e^{a_i - m} \phi_{ij} \, \partial y_i/\partial\theta`
    and :math:`Z = \sum_i e^{a_i - m}` with a running maximum :math:`m` of the log weights
    :math:`a_i` (the online softmax of FlashAttention), so that at the end

    .. math::

        \frac{\partial h}{\partial y_i} = \operatorname{softmax}(a)_i \sum_j \lambda_j \phi_{ij},
        \qquad
        \sum_i \frac{\partial h}{\partial y_i} \frac{\partial y_i}{\partial\theta}
        = \frac{1}{Z} \sum_j \lambda_j A_j .

    A combination opts in by writing the two methods below; :math:`a_i` and
    :math:`\phi_i` may depend on :math:`y_i` and on a centre :math:`c`, the coefficients
    :math:`\lambda` on :math:`G` and :math:`c`. The centre starts at the compound's first
    prediction. A combination whose features depend on it should also write
    ``stream_shift(old, new)``, returning the ``(k, k)`` matrix :math:`M` with
    :math:`\phi(y; c_\text{new}) = M\,\phi(y; c_\text{old})` for every :math:`y`: the
    strategy then keeps the centre on the best pose seen so far (re-expressing the sums
    as :math:`A \leftarrow M A`, exact), so that sums of large, nearly cancelling terms
    never arise whatever the order of the poses.
    """

    def stream_terms(self, preds: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
        r"""Return log weights :math:`a` and features :math:`\phi`.

        ``a`` has the shape of ``preds``; ``phi`` has shape ``preds.shape + (k,)``.
        """
        ...

    def stream_coefficients(self, combined: Tensor, center: Tensor) -> Tensor:
        r"""Return the ``k`` coefficients :math:`\lambda` given :math:`G` and the centre."""
        ...


class BaseCombination(torch.nn.Module):
    r"""Base class of combination modules: parameters, mtenn-style call, serialization.

    A subclass sets ``name`` and ``Params`` and writes :meth:`value` (one compound) or
    :meth:`segment_value` (a batch of compounds at once), or both; it may write
    :meth:`pose_weights` in closed form (otherwise autograd differentiates :meth:`value`
    on the N-vector of predictions alone, which never touches the model).

    Parameters are given as keyword or positional arguments in the order of the
    ``Params`` fields, validated by pydantic, and readable as attributes
    (``comb.pred_scale``). Assigning an attribute re-validates it.

    Calling the module with the published mtenn signature
    ``comb(pred_list, grad_dict, param_names, *model_params)`` returns
    ``(combined, per_pose)`` through the shared autograd Function.
    """

    name: ClassVar[str]
    Params: ClassVar[type[CombinationParams]] = CombinationParams
    params: CombinationParams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        fields = list(self.Params.model_fields)
        if len(args) > len(fields):
            raise TypeError(
                f"{type(self).__name__} takes at most {len(fields)} positional parameters "
                f"({', '.join(fields) or 'none'}); got {len(args)}"
            )
        for field, arg in zip(fields, args, strict=False):
            if field in kwargs:
                raise TypeError(f"{type(self).__name__} got parameter {field!r} twice")
            kwargs[field] = arg
        object.__setattr__(self, "params", self.Params(**kwargs))

    # ---- parameters as attributes -------------------------------------------------
    def __getattr__(self, item: str) -> Any:
        params = self.__dict__.get("params")
        if params is not None and item in type(params).model_fields:
            return getattr(params, item)
        return super().__getattr__(item)

    def __setattr__(self, key: str, value: Any) -> None:
        if key in type(self).Params.model_fields and "params" in self.__dict__:
            new = self.params.model_dump()
            new[key] = value
            object.__setattr__(self, "params", self.Params(**new))
            return
        super().__setattr__(key, value)

    def hyperparameters(self) -> tuple[Any, ...]:
        """Return the parameter values in ``Params`` field order."""
        return tuple(getattr(self.params, f) for f in type(self.params).model_fields)

    def to_config(self) -> dict[str, Any]:
        """Return ``{"name": ..., <params>}``, the dictionary form of this combination."""
        return {"name": self.name, **self.params.model_dump()}

    @override
    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())

    # ---- the math a plugin supplies -----------------------------------------------
    def value(self, preds: Tensor) -> Tensor:
        r"""Return :math:`h(y)` as a 0-d tensor, for ``preds`` of shape ``(N,)``.

        A subclass writes this method, :meth:`segment_value`, or both. The default
        evaluates :meth:`segment_value` on one segment.
        """
        if not implements_value(type(self)):
            raise NotImplementedError(
                f"{type(self).__name__} must implement value(preds) or "
                "segment_value(preds, index, num_segments)"
            )
        index = torch.zeros(preds.shape[0], dtype=torch.long, device=preds.device)
        return self.segment_value(preds, index, 1)[0]

    def segment_value(self, preds: Tensor, index: Tensor, num_segments: int) -> Tensor:
        r"""Return :math:`h` of every compound of a batch, shape ``(num_segments,)``.

        The default calls :meth:`value` once per compound (a Python loop over compounds);
        a combination written with the reductions of :mod:`combframe.segment` evaluates
        a whole batch at once. Both are ordinary autograd on the ``M`` predictions.

        Parameters
        ----------
        preds
            The per-pose predictions of all compounds, flat, shape ``(M,)``.
        index
            The compound of each pose, shape ``(M,)``, sorted: the poses of one compound
            are contiguous and every compound has at least one pose.
        num_segments
            The number of compounds ``C``.
        """
        if type(self).value is BaseCombination.value:
            raise NotImplementedError(
                f"{type(self).__name__} must implement value(preds) or "
                "segment_value(preds, index, num_segments)"
            )
        sizes = torch.bincount(index, minlength=num_segments).tolist()
        return torch.stack([self.value(p) for p in preds.split(sizes)])

    def pose_weights(self, preds: Tensor, combined: Tensor) -> Tensor:
        r"""Return :math:`\partial h/\partial y_i` (shape ``(N,)``).

        The default differentiates :meth:`value` with autograd on the detached N-vector
        of predictions; subclasses with a closed form override it.
        """
        with torch.enable_grad():
            y = preds.detach().requires_grad_(True)
            (weights,) = torch.autograd.grad(self.value(y), y)
        return weights

    # ---- the mtenn-compatible call ------------------------------------------------
    def forward(
        self,
        pred_list: Sequence[Tensor] | Tensor,
        grad_dict: Mapping[str, Sequence[Tensor]] | PoseGradients,
        param_names: Sequence[str],
        *model_params: Tensor,
    ) -> tuple[Tensor, Tensor]:
        r"""Combine per-pose predictions with the mtenn ``Combination.forward`` signature.

        Parameters
        ----------
        pred_list
            N per-pose predictions (each with one element), or a tensor of N elements.
        grad_dict
            Parameter name to a list of N detached per-pose gradients
            :math:`\partial y_i/\partial\theta`.
        param_names
            Names of ``model_params``, in the same order; every name is a key of
            ``grad_dict``.
        *model_params
            The model parameters the gradients belong to; gradients flow to them.

        Returns
        -------
        combined, per_pose
            The combined prediction (0-d) and the per-pose predictions, shape ``(N,)``.
        """
        from combframe.core.function import CombinationFunction

        out: tuple[Tensor, Tensor] = CombinationFunction.apply(  # type: ignore[no-untyped-call]
            self, pred_list, grad_dict, param_names, *model_params
        )
        return out


def implements_value(cls: type[BaseCombination]) -> bool:
    """Whether ``cls`` writes :meth:`~BaseCombination.value` or ``segment_value``."""
    return (
        cls.value is not BaseCombination.value
        or cls.segment_value is not BaseCombination.segment_value
    )


def as_pred_vector(pred_list: Sequence[Tensor] | Tensor) -> Tensor:
    """Stack per-pose predictions into a fresh, detached ``(N,)`` tensor.

    Raises
    ------
    CombinationError
        If there are no predictions, or one of them has more than one element.
    """
    if isinstance(pred_list, Tensor):
        return pred_list.detach().reshape(-1).clone()
    preds = list(pred_list)
    if not preds:
        raise CombinationError("pred_list is empty: a combination needs at least one pose")
    bad = [(i, tuple(p.shape)) for i, p in enumerate(preds) if p.numel() != 1]
    if bad:
        raise CombinationError(
            "each per-pose prediction must have exactly one element; got shapes "
            + ", ".join(f"pose {i}: {s}" for i, s in bad[:5])
        )
    return torch.stack([p.detach().reshape(()) for p in preds])
